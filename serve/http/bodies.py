"""The OpenAI API's request bodies as pydantic models, the strict JSON reader (depth, size, numbers)
and the refusals of fields that would change generation and are not supported.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve import scheduler as sched
from serve.errors import (
    InvalidRequest,
)
from serve.params import (
    check_unicode,
)

log = logging.getLogger("sensepack.http")

# proto field paths (serve.params) -> OpenAI's names, for error messages
OPENAI_FIELDS = {
    "request_id": "x-request-id",
    "text": "prompt",
    "token_ids.ids": "prompt",
    "input": "prompt",
    "sampling.temperature": "temperature",
    "sampling.top_k": "top_k",
    "sampling.top_p": "top_p",
    "sampling.seed": "seed",
    "stopping.max_new_tokens": "max_tokens",
    "stopping.min_new_tokens": "min_tokens",
    "stopping.stop_sequences": "stop",
    "stopping.stop_token_ids": "stop_token_ids",
    "response.top_n_tokens": "logprobs",
    "sampling.repetition_penalty": "repetition_penalty",
    "sampling.presence_penalty": "presence_penalty",
    "sampling.frequency_penalty": "frequency_penalty",
    "sampling.min_p": "min_p",
    "sampling.logit_bias": "logit_bias",
    "packs": "packs",
    "ab_key": "ab_key",
}
COMPLETION_MAX_TOKENS = 16  # an unset max_tokens on /v1/completions (OpenAI's and vLLM's default)
MAX_LISTED = 20  # served models named in a model_not_found error
FINISH_REASONS = {
    sched.MAX_TOKENS: "length",
    sched.EOS_TOKEN: "stop",
    sched.STOP_SEQUENCE: "stop",
    sched.STOP_TOKEN: "stop",
}


# ------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """An OpenAI object: fields sensepack does not know are accepted and ignored (as vLLM does)."""

    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class PackSpec(_Body):
    ref: str
    beta: float | None = None


class JsonSchema(_Open):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


# Fields that would change generation and are not supported: refused by name (everything else unknown
# is ignored). `tools` / `functions` only when a tool may be called (see _refuse).
REFUSED_FIELDS = {
    "guided_regex": "guided decoding",
    "guided_choice": "guided decoding",
    "guided_grammar": "guided decoding",
    "structured_outputs": "structured outputs",
    "allowed_token_ids": "allowed_token_ids",
    "bad_words": "bad_words",
    "truncate_prompt_tokens": "prompt truncation",
    "use_beam_search": "beam search",
    "audio": "audio output",
    "prompt_embeds": "prompt embeddings",
}


class CommonBody(_Open):
    """Fields both endpoints share: OpenAI's, then sensepack's and vLLM's extensions (extra_body)."""

    model: str
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None  # None: 1.0 (OpenAI's default); 0: greedy
    top_p: float | None = None
    max_tokens: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None  # also the A/B key when ab_key is not given
    response_format: ResponseFormat | None = None
    # extensions
    packs: list[str | PackSpec] | None = None
    base_only: bool = False
    ab_key: str | None = None
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False
    skip_special_tokens: bool = True
    # accepted as vLLM does; the served (fast) tokenizers decode without spaces between special tokens
    # either way, as vLLM's fast detokenizer
    spaces_between_special_tokens: bool = True


class CompletionBody(CommonBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    prompt_logprobs: int | None = Field(None, ge=0)  # vLLM's: per prompt token, the token and the top n


class TextPart(_Open):
    type: Literal["text"]
    text: str


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatBody(CommonBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True


AnyBody = CompletionBody | ChatBody


MAX_JSON_DEPTH = 64


def _check_json(obj: Any) -> None:
    """Every string of a request body is valid Unicode and no value nests deeper than MAX_JSON_DEPTH
    (InvalidRequest naming the path): a body's mistakes are 400s before any field is read."""
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    while stack:
        v, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(path or "body", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(v, str):
            check_unicode(v, path or "body")
        elif isinstance(v, dict):
            for k, x in v.items():
                check_unicode(k, f"{path}.{k!a}" if path else "body")
                stack.append((x, f"{path}.{k}" if path else k, depth + 1))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v))


def parse_json(data: bytes) -> Any:
    """A request body as JSON, checked by `_check_json` (InvalidRequest naming what is wrong)."""
    try:
        obj = json.loads(data)
    except RecursionError:
        raise InvalidRequest("body", f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise InvalidRequest("body", f"not valid JSON: {e}") from None
    _check_json(obj)
    return obj


def _loc(err: Any) -> str:
    out = ""
    for part in err["loc"]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = str(part)
        elif part in ("str", "list[str]", "list[int]", "list[list[int]]", "PackSpec", "list[TextPart]"):
            continue  # pydantic's union member names are not fields
        else:
            out += f".{part}"
    return out


def parse_body(cls: type[CommonBody], body: Any) -> Any:
    if not isinstance(body, dict):
        raise InvalidRequest("body", "expected a JSON object")
    try:
        parsed = cls.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = _loc(first)
        msg = "not a field of this object" if first["type"] == "extra_forbidden" else first["msg"]
        raise InvalidRequest(where or "body", msg) from None
    _refuse(parsed)
    ignored = sorted(parsed.model_extra or {})
    if ignored:
        log.debug("fields ignored", extra={"event": "ignored_fields", "fields": ignored})
    return parsed


def _refuse(body: CommonBody) -> None:
    """Refuse, by name, the fields that would change generation in a way sensepack does not serve."""
    extra = body.model_extra or {}
    for name, what in REFUSED_FIELDS.items():
        if extra.get(name) not in (None, False, [], {}):
            raise InvalidRequest(name, f"{what} is not supported by sensepack")
    tool_choice = extra.get("tool_choice")
    if extra.get("tools") and tool_choice not in ("none", None):
        raise InvalidRequest(
            "tools", 'tool calling is not supported by sensepack (send tool_choice: "none", or no tools)'
        )
    if tool_choice not in (None, "none", "auto"):
        raise InvalidRequest("tool_choice", 'tool calling is not supported by sensepack (only "none")')
    if extra.get("functions") and extra.get("function_call") not in ("none", None):
        raise InvalidRequest("functions", "function calling is not supported by sensepack")
    modalities = extra.get("modalities")
    if modalities is not None and (not isinstance(modalities, list) or set(modalities) - {"text"}):
        raise InvalidRequest("modalities", "only text output is supported by sensepack")
    if isinstance(body, ChatBody) and extra.get("echo"):
        raise InvalidRequest("echo", "not supported on chat completions (use /v1/completions)")
    if isinstance(body, ChatBody) and extra.get("prompt_logprobs") is not None:
        raise InvalidRequest("prompt_logprobs", "not supported on chat completions (use /v1/completions)")
