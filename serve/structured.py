"""Structured outputs (OpenAI's ``response_format``): the output is held to a JSON grammar by masking,
at every step, the tokens the grammar does not allow.

The grammar engine is llguidance (the Guidance project's Rust core, one of vLLM's structured-output
backends): an abi3 CPU wheel with no dependency, a JSON-schema compiler of its own, and an incremental
parser that computes a step's mask over a 50k vocabulary in about 0.1 ms, lazily (no per-schema
index built up front, as outlines-core does; xgrammar pulls in triton and apache-tvm-ffi).

On the embedded engine the mask is applied by the sampler (serve.sampler) to the step's log-probs
*after* the packs' delta, so an edit can only choose among the tokens the grammar allows:

    s[v] = -inf  for every v the grammar forbids after the row's output so far

and each accepted token advances the row's matcher (`GrammarState.accept`). On the vLLM engine the
same `ResponseFormat` becomes vLLM's own structured-output request (`to_vllm`), applied by vLLM after
the sensepack logits processor.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from serve.errors import InvalidRequest

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

MAX_SCHEMA_CHARS = 64_000  # a schema is compiled per request: bounded like any other input
JSON_LAYOUT: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ResponseFormat:
    """A validated response_format that constrains generation (``text`` is no constraint: None)."""

    kind: Literal["json_object", "json_schema"]
    schema_json: str = ""  # json_schema: the schema, canonical JSON (hashable, travels as is)

    @property
    def schema(self) -> dict[str, Any]:
        """The JSON schema the output must satisfy (json_object: any JSON object)."""
        return json.loads(self.schema_json) if self.kind == "json_schema" else {"type": "object"}

    def grammar(self) -> str:
        from llguidance import LLMatcher

        # compact JSON unless the schema's own x-guidance says otherwise: a weak model given free whitespace
        # may spend its whole budget on it
        return LLMatcher.grammar_from_json_schema(self.schema, defaults=JSON_LAYOUT)

    def to_vllm(self) -> Any:
        """vLLM's structured-output request for the same constraint."""
        from vllm.sampling_params import StructuredOutputsParams

        if self.kind == "json_object":  # compact, as on the embedded engine (JSON_LAYOUT)
            return StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
        return StructuredOutputsParams(json=self.schema, disable_any_whitespace=True)


def parse_response_format(kind: str, schema: Any, type_field: str, schema_field: str) -> ResponseFormat | None:
    """The front-end's response_format as a ResponseFormat (None for plain text); errors name the front-end's
    fields. Whether the schema compiles is checked at validation (`Grammars.check`)."""
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind != "json_schema":
        raise InvalidRequest(type_field, f"must be text, json_object or json_schema, got {kind!r}")
    if not isinstance(schema, dict):
        raise InvalidRequest(schema_field, "a JSON schema (an object) is required")
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidRequest(schema_field, f"{len(text)} characters, limit {MAX_SCHEMA_CHARS}")
    return ResponseFormat("json_schema", text)


class Grammars:
    """The served tokenizer as llguidance sees it (built once: ~0.5 s for 50k tokens), and the matchers."""

    def __init__(self, tokenizer, vocab_size: int):
        import llguidance.hf

        self.source = tokenizer  # kept alive: grammars_for keys on its id
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.vocab_size = vocab_size

    def check(self, fmt: ResponseFormat, field_name: str) -> None:
        """InvalidRequest naming the field (the schema's) when llguidance cannot compile the schema."""
        from llguidance import LLMatcher

        try:
            err = LLMatcher.validate_grammar(fmt.grammar(), self.tokenizer)
        except Exception as e:  # noqa: BLE001 - the schema's fault, whatever the compiler raised
            err = f"{type(e).__name__}: {e}"
        if err:
            raise InvalidRequest(field_name, f"cannot be compiled to a grammar: {err.strip()[:500]}")

    def start(self, fmt: ResponseFormat) -> GrammarState:
        from llguidance import LLMatcher

        return GrammarState(LLMatcher(self.tokenizer, fmt.grammar(), log_level=0), self.vocab_size)


class GrammarState:
    """One row's position in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (llguidance.torch's int32 bitmask layout)."""
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, bitmask, row)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ValueError(f"response_format: token {token} is not allowed here ({self.matcher.get_error()})")

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (the row should end)."""
        return bool(self.matcher.is_stopped())


def mask_rows(scores: torch.Tensor, rows: list[int], states: list[GrammarState]) -> None:
    """scores[rows[j], v] = -inf for every v that states[j] does not allow (in place)."""
    from llguidance.torch import allocate_token_bitmask, apply_token_bitmask_inplace

    v = states[0].vocab_size
    bitmask = allocate_token_bitmask(len(rows), v)
    for j, st in enumerate(states):
        st.fill(bitmask, j)
    idx = torch.tensor(rows)
    sub = scores[idx, :v].contiguous()
    apply_token_bitmask_inplace(sub, bitmask)
    scores[idx, :v] = sub


_GRAMMARS: dict[tuple[int, int], Grammars] = {}
_LOCK = threading.Lock()


def grammars_for(tokenizer, vocab_size: int) -> Grammars:
    """The Grammars of a tokenizer (one per served tokenizer and vocabulary, built on first use)."""
    key = (id(tokenizer), vocab_size)
    with _LOCK:
        if key not in _GRAMMARS:
            _GRAMMARS[key] = Grammars(tokenizer, vocab_size)
        return _GRAMMARS[key]
