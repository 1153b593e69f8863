#!/usr/bin/env bash
# Stop the local Ray head started by cluster/head-up.sh, and only it.
#
#   cluster/head-down.sh [--temp-dir DIR] [--grace SECONDS]
#
# Finds the processes of this cluster by its session directory (<temp-dir>/session_*, which every
# Ray process of the cluster carries on its command line), sends SIGTERM, waits, then SIGKILLs what
# is left. Other Ray instances on the host (other users, tests, notebooks) are left alone: this
# script never runs a bare `ray stop`. Does not: delete the temp dir's logs (remove it yourself).
set -euo pipefail

TEMP_DIR="/tmp/raygpt-head"
GRACE=10
while [ $# -gt 0 ]; do
  case "$1" in
    --temp-dir) TEMP_DIR="$2"; shift 2;;
    --grace) GRACE="$2"; shift 2;;
    -h|--help) sed -n '2,10p' "$0"; exit 0;;
    *) echo "head-down.sh: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
TEMP_DIR="${TEMP_DIR%/}"

GCS_PORT=""
if [ -f "$TEMP_DIR/raygpt-head.env" ]; then
  GCS_PORT="$(sed -n 's/^RAY_GCS_ADDRESS=.*:\([0-9]*\)$/\1/p' "$TEMP_DIR/raygpt-head.env")"
fi

# roots: processes naming this cluster's session dir (gcs, raylet, dashboard, monitors) or its GCS
# address (the Ray client server); then every descendant of a root (agents, workers, job drivers).
# One `ps` snapshot, one awk pass.
cluster_pids() {
  ps -ww -eo pid=,ppid=,args= | awk -v dir="$TEMP_DIR" -v gcs="$GCS_PORT" -v self="$$" '
    {
      pid = $1; ppid = $2; $1 = ""; $2 = ""; args = $0 " "
      parent[pid] = ppid; order[NR] = pid
      if (pid == self) next
      if (index(args, dir "/session_") || index(args, "--temp-dir=" dir " ") || index(args, "--temp_dir=" dir " "))
        keep[pid] = 1
      else if (gcs != "" && index(args, "ray.util.client.server") && index(args, ":" gcs " "))
        keep[pid] = 1
    }
    END {
      changed = 1
      while (changed) {
        changed = 0
        for (i = 1; i <= NR; i++) { p = order[i]; if (!(p in keep) && (parent[p] in keep) && p != self) { keep[p] = 1; changed = 1 } }
      }
      for (p in keep) print p
    }'
}

PIDS="$(cluster_pids)"
if [ -z "$PIDS" ]; then
  echo "head-down.sh: no Ray process of $TEMP_DIR is running"
  rm -f "$TEMP_DIR/raygpt-head.env"
  exit 0
fi
echo "head-down.sh: stopping $(echo "$PIDS" | wc -w) process(es) of the Ray cluster in $TEMP_DIR"
for pid in $PIDS; do kill -TERM "$pid" 2>/dev/null || true; done
alive() {  # a zombie (exited, waiting to be reaped) counts as gone
  local st
  st="$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)" || return 1
  [ -n "$st" ] && [ "$st" != "Z" ]
}
for _ in $(seq 1 $((GRACE * 10))); do
  LEFT=""
  for pid in $PIDS; do alive "$pid" && LEFT="$LEFT $pid"; done
  [ -z "$LEFT" ] && break
  sleep 0.1
done
for pid in $(cluster_pids); do alive "$pid" && kill -KILL "$pid" 2>/dev/null || true; done
rm -f "$TEMP_DIR/raygpt-head.env"
echo "head-down.sh: stopped"
