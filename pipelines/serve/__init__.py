"""Ray Serve endpoint: an OpenAI-compatible API over a raygpt checkpoint.

    raygpt serve --checkpoint CKPT [--config FILE] [--host 127.0.0.1 --port 8000] [key=value ...]
    serve run pipelines.serve.app:build_app checkpoint=CKPT      # or: serve run cluster/serve/raygpt.yaml

Modules: config (ServeConfig), protocol (OpenAI wire format and errors), batching (continuous
batching loop), app (FastAPI ingress deployment, `build_app`), metrics (Prometheus through Ray),
cli (`raygpt serve`). Importing this package imports nothing heavy.
"""
