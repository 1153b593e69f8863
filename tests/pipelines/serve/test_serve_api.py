"""The OpenAI-compatible endpoint over real HTTP on 127.0.0.1: the official `openai` client, streaming,
n > 1, errors as the client's exception types, API keys (and their absence from logs), limits, the
malformed-input matrix (no 5xx), timeouts (408) and continuous batching across HTTP requests.

    .venv/bin/python -m pytest tests/pipelines/serve/test_serve_api.py -q
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from serve_testlib import deploy_many, undeploy

from pipelines import _ray_compat

pytestmark = pytest.mark.slow

KEY = "sk-raygpt-test-4f1c9d2b7e55a0c3"
OTHER_KEY = "sk-raygpt-wrong-99aa11bb22cc33dd"
MODEL = "tiny"


@pytest.fixture(scope="module")
def apps(serve_port, tiny_ckpt, tmp_path_factory):
    """Three apps deployed together (their replicas start in parallel): "api" with API keys and tight
    limits, "slow" with a 10 ms request timeout (every 240-token request runs past it), "inline" with
    the engine on the replica's event loop instead of in a child process (engine_process false)."""
    keys = tmp_path_factory.mktemp("keys") / "api_keys.txt"
    keys.write_text(f"# raygpt test keys\n{KEY}\n\nsk-second-key-not-used\n")
    common = {"checkpoint": str(tiny_ckpt), "model_name": MODEL, "torch_threads": 1}
    urls = deploy_many({
        "api": {**common, "num_cpus": 0.5, "auth": {"api_keys_file": str(keys), "api_keys_env": None},
                "limits": {"max_prompt_tokens": 64, "max_tokens": 240, "max_n": 4, "max_body_bytes": 20_000},
                "batching": {"max_batch_size": 8}, "request_timeout_s": 30, "stream_interval_s": 0.01},
        "slow": {**common, "num_cpus": 0.25, "request_timeout_s": 0.01, "limits": {"max_tokens": 240},
                 "auth": {"api_keys_env": None}},
        "inline": {**common, "num_cpus": 0.25, "engine_process": False, "auth": {"api_keys_env": None}},
    }, serve_port)
    yield urls
    for name in urls:
        undeploy(name)


@pytest.fixture(scope="module")
def api(apps):
    return apps["api"]


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=api + "/v1", api_key=KEY, max_retries=0, timeout=30)


def _auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def test_completions_chat_models_with_openai_client(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    r = client.completions.create(model=MODEL, prompt="To be, or not", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length" and isinstance(r.choices[0].text, str)
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    # greedy is deterministic
    r2 = client.completions.create(model=MODEL, prompt="To be, or not", max_tokens=8, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert r2.choices[0].text == r.choices[0].text

    c = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "hello there"}],
                                       max_tokens=6, temperature=0)
    assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
    assert c.choices[0].finish_reason in ("stop", "length") and c.usage.prompt_tokens > 0
    assert c.usage.completion_tokens <= 6


def test_streaming_completion_and_chat_match_non_streaming(client, api):
    kw = dict(model=MODEL, prompt="The quick brown", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12

    msgs = [{"role": "user", "content": "hello there"}]
    ref = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    parts = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == ref.choices[0].message.content
    assert parts[-1].choices == [] and parts[-1].usage.completion_tokens == ref.usage.completion_tokens

    # raw wire format: SSE data lines ending with [DONE]
    with httpx.stream("POST", api + "/v1/completions", headers=_auth(), timeout=30,
                      json={"prompt": "hi", "max_tokens": 3, "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_n_choices_prompt_lists_logprobs_echo_and_extensions(client):
    r = client.completions.create(model=MODEL, prompt=["To be", "The cat"], n=3, max_tokens=5, temperature=1.0,
                                  seed=7, extra_body={"ignore_eos": True})
    assert sorted(ch.index for ch in r.choices) == list(range(6))
    assert r.usage.completion_tokens == 30
    streamed = list(client.completions.create(model=MODEL, prompt="To be", n=2, max_tokens=4, stream=True,
                                              extra_body={"ignore_eos": True}))
    assert {ch.choices[0].index for ch in streamed if ch.choices} == {0, 1}

    e = client.completions.create(model=MODEL, prompt="To be", max_tokens=4, temperature=0, echo=True, logprobs=1,
                                  extra_body={"ignore_eos": True})
    ch = e.choices[0]
    assert ch.text.startswith("To be") and len(ch.logprobs.tokens) == 4
    assert all(lp <= 0 for lp in ch.logprobs.token_logprobs)
    assert ch.logprobs.text_offset[0] == len("To be")

    beam = client.completions.create(model=MODEL, prompt="To be", max_tokens=6, n=2,
                                     extra_body={"num_beams": 3, "no_repeat_ngram_size": 2, "ignore_eos": True})
    assert len(beam.choices) == 2
    rp = client.completions.create(model=MODEL, prompt="To be", max_tokens=6, temperature=0.7, top_p=0.9,
                                   extra_body={"top_k": 20, "repetition_penalty": 1.3, "copy_bias": 1.5})
    assert rp.usage.completion_tokens <= 6

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=4, temperature=0.9, logprobs=True)
    assert len(chat.choices) == 2 and chat.choices[0].logprobs.content is not None


def test_errors_surface_as_openai_exception_types(client, api):
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=MODEL, prompt="x", max_tokens=10**9)
    assert ei.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", n=99)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", temperature=-0.5)
    with pytest.raises(openai.BadRequestError) as ei:  # context window: 200 prompt tokens > 64
        client.completions.create(model=MODEL, prompt=[[5] * 200], max_tokens=4)
    assert ei.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as ei:
        client.completions.create(model="gpt-4o", prompt="x")
    assert ei.value.code == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=MODEL, prompt="x", max_tokens="5")  # type: ignore[arg-type]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=api + "/v1", api_key=OTHER_KEY, max_retries=0).models.list()
    with pytest.raises(openai.APIStatusError) as ei:
        client.completions.create(model=MODEL, prompt="x " * 30_000)
    assert ei.value.status_code == 413
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}])


def test_api_keys_guard_every_v1_route_but_not_health(api):
    for method, path in [("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions"), ("GET", "/stats")]:
        for headers in ({}, _auth(OTHER_KEY), {"Authorization": KEY}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {KEY}"}):
            r = httpx.request(method, api + path, headers=headers, json={"prompt": "x"}, timeout=10)
            assert r.status_code == 401, (method, path, headers)
            assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(api + "/health", timeout=10).status_code == 200
    assert httpx.get(api + "/ready", timeout=10).json()["status"] == "ready"
    assert httpx.get(api + f"/v1/models/{MODEL}", headers=_auth(), timeout=10).json()["id"] == MODEL
    assert httpx.get(api + "/v1/models/other", headers=_auth(), timeout=10).status_code == 404


def _ray_log_files() -> list[Path]:

    session = Path(_ray_compat.session_dir())
    return [p for p in (session / "logs").rglob("*") if p.is_file()]


def test_keys_never_appear_in_logs(api, capfd):
    marker = f"/v1/completions?probe={time.time_ns()}"
    for key in (KEY, OTHER_KEY):
        httpx.post(api + marker, headers=_auth(key), json={"prompt": "x", "max_tokens": 2}, timeout=30)
        httpx.post(api + "/v1/chat/completions", headers=_auth(key), content=b"{bad json", timeout=30)
    deadline = time.monotonic() + 15
    seen_marker = False
    while time.monotonic() < deadline and not seen_marker:  # logs are flushed asynchronously
        time.sleep(0.5)
        seen_marker = any("/v1/completions" in p.read_text(errors="replace") for p in _ray_log_files()
                          if "serve" in p.parts)
    assert seen_marker, "the request log lines never showed up: the check below would prove nothing"
    out, err = capfd.readouterr()
    leaks = [str(p) for p in _ray_log_files() if KEY in (t := p.read_text(errors="replace")) or OTHER_KEY in t]
    assert leaks == [] and KEY not in out + err and OTHER_KEY not in out + err


MALFORMED = [
    ("invalid json", b'{"prompt": "x", ', None),
    ("not an object", b'[1, 2, 3]', None),
    ("empty body", b'', None),
    ("wrong type prompt", {"prompt": {"a": 1}}, None),
    ("wrong type max_tokens", {"prompt": "x", "max_tokens": "many"}, None),
    ("wrong type stream", {"prompt": "x", "stream": "yes"}, None),
    ("negative temperature", {"prompt": "x", "temperature": -1}, None),
    ("temperature nan", b'{"prompt": "x", "temperature": NaN}', None),
    ("max_tokens 0", {"prompt": "x", "max_tokens": 0}, None),
    ("max_tokens -1", {"prompt": "x", "max_tokens": -1}, None),
    ("max_tokens 1e9", {"prompt": "x", "max_tokens": 10**9}, None),
    ("max_tokens float", {"prompt": "x", "max_tokens": 2.5}, None),
    ("n 0", {"prompt": "x", "n": 0}, None),
    ("n greedy", {"prompt": "x", "n": 2, "temperature": 0}, None),
    ("empty prompt", {"prompt": "", "max_tokens": 2}, None),
    ("empty prompt list", {"prompt": []}, None),
    ("token id out of range", {"prompt": [10**7]}, None),
    ("oversized prompt", {"prompt": "lorem ipsum " * 400}, None),
    ("huge body", {"prompt": "x" * 50_000}, None),
    ("invalid utf-8", b'{"prompt": "\xff\xfe caf\xe9"}', None),
    ("lone surrogate", b'{"prompt": "\\ud800"}', None),
    ("deep nesting", b'{"prompt": ' + b'[' * 5000 + b']' * 5000 + b'}', None),
    ("nesting below the json limit", b'{"prompt": "x", "logit_bias": {"a": ' + b'[' * 900 + b']' * 900 + b'}}', None),
    ("deep chat content", {"messages": [{"role": "user", "content": [[[[["x"]]]]]}]}, "/v1/chat/completions"),
    ("stop wrong type", {"prompt": "x", "stop": [1, 2]}, None),
    ("too many stops", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, None),
    ("unknown field", {"prompt": "x", "max_tokenz": 3}, None),
    ("beam with sampling", {"prompt": "x", "num_beams": 2, "temperature": 0.5}, None),
    ("chat no messages", {"messages": []}, "/v1/chat/completions"),
    ("chat bad role", {"messages": [{"role": "robot", "content": "x"}]}, "/v1/chat/completions"),
    ("chat content type", {"messages": [{"role": "user", "content": 5}]}, "/v1/chat/completions"),
    ("chat image", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "/v1/chat/completions"),
    ("unknown route", {"prompt": "x"}, "/v1/nope"),
]


def test_malformed_matrix_never_5xx(api):
    results = {}
    for name, body, route in MALFORMED:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(api + (route or "/v1/completions"), headers={**_auth(), "Content-Type": "application/json"},
                       timeout=30, **kw)
        results[name] = r.status_code
        assert r.status_code < 500, (name, r.status_code, r.text)
        if r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], name
    assert results["huge body"] == 413 and results["invalid json"] == 400 and results["invalid utf-8"] == 400
    assert results["wrong type max_tokens"] == 422 and results["unknown route"] == 404
    assert results["empty prompt"] == 200  # conditioned on <|endoftext|>, as GPT-2 samples
    assert all(results[k] == 400 for k in ("max_tokens 0", "max_tokens -1", "max_tokens 1e9", "oversized prompt",
                                           "negative temperature", "lone surrogate"))
    r = httpx.get(api + "/v1/completions", headers=_auth(), timeout=10)
    assert r.status_code == 405 and "error" in r.json()


def test_concurrent_http_requests_share_decode_steps(api):
    """A short request sent while a long one streams finishes first; both decode in the same steps."""
    before = httpx.get(api + "/stats", headers=_auth(), timeout=10).json()
    done: dict[str, float] = {}

    def long_request():
        with httpx.stream("POST", api + "/v1/completions", headers=_auth(), timeout=60,
                          json={"prompt": "To be", "max_tokens": 240, "temperature": 0, "ignore_eos": True,
                                "stream": True}) as resp:
            it = resp.iter_lines()
            first = next(ln for ln in it if ln)  # decoding has started
            started.set_result(first)
            n = sum(1 for ln in it if ln.startswith("data: {"))
        done["long"] = time.monotonic()
        return n

    started: cf.Future = cf.Future()
    with cf.ThreadPoolExecutor(2) as pool:
        fut_long = pool.submit(long_request)
        started.result(timeout=30)
        r = httpx.post(api + "/v1/completions", headers=_auth(), timeout=30,
                       json={"prompt": "The cat", "max_tokens": 3, "temperature": 0, "ignore_eos": True})
        done["short"] = time.monotonic()
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        fut_long.result(timeout=60)
    assert done["short"] < done["long"]
    after = httpx.get(api + "/stats", headers=_auth(), timeout=10).json()
    assert after["multi_steps"] > before["multi_steps"] and after["max_requests_in_step"] >= 2


def test_request_timeout_answers_408(apps):
    base = apps["slow"]
    body = {"prompt": "To be", "max_tokens": 240, "ignore_eos": True}
    with cf.ThreadPoolExecutor(3) as pool:
        codes = list(pool.map(lambda _: httpx.post(base + "/v1/completions", json=body, timeout=30), range(3)))
    assert {r.status_code for r in codes} == {408}
    assert codes[0].json()["error"]["code"] == "timeout"
    # a stream has sent its headers already: the timeout arrives in-band, then [DONE]
    with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, timeout=30) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "timeout"
    with pytest.raises(openai.APIStatusError) as ei:  # the client sees 408 as a status error
        openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0).completions.create(
            model=MODEL, prompt="To be", max_tokens=240, extra_body={"ignore_eos": True})
    assert ei.value.status_code == 408


def test_prometheus_metrics_through_ray(api):
    """Requests, tokens, TTFT, time per output token, queue length and batch size reach Ray's metrics
    exporter (what Prometheus scrapes), tagged with the application."""

    port = _ray_compat.metrics_export_port()
    want = ["raygpt_requests_total", "raygpt_prompt_tokens_total", "raygpt_generation_tokens_total",
            "raygpt_time_to_first_token_seconds_bucket", "raygpt_time_per_output_token_seconds_bucket",
            "raygpt_request_latency_seconds_bucket", "raygpt_queue_length", "raygpt_running_requests",
            "raygpt_batch_size_bucket"]
    missing = want
    deadline = time.monotonic() + 40  # Ray exports every few seconds
    while missing and time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        mine = [ln for ln in text.splitlines() if 'application="api"' in ln]
        missing = [m for m in want if not any(m in ln for ln in mine)]
        if missing:
            time.sleep(1.0)
    assert not missing, missing
    ok = [ln for ln in mine if "raygpt_requests_total" in ln and 'status="200"' in ln]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) > 0


def test_server_timing_header_splits_the_latency(api):
    """Non-streaming answers say where the time went on the server: queue <= engine-inclusive app time <=
    what the client measured; the engine part covers the decode of all requested tokens."""
    t0 = time.perf_counter()
    r = httpx.post(api + "/v1/completions", headers=_auth(), timeout=30,
                   json={"prompt": "To be", "max_tokens": 40, "temperature": 0, "ignore_eos": True})
    client_ms = (time.perf_counter() - t0) * 1e3
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40
    parts = dict(p.strip().split(";dur=") for p in r.headers["server-timing"].split(","))
    assert set(parts) == {"queue", "engine", "app"}
    queue, engine, app = (float(parts[k]) for k in ("queue", "engine", "app"))
    assert 0 <= queue < app and 0 < engine and queue + engine <= app <= client_ms


def test_engine_process_and_inline_engine_answer_alike(apps):
    """The default replica decodes in a child process; engine_process=false decodes on the replica's
    event loop. Same checkpoint, same greedy and seeded requests, streaming or not: same answers."""
    api, inline = apps["api"], apps["inline"]
    s_api = httpx.get(api + "/stats", headers=_auth(), timeout=10).json()
    s_inline = httpx.get(inline + "/stats", timeout=10).json()
    assert s_api["engine_pid"] != s_api["pid"] and s_inline["engine_pid"] == s_inline["pid"]
    for body in ({"prompt": "To be, or not", "max_tokens": 24, "temperature": 0, "ignore_eos": True},
                 {"prompt": "The quick", "max_tokens": 20, "temperature": 0.9, "seed": 5, "n": 2, "logprobs": 1}):
        got = []
        for base, headers in ((api, _auth()), (inline, {})):
            r = httpx.post(base + "/v1/completions", headers=headers, json={**body, "model": MODEL}, timeout=30)
            assert r.status_code == 200, r.text
            got.append([(c["text"], c["logprobs"]["token_logprobs"] if c["logprobs"] else None)
                        for c in r.json()["choices"]])
            text = ""
            with httpx.stream("POST", base + "/v1/completions", headers=headers, timeout=30,
                              json={**body, "model": MODEL, "stream": True, "n": 1}) as st:
                for line in st.iter_lines():
                    if line.startswith("data: {"):
                        text += "".join(c["text"] for c in json.loads(line[6:])["choices"])
            assert text == got[-1][0][0]
        assert got[0] == got[1]
