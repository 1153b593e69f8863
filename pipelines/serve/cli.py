"""`raygpt serve`: start Ray + Serve and serve a checkpoint over the OpenAI-compatible API.

    raygpt serve --checkpoint runs/x/ckpt [--config cluster/serve/raygpt.yaml] \
                 [--host 127.0.0.1 --port 8000] [--address auto] [--detach] [key=value ...]
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
         -d '{"prompt": "ROMEO:", "max_tokens": 32}'

Trailing key=value pairs override ServeConfig fields (pipelines/serve/config.py), e.g.
`autoscaling.max_replicas=4 limits.max_tokens=256 auth.api_keys_file=keys.txt`. Without --address a
local Ray starts and stops with this command (Ctrl-C or SIGTERM: requests drain for at most drain_s,
then nothing is left running; pipelines/serve/launch.py); a port already taken is an error before
anything starts. With --address the app is deployed to that cluster and --detach leaves it running
there. Serve starts with ServeConfig.ingress (default "proxy": Serve's Python proxy on --host/--port;
`ingress=haproxy`, for clusters: HAProxy there forwarding to the replicas' own HTTP servers), so
--port is the port clients use either way. Does not: build images or manage Kubernetes
(cluster/kuberay/rayservice.yaml does that through KubeRay).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API (Ray Serve)",
        description="Serve a raygpt checkpoint: /v1/completions, /v1/chat/completions, /v1/models, /health,\n"
                    "with continuous batching, streaming, autoscaling, request limits and API keys.\n\n"
                    "  raygpt serve --checkpoint runs/x/ckpt --port 8000 autoscaling.max_replicas=2\n"
                    "  serve run cluster/serve/raygpt.yaml   # the same app from a Serve config file\n\n"
                    "Ctrl-C or SIGTERM stops the server: requests in flight get drain_s (default 5 s) to finish,\n"
                    "then Ray and every process and port it used are gone. It listens on 127.0.0.1 only unless\n"
                    "you pass --host 0.0.0.0. ingress=haproxy (for clusters) puts Ray Serve's HAProxy in front.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint directory (overrides `checkpoint` of --config)")
    p.add_argument("--config", help="YAML of ServeConfig fields, or a Serve config file such as "
                                    "cluster/serve/raygpt.yaml (its raygpt application's args are used)")
    p.add_argument("--host", help="HTTP host (default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (e.g. auto, ray://head:10001); default: start a local Ray")
    p.add_argument("--detach", action="store_true",
                   help="with --address: deploy and exit, leaving the app running on the cluster")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="ServeConfig overrides")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from pipelines.config import to_dict
    from pipelines.serve.config import load_serve_config

    overrides = list(args.overrides or [])
    if args.checkpoint:
        overrides.append(f"checkpoint={args.checkpoint}")
    if args.host:
        overrides.append(f"host={args.host}")
    if args.port:
        overrides.append(f"port={args.port}")
    cfg = load_serve_config(args.config, overrides)
    ckpt = Path(cfg.checkpoint)
    if not (ckpt / "config.json").is_file():
        raise UserError(f"--checkpoint {str(ckpt)!r} is not a raygpt checkpoint directory (no config.json); "
                        "pass a directory written by `raygpt train` or `raygpt init`")
    if cfg.auth.api_keys_file and not Path(cfg.auth.api_keys_file).is_file():
        raise UserError(f"auth.api_keys_file {cfg.auth.api_keys_file!r} does not exist")
    if args.detach and not args.address:
        raise UserError("--detach needs --address: a local Ray stops when this command exits")
    # replicas may run anywhere in the cluster: hand them an absolute checkpoint path
    data = to_dict(cfg)
    data["checkpoint"] = str(ckpt.resolve())
    if cfg.auth.api_keys_file:
        data["auth"]["api_keys_file"] = str(Path(cfg.auth.api_keys_file).resolve())
    from pipelines.serve import launch

    if args.address:  # a cluster: its Serve may hold the port already; stop deletes this app only
        return launch.serve_until_stopped(data, args.address, detach=args.detach)
    _check_local_ports(cfg)
    return launch.supervise(data)


def _check_local_ports(cfg) -> None:
    """Every port a local serve binds must be free now: a one-line error instead of 500s later."""
    from pipelines.serve.ports import check_port_free, is_loopback

    check_port_free(cfg.host, cfg.port, "--port")
    if cfg.ingress != "haproxy":
        return
    from pipelines import _ray_compat

    ports = _ray_compat.serve_haproxy_ports()
    t = cfg.testing
    if t.haproxy_state_dir is not None:
        ports = {"stats": t.haproxy_stats_port, "metrics": t.haproxy_metrics_port, "fallback": t.fallback_proxy_port}
    check_port_free("0.0.0.0", ports["stats"], "ingress=haproxy: HAProxy's stats port")
    check_port_free("0.0.0.0", ports["metrics"], "ingress=haproxy: HAProxy's metrics port")
    check_port_free(cfg.host, ports["fallback"], "ingress=haproxy: Serve's fallback proxy port")
    if is_loopback(cfg.host):
        from pipelines.serve.launch import say

        say(f"warning: ingress=haproxy also listens on ALL interfaces on ports {ports['stats']} (stats) and "
            f"{ports['metrics']} (metrics); ingress=proxy keeps everything on {cfg.host}")
