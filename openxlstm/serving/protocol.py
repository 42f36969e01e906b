"""Request bodies and response shapes of the OpenAI API that ``openxlstm serve`` speaks.

Requests are pydantic models, validated straight from the JSON bytes in strict mode: a field of the wrong
type, a value out of range, NaN or infinity, or a field the model does not know is refused, and
``describe`` turns the first problem into one line. Fields of OpenAI's API that this server does not
implement (logprobs, penalties, tools, ...) are accepted only at their neutral value (a user's ``0`` or
``null``), with a one-line refusal otherwise; ``top_k`` and ``ignore_eos`` are vLLM's extensions.

Responses are plain dicts in OpenAI's shapes (``completion``, ``chat_completion`` and their stream chunks),
built per token without a model class in the way.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_STOPS = 4  # as OpenAI
SEED_MAX = 2**63 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    # OpenAI fields this server does not implement: name -> the values that mean "not used"
    UNSUPPORTED: ClassVar[dict] = {}

    @model_validator(mode="after")
    def _neutral(self):
        for name, neutral in self.UNSUPPORTED.items():
            value = getattr(self, name)
            if value not in neutral:
                raise ValueError(f"{name} is not supported by this server (got {value!r})")
        return self


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """The fields shared by completions and chat completions."""

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Any = ()
    seed: Optional[int] = Field(None, ge=0, le=SEED_MAX)
    ignore_eos: bool = False
    user: Optional[str] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v) -> tuple:
        stops = () if v is None else (v,) if isinstance(v, str) else v
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
            raise ValueError("must be a string or a list of strings")
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("a stop string must not be empty (it would end every choice at once)")
        return tuple(stops)

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


_COMMON_UNSUPPORTED = {"presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {})}


class CompletionRequest(_Sampling):
    """POST /v1/completions. ``prompt``: a string, a list of strings, a list of token ids or a list of lists
    of token ids (several prompts: choice ``k * n + j`` is choice j of prompt k)."""

    UNSUPPORTED: ClassVar[dict] = {**_COMMON_UNSUPPORTED, "logprobs": (None, 0), "echo": (None, False),
                                   "suffix": (None, "")}
    prompt: Any
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v) -> list:
        def ids(row):
            return isinstance(row, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in row)

        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
            return list(v)
        if isinstance(v, list) and v and ids(v):
            return [list(v)]
        if isinstance(v, list) and v and all(ids(p) for p in v):
            return [list(p) for p in v]
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of lists of token ids")

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of is not supported by this server (got {self.best_of}, n is {self.n})")
        return self


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Any = None
    name: Optional[str] = None

    @field_validator("content")
    @classmethod
    def _content(cls, v) -> str:
        if v is None:
            return ""
        if isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(p, dict) for p in v):
            kinds = {p.get("type") for p in v}
            if kinds <= {"text"} and all(isinstance(p.get("text"), str) for p in v):
                return "".join(p["text"] for p in v)
            raise ValueError(f"only text content parts are supported (got types {sorted(map(str, kinds))})")
        raise ValueError("must be a string or a list of {\"type\": \"text\", \"text\": ...} parts")


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions. ``max_completion_tokens`` is OpenAI's newer name of ``max_tokens``."""

    UNSUPPORTED: ClassVar[dict] = {**_COMMON_UNSUPPORTED, "logprobs": (None, False), "top_logprobs": (None, 0),
                                   "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
                                   "function_call": (None, "none"), "parallel_tool_calls": (None, False, True),
                                   "response_format": (None, {"type": "text"})}
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list] = None
    tool_choice: Any = None
    functions: Optional[list] = None
    function_call: Any = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[dict] = None

    @model_validator(mode="after")
    def _one_max(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    @property
    def limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def describe(err: ValidationError, body: type[BaseModel]) -> tuple[str, Optional[str]]:
    """(one-line message, the offending field or None) of a failed validation."""
    e = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in e["loc"])
    kind = e["type"]
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})", None
    if kind == "model_type" and not e["loc"]:
        return "the request body must be a JSON object", None
    if kind == "extra_forbidden":
        fields = ", ".join(n for n in body.model_fields)
        return f"unknown field '{loc}' (the fields of this request: {fields})", e["loc"][0]
    if kind == "missing":
        return f"'{loc}' is required", e["loc"][0]
    msg = e["msg"].removeprefix("Value error, ")
    if not e["loc"]:
        return msg, None
    got = repr(e["input"])
    got = got if len(got) <= 60 else got[:57] + "..."
    return f"'{loc}': {msg} (got {got})", str(e["loc"][0])


# --- responses -------------------------------------------------------------------------------------------
def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, created: int, model: str, texts: list, finishes: list, use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": j, "text": t, "logprobs": None, "finish_reason": f}
                        for j, (t, f) in enumerate(zip(texts, finishes))], "usage": use}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str, finish: Optional[str]) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}


def chat_completion(rid: str, created: int, model: str, texts: list, finishes: list, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": j, "message": {"role": "assistant", "content": t}, "logprobs": None,
                         "finish_reason": f} for j, (t, f) in enumerate(zip(texts, finishes))], "usage": use}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict, finish: Optional[str]) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, created: int, model: str, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def model_card(name: str, created: Optional[int] = None) -> dict:
    return {"id": name, "object": "model", "created": int(created or time.time()), "owned_by": "openxlstm"}


__all__ = ["CompletionRequest", "ChatCompletionRequest", "ChatMessage", "StreamOptions", "describe", "error_body",
           "usage", "completion", "completion_chunk", "chat_completion", "chat_chunk", "usage_chunk", "model_card"]
