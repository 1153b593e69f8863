"""Fixtures of the Serve tests: a tiny checkpoint, Serve on 127.0.0.1, deploy/undeploy helpers.

Serve is started once per session on the shared `ray_session` (HTTP on 127.0.0.1 and a free port);
each test module deploys its own application (module-scoped) and deletes it at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

TEXT = (
    "To be, or not to be, that is the question: whether tis nobler in the mind to suffer the slings and "
    "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. "
    "User: hello there. Assistant: hello, how can I help you today? The quick brown fox jumps over the "
    "lazy dog while the cat sleeps in the warm sun and the birds sing in the tall green trees. "
)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A random-weight debug GPT with a small BPE tokenizer, block_size 256 (room for 200+ new tokens)."""
    import torch

    from gptcore.checkpoint import save_checkpoint
    from gptcore.config import preset
    from gptcore.model import GPT
    from gptcore.tokenizer import train_bpe

    tok = train_bpe([TEXT] * 20, vocab_size=320)
    torch.manual_seed(0)
    model = GPT(preset("debug", vocab_size=tok.vocab_size, block_size=256))
    out = tmp_path_factory.mktemp("serve") / "tiny-ckpt"
    return Path(save_checkpoint(out, model, tok, {"step": 0, "note": "serve tests"}))


@pytest.fixture(scope="session")
def serve_port(ray_session) -> int:
    from ray import serve
    from serve_testlib import free_port

    from pipelines.serve.config import ServeConfig, ServeTesting, ray_serve_env

    # the serving path `raygpt serve` sets up (ServeConfig.ingress, default Serve's Python proxy in
    # front of the replicas); RAYGPT_TEST_SERVE_INGRESS=haproxy runs the tests behind HAProxy instead
    # (what the cluster configs use). HAProxy's files and side ports are private (ServeConfig.testing),
    # so a Serve on the same machine cannot collide
    ingress = os.environ.get("RAYGPT_TEST_SERVE_INGRESS") or ServeConfig.ingress
    hap_dir = tempfile.mkdtemp(prefix="rghap-", dir="/tmp")  # short: HAProxy's unix socket paths are limited
    testing = ServeTesting(haproxy_state_dir=hap_dir, haproxy_stats_port=free_port(),
                           haproxy_metrics_port=free_port(), fallback_proxy_port=free_port())
    env = ray_serve_env(ingress, testing)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                controller_options={"runtime_env": {"env_vars": env}})
    yield port
    serve.shutdown()
    shutil.rmtree(hap_dir, ignore_errors=True)
