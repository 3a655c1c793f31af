"""Request validation at the boundary: proto message -> one validated dataclass.

Every problem raises `RequestError` with a gRPC status code and a message that
starts with the offending field (``sampling.top_p: must lie in [0, 1], got 1.5``).
Pack references are checked for syntax here; resolving them (NOT_FOUND,
FAILED_PRECONDITION, β range) is the pack manager's job.
"""
from __future__ import annotations

import uuid

import math
from dataclasses import dataclass, field

import grpc

from edits_store import InvalidReferenceError, parse_pack_reference
from ensemble.vocab import Vocabulary
from sensepack_proto import pb

MAX_REQUEST_ID = 256
MAX_TEXT_CHARS = 1_000_000


class RequestError(Exception):
    """A request the server refuses; `code` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}" if field_name else message)
        self.code = code
        self.field = field_name

    @property
    def message(self) -> str:
        return str(self)


def invalid(field_name: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, field_name, message)


@dataclass(frozen=True)
class PackRequest:
    ref: str
    name: str
    tag: str | None          # version or alias; None: the active version
    beta: float | None
    field: str               # "packs[0]" for error messages


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    packs: list[PackRequest]
    base_only: bool = False
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 32
    min_new_tokens: int = 0
    stop_sequences: list[str] = field(default_factory=list)
    include_stop_sequence: bool = False
    ignore_eos: bool = False
    want_tokens: bool = False
    want_logprobs: bool = False
    top_n: int = 0
    want_input_tokens: bool = False
    ab_key: str = ""
    input_field: str = "text"
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_p: float = 0.0
    stop_token_ids: frozenset[int] = frozenset()
    want_prompt_logprobs: bool = False

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class ScoreRequest:
    request_id: str
    prefix_ids: list[int]
    continuations: list[list[int]]
    packs: list[PackRequest]
    include_base: bool


def _finite(field_name: str, x: float) -> float:
    if not math.isfinite(x):
        raise invalid(field_name, f"must be a finite number, got {x}")
    return float(x)


def parse_pack_ref(ref: str, field_name: str = "ref") -> tuple[str, str | None]:
    if not ref:
        raise invalid(field_name, "empty pack reference (expected name, name@version or name@alias)")
    try:
        parsed = parse_pack_reference(ref)  # the store's grammar: what it would refuse is refused here
    except InvalidReferenceError as exc:
        raise invalid(field_name, f"malformed pack reference {ref!r}: {exc.detail}") from None
    return parsed.name, parsed.selector


def parse_packs(specs, limits, base_only: bool = False, prefix: str = "packs") -> list[PackRequest]:
    specs = list(specs)
    if base_only and specs:
        raise invalid("base_only", f"base_only excludes packs, but {len(specs)} pack(s) are named")
    if len(specs) > limits.max_packs_per_request:
        raise invalid(prefix, f"{len(specs)} packs named, limit {limits.max_packs_per_request}")
    out, seen = [], set()
    for i, spec in enumerate(specs):
        f = f"{prefix}[{i}]"
        name, tag = parse_pack_ref(spec.ref, f + ".ref")
        if name in seen:
            raise invalid(f + ".ref", f"pack {name!r} is named twice")
        seen.add(name)
        beta = None
        if spec.HasField("beta"):
            beta = _finite(f + ".beta", spec.beta)
            if beta < 0:
                raise invalid(f + ".beta", f"must be >= 0, got {beta}")
        out.append(PackRequest(spec.ref, name, tag, beta, f))
    return out


def _check_ids(ids, field_name: str, max_len: int, what: str, vocab: Vocabulary) -> list[int]:
    ids = list(ids)
    if not ids:
        raise invalid(field_name, f"empty {what}")
    if len(ids) > max_len:
        raise invalid(field_name, f"{what} has {len(ids)} tokens, limit {max_len}")
    for i, t in enumerate(ids):
        if not vocab.contains(t):
            raise invalid(f"{field_name}[{i}]", f"token id {t} outside the shared vocabulary [0, {vocab.size})")
    return ids


_MAX_TOKEN_CHARS: dict[int, int] = {}


def max_token_chars(tokenizer) -> int:
    """The most characters one token can decode to (byte-level BPE: at most its byte count)."""
    key = id(tokenizer)
    if key not in _MAX_TOKEN_CHARS:
        _MAX_TOKEN_CHARS[key] = max(len(t) for t in tokenizer.get_vocab())
    return _MAX_TOKEN_CHARS[key]


def _tokenize_text(tokenizer, text: str, field_name: str, max_len: int, what: str) -> list[int]:
    if not text:
        raise invalid(field_name, f"empty {what}")
    if len(text) > MAX_TEXT_CHARS:
        raise invalid(field_name, f"{what} has {len(text)} characters, limit {MAX_TEXT_CHARS}")
    # refused before tokenizing (which costs the engine's CPU): a text longer than this cannot fit max_len
    cap = max_len * max_token_chars(tokenizer)
    if len(text) > cap:
        raise invalid(field_name, f"{what} has {len(text)} characters: more than {max_len} tokens "
                                  f"(limit {max_len}; a token spans at most {cap // max_len} characters)")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise invalid(field_name, f"{what} tokenizes to no tokens")
    if len(ids) > max_len:
        raise invalid(field_name, f"{what} has {len(ids)} tokens, limit {max_len}")
    return list(ids)


def _request_id(rid: str) -> str:
    """The client's id, or a fresh one: every request needs a key for logs and the A/B split."""
    if len(rid) > MAX_REQUEST_ID:
        raise invalid("request_id", f"longer than {MAX_REQUEST_ID} characters")
    return rid or uuid.uuid4().hex


def _input_ids(req, oneof: str, text_field: str, ids_field: str, what: str, tokenizer, limit: int, vocab: Vocabulary):
    """The request's text (tokenized) or token ids, whichever the `oneof` holds: (field set, ids)."""
    which = req.WhichOneof(oneof)
    if which is None:
        raise invalid(oneof, f"a {what} is required: set {text_field} or {ids_field}")
    if which == text_field:
        return which, _tokenize_text(tokenizer, getattr(req, text_field), text_field, limit, what)
    return which, _check_ids(getattr(req, ids_field).ids, f"{ids_field}.ids", limit, what, vocab)


def parse_generate(req: pb.GenerateRequest, tokenizer, limits, context_len: int,
                   vocab: Vocabulary) -> GenerationRequest:
    """`vocab`: the served pairing's (token ids and top_k are bounded by its size)."""
    rid = _request_id(req.request_id)
    which, prompt = _input_ids(req, "input", "text", "token_ids", "prompt", tokenizer, limits.max_prompt_tokens, vocab)

    s, st, ro = req.sampling, req.stopping, req.response
    if s.method not in (pb.GREEDY, pb.SAMPLE):
        raise invalid("sampling.method", f"unknown decoding method {s.method}")
    greedy = s.method == pb.GREEDY
    temperature = _finite("sampling.temperature", s.temperature)
    if temperature < 0 or temperature > limits.max_temperature:
        raise invalid("sampling.temperature", f"must lie in [0, {limits.max_temperature}], got {temperature}")
    if not greedy and temperature == 0:
        temperature = 1.0
    if s.top_k < 0 or s.top_k > vocab.size:
        raise invalid("sampling.top_k", f"must lie in [0, {vocab.size}], got {s.top_k}")
    top_p = _finite("sampling.top_p", s.top_p)
    if top_p < 0 or top_p > 1:
        raise invalid("sampling.top_p", f"must lie in [0, 1], got {top_p}")
    seed = None
    if s.HasField("seed"):
        if s.seed < 0:
            raise invalid("sampling.seed", f"must be >= 0, got {s.seed}")
        seed = int(s.seed)

    if st.max_new_tokens < 0:
        raise invalid("stopping.max_new_tokens", f"must be >= 0, got {st.max_new_tokens}")
    max_new = st.max_new_tokens or limits.default_max_new_tokens
    if max_new > limits.max_new_tokens:
        raise invalid("stopping.max_new_tokens", f"{max_new} above the limit {limits.max_new_tokens}")
    if len(prompt) + max_new > context_len:
        raise invalid("stopping.max_new_tokens",
                      f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new}) exceeds the model context ({context_len})")
    budget = limits.max_batched_tokens
    if budget is not None and len(prompt) + max_new > budget:
        raise invalid("stopping.max_new_tokens",
                      f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new}) exceeds limits.max_batched_tokens "
                      f"({budget})")
    if st.min_new_tokens < 0 or st.min_new_tokens > max_new:
        raise invalid("stopping.min_new_tokens", f"must lie in [0, max_new_tokens={max_new}], got {st.min_new_tokens}")
    stops = list(st.stop_sequences)
    if len(stops) > limits.max_stop_sequences:
        raise invalid("stopping.stop_sequences", f"{len(stops)} given, limit {limits.max_stop_sequences}")
    for i, seq in enumerate(stops):
        if not seq:
            raise invalid(f"stopping.stop_sequences[{i}]", "empty stop sequence")
        if len(seq) > limits.max_stop_sequence_chars:
            raise invalid(f"stopping.stop_sequences[{i}]", f"longer than {limits.max_stop_sequence_chars} characters")
    if ro.top_n_tokens < 0 or ro.top_n_tokens > limits.max_top_n_tokens:
        raise invalid("response.top_n_tokens", f"must lie in [0, {limits.max_top_n_tokens}], got {ro.top_n_tokens}")

    rep_pen = _finite("sampling.repetition_penalty", s.repetition_penalty) or 1.0
    if not 0 < rep_pen <= 10:
        raise invalid("sampling.repetition_penalty", f"must lie in (0, 10] (0: off), got {rep_pen}")
    pres = _finite("sampling.presence_penalty", s.presence_penalty)
    freq = _finite("sampling.frequency_penalty", s.frequency_penalty)
    for name, v in (("presence_penalty", pres), ("frequency_penalty", freq)):
        if not -2 <= v <= 2:
            raise invalid(f"sampling.{name}", f"must lie in [-2, 2], got {v}")
    min_p = _finite("sampling.min_p", s.min_p)
    if not 0 <= min_p <= 1:
        raise invalid("sampling.min_p", f"must lie in [0, 1], got {min_p}")
    if len(s.logit_bias) > limits.max_logit_bias:
        raise invalid("sampling.logit_bias", f"{len(s.logit_bias)} entries, limit {limits.max_logit_bias}")
    bias = {}
    for t, v in sorted(s.logit_bias.items()):
        f = f"sampling.logit_bias[{t}]"
        if not vocab.contains(t):
            raise invalid(f, f"token id {t} outside the shared vocabulary [0, {vocab.size})")
        v = _finite(f, v)
        if not -100 <= v <= 100:
            raise invalid(f, f"must lie in [-100, 100], got {v}")
        bias[int(t)] = v
    if len(st.stop_token_ids) > limits.max_stop_token_ids:
        raise invalid("stopping.stop_token_ids", f"{len(st.stop_token_ids)} given, limit {limits.max_stop_token_ids}")
    for i, t in enumerate(st.stop_token_ids):
        if not vocab.contains(t):
            raise invalid(f"stopping.stop_token_ids[{i}]",
                          f"token id {t} outside the shared vocabulary [0, {vocab.size})")

    packs = parse_packs(req.packs, limits, req.base_only)
    if len(req.ab_key) > MAX_REQUEST_ID:
        raise invalid("ab_key", f"longer than {MAX_REQUEST_ID} characters")
    return GenerationRequest(
        request_id=rid, prompt_ids=prompt, packs=packs, base_only=req.base_only,
        greedy=greedy, temperature=temperature if not greedy else 1.0, top_k=int(s.top_k),
        top_p=top_p if top_p > 0 else 1.0, seed=seed,
        max_new_tokens=max_new, min_new_tokens=st.min_new_tokens, stop_sequences=stops,
        include_stop_sequence=st.include_stop_sequence, ignore_eos=st.ignore_eos,
        want_tokens=ro.generated_tokens or ro.token_logprobs or ro.top_n_tokens > 0,
        want_logprobs=ro.token_logprobs, top_n=ro.top_n_tokens, want_input_tokens=ro.input_tokens,
        ab_key=req.ab_key or rid, input_field=which,
        repetition_penalty=rep_pen, presence_penalty=pres, frequency_penalty=freq, logit_bias=bias, min_p=min_p,
        stop_token_ids=frozenset(int(t) for t in st.stop_token_ids), want_prompt_logprobs=ro.prompt_logprobs,
    )


def parse_score(req: pb.ScoreRequest, tokenizer, limits, context_len: int, vocab: Vocabulary) -> ScoreRequest:
    rid = _request_id(req.request_id)
    _, prefix = _input_ids(req, "prefix", "prefix_text", "prefix_token_ids", "prefix", tokenizer,
                           limits.max_prompt_tokens, vocab)
    if not req.continuations:
        raise invalid("continuations", "at least one continuation is required")
    if len(req.continuations) > limits.max_continuations:
        raise invalid("continuations", f"{len(req.continuations)} given, limit {limits.max_continuations}")
    conts = []
    room = context_len - len(prefix)
    for i, c in enumerate(req.continuations):
        kind = c.WhichOneof("value")
        f = f"continuations[{i}]"
        if kind is None:
            raise invalid(f, "set text or token_ids")
        if kind == "text":
            ids = _tokenize_text(tokenizer, c.text, f + ".text", max(room, 1), "continuation")
        else:
            ids = _check_ids(c.token_ids.ids, f + ".token_ids.ids", max(room, 1), "continuation", vocab)
        if len(prefix) + len(ids) > context_len:
            raise invalid(f, f"prefix + continuation ({len(prefix) + len(ids)} tokens) exceeds the model context ({context_len})")
        if limits.max_batched_tokens is not None and len(prefix) + len(ids) > limits.max_batched_tokens:
            raise invalid(f, f"prefix + continuation ({len(prefix) + len(ids)} tokens) exceeds "
                             f"limits.max_batched_tokens ({limits.max_batched_tokens})")
        conts.append(ids)
    packs = parse_packs(req.packs, limits)
    return ScoreRequest(rid, prefix, conts, packs, include_base=req.include_base or not packs)

