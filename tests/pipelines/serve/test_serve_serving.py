"""The serving logic without Ray or HTTP: a tiny gptcore engine, requests in, OpenAI response objects out.

    .venv/bin/python -m pytest tests/pipelines/serve/test_serve_serving.py -q

Drives pipelines.serve.serving.Serving on the test's own event loop (engine in process), plus the
API-key checks of pipelines.serve.auth. Greedy answers are compared with gptcore's Engine run directly.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from pipelines.serve.auth import authorize, load_api_keys
from pipelines.serve.config import AuthSettings, ServeConfig
from pipelines.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)
from pipelines.serve.serving import Serving


@pytest.fixture
def serving(tiny_ckpt):
    # one per test: the batcher's decode loop lives on the event loop of the test's asyncio.run
    s = Serving.load(ServeConfig(checkpoint=str(tiny_ckpt), engine_process=False, torch_threads=1))
    yield s
    s.close()


def _chunks(data: bytes):
    async def gen():
        yield data
    return gen()


async def _complete(s: Serving, body: dict, chat: bool = False):
    raw = json.dumps(body).encode()
    data = await s.read_json(_chunks(raw), str(len(raw)))
    job = s.prepare(parse_request(ChatCompletionRequest if chat else CompletionRequest, data), chat)
    return job, await s.run(job)


def test_completion_matches_the_engine(serving, tiny_ckpt):
    from gptcore.checkpoint import load_checkpoint
    from gptcore.engine import Engine
    from gptcore.sampling import SamplingParams

    async def go():
        return await _complete(serving, {"prompt": "To be, or", "max_tokens": 8, "temperature": 0})

    _, body = asyncio.run(go())
    assert body["object"] == "text_completion" and body["model"] == tiny_ckpt.name
    (choice,) = body["choices"]
    assert choice["finish_reason"] in ("length", "stop")
    ck = load_checkpoint(tiny_ckpt)
    ref = Engine(ck.model.eval(), ck.tokenizer).generate(["To be, or"], SamplingParams(max_new_tokens=8,
                                                                                       temperature=0.0))
    assert choice["text"] == ref[0].outputs[0].text  # the same greedy tokens as the engine alone
    assert body["usage"]["prompt_tokens"] == len(ck.tokenizer.encode("To be, or"))
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_copy_bias_extension_reaches_the_engine(serving):
    async def go():
        return await _complete(serving, {"prompt": "To be, or", "max_tokens": 4, "temperature": 0,
                                         "copy_bias": 2.5, "num_beams": 2})

    job, body = asyncio.run(go())
    assert job.params.copy_bias == 2.5 and job.params.num_beams == 2
    assert body["usage"]["completion_tokens"] <= 4
    plain = serving.prepare(parse_request(CompletionRequest, {"prompt": "x", "max_tokens": 1}), False)
    assert plain.params.copy_bias == 0.0  # off unless asked for


def test_chat_and_stream(serving):
    async def go():
        _, chat = await _complete(serving, {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4},
                                  chat=True)
        raw = json.dumps({"prompt": "The quick", "max_tokens": 5, "stream": True}).encode()
        job = serving.prepare(parse_request(CompletionRequest, await serving.read_json(_chunks(raw), None)), False)
        events = [e async for e in serving.sse(job, 0.0, "/v1/completions")]
        return chat, events

    chat, events = asyncio.run(go())
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e[len("data: "):]) for e in "".join(events[:-1]).split("\n\n") if e]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 5  # usage on the final chunk


@pytest.mark.parametrize("body, status, code", [
    ({"prompt": "x", "max_tokens": 10_000}, 400, "invalid_value"),
    ({"prompt": "x" * 5000, "max_tokens": 1}, 400, "context_length_exceeded"),
    ({"prompt": "x", "model": "other"}, 404, "model_not_found"),
    ({"prompt": "x", "n": 99}, 400, "invalid_value"),
])
def test_request_errors_are_api_errors(serving, body, status, code):
    async def go():
        raw = json.dumps(body).encode()
        req = parse_request(CompletionRequest, await serving.read_json(_chunks(raw), None))
        serving.check_model(req.model)
        serving.prepare(req, False)

    with pytest.raises(ApiError) as e:
        asyncio.run(go())
    assert (e.value.status, e.value.body()["error"]["code"]) == (status, code)


def test_body_checks(serving):
    async def read(raw: bytes, cl: str | None = None):
        return await serving.read_json(_chunks(raw), cl)

    for raw, cl, status in ((b"", None, 400), (b"\xff", None, 400), (b"{", None, 400), (b"{}", "9999999", 413),
                            (b'{"prompt": "\\ud800"}', None, 400)):
        with pytest.raises(ApiError) as e:
            asyncio.run(read(raw, cl))
        assert e.value.status == status, raw


def test_authorize(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# team\nsk-one\n\nsk-two\n")
    digests = load_api_keys(AuthSettings(api_keys_file=str(keys), api_keys_env=None))
    assert len(digests) == 2
    authorize("Bearer sk-two", digests)
    authorize(None, [])  # no keys configured: open
    for header, code in ((None, "missing_api_key"), ("Basic sk-one", "missing_api_key"),
                         ("Bearer sk-three", "invalid_api_key")):
        with pytest.raises(ApiError) as e:
            authorize(header, digests)
        assert e.value.status == 401 and e.value.body()["error"]["code"] == code
        assert "sk-three" not in json.dumps(e.value.body())  # never echoed
