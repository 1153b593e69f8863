"""ServeConfig validation, app args parsing, the shipped Serve YAMLs, and the OpenAI protocol models (no Ray).

    .venv/bin/python -m pytest tests/pipelines/serve/test_serve_config.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, load_config
from pipelines.serve.config import ServeConfig, deployment_options
from pipelines.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse_request

REPO = Path(__file__).resolve().parents[3]


def test_defaults_and_deployment_options():
    cfg = load_config(ServeConfig, None, ["checkpoint=/x/my-model", "num_cpus=0.5", "autoscaling.max_replicas=3",
                                          "backpressure_status=429"])
    assert cfg.served_model_name == "my-model"
    opts = deployment_options(cfg)
    assert opts["ray_actor_options"] == {"num_cpus": 0.5}
    assert opts["autoscaling_config"]["max_replicas"] == 3
    assert opts["backpressure_config"] == {"status_code": 429, "retry_after_s": 1.0}
    assert opts["max_ongoing_requests"] == cfg.max_ongoing_requests


@pytest.mark.parametrize("override, fragment", [
    ("checkpoint=", "checkpoint is required"),
    ("backpressure_status=500", "backpressure_status must be 429 or 503"),
    ("autoscaling.max_replicas=0", "max_replicas"),
    ("num_cpus=0", "num_cpus"),
    ("limits.default_max_tokens=9999", "default_max_tokens"),
    ("chat_template=nope", "chat_template"),
    ("limits.max_nn=3", "unknown config key"),
    ("max_ongoing_requests=many", "expected an integer"),
])
def test_invalid_config_names_the_field(override, fragment):
    base = [] if override.startswith("checkpoint=") else ["checkpoint=/x"]
    with pytest.raises(ConfigError) as ei:
        load_config(ServeConfig, None, base + [override])
    assert fragment in str(ei.value)


def test_app_args_from_serve_run_strings_and_yaml(tmp_path):
    from pipelines.serve.app import config_from_args

    cfg = config_from_args({"checkpoint": "/c", "autoscaling.max_replicas": "2", "limits": {"max_n": 2}})
    assert (cfg.autoscaling.max_replicas, cfg.limits.max_n) == (2, 2)
    f = tmp_path / "s.yaml"
    f.write_text("checkpoint: /from-file\nlimits: {max_tokens: 64}\n")
    cfg = config_from_args({"config": str(f), "limits": {"max_n": 3}})
    assert (cfg.checkpoint, cfg.limits.max_tokens, cfg.limits.max_n) == ("/from-file", 64, 3)


def test_shipped_serve_yamls_are_valid():
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve.app import config_from_args

    doc = yaml.safe_load((REPO / "cluster/serve/raygpt.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc)  # what `serve run` / `serve deploy` parse
    app = schema.applications[0]
    assert app.import_path == "pipelines.serve.app:build_app"
    cfg = config_from_args(app.args)
    assert cfg.autoscaling.max_replicas > cfg.autoscaling.min_replicas
    from pipelines.serve.config import load_serve_config

    # `raygpt serve --config` reads the same file: the raygpt app's args, name, route and HTTP options
    same = load_serve_config(str(REPO / "cluster/serve/raygpt.yaml"), ["checkpoint=/c"])
    assert (same.autoscaling, same.app_name, same.port) == (cfg.autoscaling, app.name, doc["http_options"]["port"])
    rs = yaml.safe_load((REPO / "cluster/kuberay/rayservice.yaml").read_text())
    assert rs["kind"] == "RayService"
    inner = ServeDeploySchema.model_validate(yaml.safe_load(rs["spec"]["serveConfigV2"]))
    inner_cfg = config_from_args(inner.applications[0].args)
    # the process-wide Serve settings each file starts Serve with match what its app's `ingress` asks for
    from pipelines.serve.config import ray_serve_env

    for sch, c in ((schema, cfg), (inner, inner_cfg)):
        assert sch.controller_options.runtime_env["env_vars"] == ray_serve_env(c.ingress)


def test_ray_serve_env_per_ingress():
    from pipelines.config import ConfigError
    from pipelines.serve.config import haproxy_private_env, load_serve_config, ray_serve_env

    assert ServeConfig(checkpoint="c").ingress == "proxy"  # issue 15: HAProxy binds 8404/9101 on all interfaces
    ha, px = ray_serve_env("haproxy"), ray_serve_env("proxy")
    assert ha["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and px["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert ha["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == px["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    assert all(isinstance(v, str) for v in {**ha, **px}.values())  # runtime_env env_vars must be strings
    with pytest.raises(ConfigError, match="ingress"):
        ray_serve_env("nginx")
    with pytest.raises(ConfigError, match="ingress"):
        load_serve_config(None, ["checkpoint=c", "ingress=nginx"])
    env = haproxy_private_env("/tmp/x/", 1234, 1235, 1236)
    assert env["RAY_SERVE_HAPROXY_SOCKET_PATH"] == "/tmp/x/admin.sock" and env["RAY_SERVE_HAPROXY_STATS_PORT"] == "1234"
    with pytest.raises(ValueError, match="too long"):  # Serve adds a 56-character node directory to it
        haproxy_private_env("/tmp/pytest-of-root/pytest-49/haproxy0", 1, 2, 3)


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "max_tokens": "5"}, 422, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": True}, 422, "n"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "x", "bogus": 1}, 422, "bogus"),
    ({}, 422, "prompt"),
    ({"prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ([1, 2], 422, None),
])
def test_completion_request_errors(body, status, param):
    with pytest.raises(ApiError) as ei:
        parse_request(CompletionRequest, body)
    e = ei.value
    assert (e.status, e.param) == (status, param)
    assert set(e.body()["error"]) == {"message", "type", "param", "code"}


def test_requests_accept_openai_shapes():
    r = parse_request(CompletionRequest, {"prompt": [[1, 2], [3]], "stop": "\n", "n": 2, "logprobs": 0,
                                          "stream_options": {"include_usage": True}, "top_k": 5})
    assert r.stop == ["\n"] and r.stream_options.include_usage and r.top_k == 5
    c = parse_request(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                              "max_completion_tokens": 4, "response_format": {"type": "text"}})
    assert c.max_completion_tokens == 4
    with pytest.raises(ApiError) as ei:
        parse_request(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "tools": [{}]})
    assert ei.value.status == 400


def test_cli_help_and_user_errors(tmp_path, capsys):
    from pipelines.cli import main

    with pytest.raises(SystemExit) as ei:
        main(["serve", "--help"])
    assert ei.value.code == 0 and "--checkpoint" in capsys.readouterr().out
    # user errors: one line, exit 2, no Ray started
    assert main(["serve", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "not a raygpt checkpoint directory" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path), "limits.max_n=0"]) == 2
    assert "limits.max_n must be >= 1" in capsys.readouterr().err


def test_api_keys_from_file_and_environment(tmp_path, monkeypatch):
    from pipelines.serve.app import key_matches, load_api_keys
    from pipelines.serve.config import AuthSettings

    f = tmp_path / "keys.txt"
    f.write_text("# comment\nsk-file-1\n\n  sk-file-2  \n")
    monkeypatch.setenv("MY_KEYS", "sk-env-1, sk-env-2,,")
    digests = load_api_keys(AuthSettings(api_keys_file=str(f), api_keys_env="MY_KEYS"))
    assert len(digests) == 4 and all(isinstance(d, bytes) and len(d) == 32 for d in digests)  # sha256 only
    for k in ("sk-file-1", "sk-file-2", "sk-env-2"):
        assert key_matches(k, digests)
    assert not key_matches("sk-file-", digests) and not key_matches("", digests)
    monkeypatch.delenv("MY_KEYS")
    assert load_api_keys(AuthSettings(api_keys_file=None, api_keys_env="MY_KEYS")) == []  # auth off
    with pytest.raises(ConfigError, match="require_keys"):
        load_api_keys(AuthSettings(api_keys_file=None, api_keys_env="MY_KEYS", require_keys=True))
    with pytest.raises(ConfigError, match="does not exist") as ei:
        load_api_keys(AuthSettings(api_keys_file=str(tmp_path / "nope.txt")))
    assert "sk-" not in str(ei.value)


def test_drain_and_testing_hooks():
    from pipelines.config import ConfigError
    from pipelines.serve.config import ServeTesting, load_serve_config, ray_serve_env

    assert ServeConfig(checkpoint="c").drain_s == 5.0
    for bad in ("drain_s=-1", "drain_s=21"):
        with pytest.raises(ConfigError, match="drain_s"):
            load_serve_config(None, ["checkpoint=c", bad])
    # the testing hooks: private HAProxy files and ports, only with ingress haproxy
    t = ServeTesting(haproxy_state_dir="/tmp/x", haproxy_stats_port=1, haproxy_metrics_port=2, fallback_proxy_port=3)
    assert ray_serve_env("haproxy", t)["RAY_SERVE_HAPROXY_STATS_PORT"] == "1"
    assert ray_serve_env("proxy", t) == ray_serve_env("proxy")
    assert ray_serve_env("haproxy", ServeTesting()) == ray_serve_env("haproxy")
    with pytest.raises(ConfigError, match="testing.haproxy_stats_port"):
        ServeTesting(haproxy_state_dir="/tmp/x")
    cfg = load_serve_config(None, ["checkpoint=c", "testing.haproxy_state_dir=/tmp/y", "testing.haproxy_stats_port=5",
                                   "testing.haproxy_metrics_port=6", "testing.fallback_proxy_port=7"])
    assert cfg.testing.haproxy_metrics_port == 6


def test_port_check_names_the_holder():
    import os
    import socket

    from pipelines.errors import UserError
    from pipelines.serve.ports import PortInUseError, check_port_free, is_loopback

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PortInUseError, match=rf"--port {port}: 127.0.0.1:{port} is already in use by pid "
                                                 rf"{os.getpid()} .*another --port") as e:
            check_port_free("127.0.0.1", port, "--port")
        assert isinstance(e.value, UserError)
    check_port_free("127.0.0.1", port, "--port")  # free again
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


def test_haproxy_side_ports_through_ray_compat():
    from pipelines import _ray_compat

    ports = _ray_compat.serve_haproxy_ports()
    assert set(ports) == {"stats", "metrics", "fallback"} and all(isinstance(p, int) and p > 0 for p in ports.values())
