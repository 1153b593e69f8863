"""OpenAI API wire format: request/response pydantic models and OpenAI-format error JSON.

    req = parse_request(CompletionRequest, body_dict)     # raises ApiError (400 / 422) on bad input
    ErrorResponse JSON: {"error": {"message", "type", "param", "code"}}

Status codes: 400 a value outside its allowed range (or a feature this model lacks); 422 the body
does not match the schema (wrong type, missing or unknown field); 401 bad API key; 404 unknown model
or route; 408 timeout; 413 body too large. Requests are strict: "max_tokens": "5" is a type error,
not 5, and unknown fields are refused (as OpenAI does) so typos do not pass silently. OpenAI fields
this server cannot honour (logit_bias, presence_penalty != 0, tools, ...) are accepted at their
neutral value and refused with 400 otherwise. Extensions over OpenAI: top_k, repetition_penalty,
copy_bias, no_repeat_ngram_size, num_beams, length_penalty, early_stopping, ignore_eos.

Does not: know the model's limits (pipelines.serve.app checks max_tokens/n/prompt length against
ServeConfig.limits and the context window).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError


class ApiError(Exception):
    """An error answered to the client as OpenAI-format JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _default_type(status)
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def _default_type(status: int) -> str:
    return {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error",
            503: "service_unavailable_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- strict scalar types with one clear error each ------------------------------------------------

def _integer(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, int):
        raise PydanticCustomError("invalid_type", "expected an integer, got {got}", {"got": _json_type(v)})
    return v


def _number(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PydanticCustomError("invalid_type", "expected a number, got {got}", {"got": _json_type(v)})
    if isinstance(v, float) and not math.isfinite(v):
        raise PydanticCustomError("invalid_value", "expected a finite number, got {got}", {"got": repr(v)})
    return v


def _boolean(v: Any) -> Any:
    if not isinstance(v, bool):
        raise PydanticCustomError("invalid_type", "expected a boolean, got {got}", {"got": _json_type(v)})
    return v


def _string(v: Any) -> Any:
    if not isinstance(v, str):
        raise PydanticCustomError("invalid_type", "expected a string, got {got}", {"got": _json_type(v)})
    return v


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


Int = Annotated[int, BeforeValidator(_integer)]
Num = Annotated[float, BeforeValidator(_number)]
Bool = Annotated[bool, BeforeValidator(_boolean)]
Str = Annotated[str, BeforeValidator(_string)]


def _stop_list(v: Any) -> Any:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return v
    raise PydanticCustomError("invalid_type", "expected a string or an array of strings, got {got}",
                              {"got": _json_type(v)})


def _prompt(v: Any) -> Any:
    """OpenAI accepts a string, an array of strings, an array of token ids, or an array of those."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v:
        if all(isinstance(s, str) for s in v):
            return v
        if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return v
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in v):
            return v
    if isinstance(v, list) and not v:
        raise PydanticCustomError("invalid_value", "prompt must not be an empty array")
    raise PydanticCustomError(
        "invalid_type", "expected a string, an array of strings, an array of token ids or an array of "
        "token-id arrays, got {got}", {"got": _json_type(v)})


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Str | None = None  # optional here: one model per server; a wrong name answers 404
    max_tokens: Int | None = None
    temperature: Annotated[Num, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[Num, Field(gt=0.0, le=1.0)] = 1.0
    n: Annotated[Int, Field(ge=1)] = 1
    stream: Bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[list[str], BeforeValidator(_stop_list)] = []
    seed: Int | None = None
    user: Str | None = None
    # OpenAI fields accepted only at their neutral value (checked in unsupported())
    presence_penalty: Annotated[Num, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[Num, Field(ge=-2.0, le=2.0)] = 0.0
    logit_bias: dict[str, Any] | None = None
    # extensions (not in OpenAI's API)
    top_k: Annotated[Int, Field(ge=0)] = 0
    repetition_penalty: Annotated[Num, Field(gt=0.0)] = 1.0
    copy_bias: Num = 0.0  # logits added to the prompt's tokens (gptcore SamplingParams.copy_bias)
    no_repeat_ngram_size: Annotated[Int, Field(ge=0)] = 0
    num_beams: Annotated[Int, Field(ge=1)] = 1
    length_penalty: Num = 1.0
    early_stopping: Bool = False
    ignore_eos: Bool = False

    def unsupported(self) -> tuple[str, str] | None:
        """(param, why) for the first OpenAI feature set to a value this server cannot honour."""
        if self.presence_penalty != 0:
            return "presence_penalty", "presence_penalty is not supported; use repetition_penalty (extension)"
        if self.frequency_penalty != 0:
            return "frequency_penalty", "frequency_penalty is not supported; use repetition_penalty (extension)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: Bool = False


class CompletionRequest(_Request):
    prompt: Annotated[str | list[str] | list[int] | list[list[int]], BeforeValidator(_prompt)]
    logprobs: Annotated[Int, Field(ge=0, le=5)] | None = None
    echo: Bool = False
    best_of: Annotated[Int, Field(ge=1)] | None = None
    suffix: Str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of other than n is not supported; use num_beams (extension) for a search"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        if self.logprobs is not None and self.logprobs > 1:
            return "logprobs", ("only the sampled token's log-probability is available: set logprobs to 0 or 1, "
                                f"got {self.logprobs}")
        return super().unsupported()


class ChatCompletionRequest(_Request):
    messages: list[dict[str, Any]]  # validated by gptcore.chat (roles, text content)
    max_completion_tokens: Int | None = None  # newer name of max_tokens
    logprobs: Bool = False
    top_logprobs: Annotated[Int, Field(ge=0, le=20)] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    parallel_tool_calls: Bool | None = None
    functions: list[Any] | None = None
    function_call: Any | None = None
    metadata: dict[str, Any] | None = None
    store: Bool | None = None
    service_tier: Str | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _messages_list(cls, v: Any) -> Any:
        if not isinstance(v, list) or not all(isinstance(m, dict) for m in v):
            raise PydanticCustomError("invalid_type", "expected an array of message objects, got {got}",
                                      {"got": _json_type(v)})
        return v

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools or self.functions or self.tool_choice not in (None, "none") or \
                self.function_call not in (None, "none"):
            return "tools", "tool and function calling is not supported by this model"
        if self.response_format and self.response_format.get("type") != "text":
            return "response_format", "only response_format {\"type\": \"text\"} is supported"
        if self.top_logprobs:
            return "top_logprobs", ("only the sampled token's log-probability is available: set top_logprobs to 0, "
                                    f"got {self.top_logprobs}")
        if self.max_tokens is not None and self.max_completion_tokens is not None and \
                self.max_tokens != self.max_completion_tokens:
            return "max_completion_tokens", "max_tokens and max_completion_tokens disagree; send one of them"
        return super().unsupported()


_TYPE_ERROR_KINDS = ("invalid_type", "missing", "extra_forbidden", "model_type", "dict_type", "list_type",
                     "model_attributes_type")


def parse_request(cls: type[_Request], data: Any) -> _Request:
    """Validate a decoded JSON body; errors become ApiError 422 (schema) or 400 (values)."""
    if not isinstance(data, dict):
        raise ApiError(422, f"the request body must be a JSON object, got {_json_type(data)}", code="invalid_type")
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and ("[" in x or x in ("function-before",)))]
        param = ".".join(loc) or None
        kind = err["type"]
        msg = err["msg"]
        is_type_error = kind in _TYPE_ERROR_KINDS or kind.endswith("_type") or kind.endswith("_parsing")
        if kind == "extra_forbidden":
            msg, code = f"unrecognized request argument {param!r}", "unknown_parameter"
        elif kind == "missing":
            msg, code = f"missing required parameter {param!r}", "missing_required_parameter"
        elif is_type_error:
            msg, code = f"invalid type for {param!r}: {msg}", "invalid_type"
        else:
            msg, code = f"invalid value for {param!r}: {msg}", "invalid_value"
        raise ApiError(422 if is_type_error else 400, msg, param=param, code=code) from None
    bad = req.unsupported()
    if bad:
        raise ApiError(400, bad[1], param=bad[0], code="unsupported_parameter")
    return req


# ---- responses ------------------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[dict[str, Any]] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "raygpt"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


_Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
