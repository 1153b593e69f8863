"""`raygpt serve`: start Ray + Serve and serve a checkpoint over the OpenAI-compatible API.

    raygpt serve --checkpoint runs/x/ckpt [--config cluster/serve/raygpt.yaml] \
                 [--host 127.0.0.1 --port 8000] [--address auto] [--detach] [key=value ...]
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
         -d '{"prompt": "ROMEO:", "max_tokens": 32}'

Trailing key=value pairs override ServeConfig fields (pipelines/serve/config.py), e.g.
`autoscaling.max_replicas=4 limits.max_tokens=256 auth.api_keys_file=keys.txt`. Without --address a
local Ray starts and stops with this command (Ctrl-C); with --address the app is deployed to that
cluster and --detach leaves it running there. Serve starts with ServeConfig.ingress (default "haproxy":
HAProxy on --host/--port forwarding to the replicas' own HTTP servers; `ingress=proxy` for Serve's
Python proxy), so --port is the port clients use either way. Does not: build images or manage Kubernetes
(cluster/kuberay/rayservice.yaml does that through KubeRay).
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from pipelines.cli import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API (Ray Serve)",
        description="Serve a raygpt checkpoint: /v1/completions, /v1/chat/completions, /v1/models, /health,\n"
                    "with continuous batching, streaming, autoscaling, request limits and API keys.\n\n"
                    "  raygpt serve --checkpoint runs/x/ckpt --port 8000 autoscaling.max_replicas=2\n"
                    "  serve run cluster/serve/raygpt.yaml   # the same app from a Serve config file",
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

    import ray

    from pipelines.runtime import ensure_ray
    from ray import serve

    from pipelines.config import to_dict
    from pipelines.serve.app import build_app
    from pipelines.serve.config import ray_serve_env

    # replicas may run anywhere in the cluster: hand them an absolute checkpoint path
    data = to_dict(cfg)
    data["checkpoint"] = str(ckpt.resolve())
    if cfg.auth.api_keys_file:
        data["auth"]["api_keys_file"] = str(Path(cfg.auth.api_keys_file).resolve())
    ensure_ray(args.address or "local", param="--address")
    # cfg.ingress and the other process-wide Serve knobs: environment variables of the Serve
    # controller, which hands them on to the proxies/HAProxy and replicas it starts. Only applied
    # when this command starts Serve; a Serve already running on --address keeps its settings.
    # With "haproxy" HAProxy listens on host:port, so --port is still the port clients use.
    serve.start(http_options={"host": cfg.host, "port": cfg.port},
                controller_options={"runtime_env": {"env_vars": ray_serve_env(cfg.ingress)}})
    serve.run(build_app(data), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    base = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    print(f"raygpt serve: model {cfg.served_model_name!r} at {base}/v1 "
          f"(health: {base}/health); Ctrl-C to stop", flush=True)
    if args.detach:
        return 0

    def _stop(signum, frame):  # `kill` / a container stop: the same clean shutdown as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("raygpt serve: shutting down", flush=True)
    finally:
        serve.delete(cfg.app_name)
        if not args.address:
            serve.shutdown()
            ray.shutdown()
    return 0
