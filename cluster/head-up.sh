#!/usr/bin/env bash
# Start a local Ray head with token authentication ON and the dashboard bound to 127.0.0.1 only.
#
#   cluster/head-up.sh [--port 6379] [--dashboard-port 8265] [--num-cpus N] [--temp-dir DIR]
#                      [--token-file FILE] [-- extra `ray start` flags]
#   cluster/head-down.sh [--temp-dir DIR]
#
# Token: $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, else --token-file; generated (0600) when missing.
# Clients (raygpt submit, ray job, the dashboard in a browser) need the same token: raygpt submit reads
# RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token or --token-file.
# Everything listens on 127.0.0.1 (node IP and dashboard); reach it from elsewhere through an SSH tunnel.
# State (addresses, token path) goes to <temp-dir>/raygpt-head.env; head-down.sh stops exactly the
# processes of this cluster (it never runs a bare `ray stop`, which would stop every Ray on the host).
# Does not: start worker nodes (run `ray start --address=127.0.0.1:PORT` with the same token for that).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PORT=6379
DASHBOARD_PORT=8265
NUM_CPUS=""
TEMP_DIR="/tmp/raygpt-head"
TOKEN_FILE="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT="$2"; shift 2;;
    --dashboard-port) DASHBOARD_PORT="$2"; shift 2;;
    --num-cpus) NUM_CPUS="$2"; shift 2;;
    --temp-dir) TEMP_DIR="$2"; shift 2;;
    --token-file) TOKEN_FILE="$2"; shift 2;;
    --) shift; EXTRA=("$@"); break;;
    -h|--help) sed -n '2,16p' "$0"; exit 0;;
    *) echo "head-up.sh: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done

RAY="${RAY:-}"
if [ -z "$RAY" ]; then
  if [ -x "$REPO/.venv/bin/ray" ]; then RAY="$REPO/.venv/bin/ray"; else RAY="ray"; fi
fi
PYBIN="$(dirname "$(command -v "$RAY")")"

if [ ! -s "$TOKEN_FILE" ]; then
  mkdir -p "$(dirname "$TOKEN_FILE")"
  (umask 077; "$PYBIN/python" -c 'import secrets; print(secrets.token_hex(32))' > "$TOKEN_FILE")
  echo "head-up.sh: generated a new auth token in $TOKEN_FILE" >&2
fi
chmod 600 "$TOKEN_FILE"

export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$TOKEN_FILE"
unset RAY_AUTH_TOKEN  # the file is the single source of truth for this cluster
# job drivers run `python`: make it the interpreter that has Ray and raygpt
export PATH="$PYBIN:$PATH"
mkdir -p "$TEMP_DIR"

ARGS=(start --head --node-ip-address=127.0.0.1 --port="$PORT"
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT"
      --temp-dir="$TEMP_DIR" --disable-usage-stats)
if [ -n "$NUM_CPUS" ]; then ARGS+=(--num-cpus="$NUM_CPUS"); fi
"$RAY" "${ARGS[@]}" "${EXTRA[@]}"

cat > "$TEMP_DIR/raygpt-head.env" <<STATE
RAY_GCS_ADDRESS=127.0.0.1:$PORT
RAY_DASHBOARD=http://127.0.0.1:$DASHBOARD_PORT
RAY_AUTH_TOKEN_PATH=$TOKEN_FILE
RAY_TEMP_DIR=$TEMP_DIR
STATE
echo "head-up.sh: Ray head up; dashboard http://127.0.0.1:$DASHBOARD_PORT (token auth on, token in $TOKEN_FILE)"
echo "  submit: RAY_AUTH_TOKEN_PATH=$TOKEN_FILE raygpt submit generate --address http://127.0.0.1:$DASHBOARD_PORT -- ..."
echo "  stop:   $HERE/head-down.sh --temp-dir $TEMP_DIR"
