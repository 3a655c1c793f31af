"""Request validation at the boundary: proto message -> one validated dataclass.

Every problem raises `serve.errors.InvalidRequest` with a message that
starts with the offending field (``sampling.top_p: must lie in [0, 1], got 1.5``).
Pack references are checked for syntax here; resolving them (NOT_FOUND,
FAILED_PRECONDITION, β range) is the pack manager's job.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

from edits_store import InvalidReferenceError, parse_pack_reference
from ensemble.vocab import Vocabulary
from sensepack_proto import pb
from serve.errors import InvalidRequest
from serve.structured import ResponseFormat, grammars_for

MAX_REQUEST_ID = 256
MAX_TEXT_CHARS = 1_000_000
MAX_SEED = 2**64 - 1  # a uint64, as the proto's field (torch generators take no more)


def invalid(field_name: str, message: str) -> InvalidRequest:
    return InvalidRequest(field_name, message)


@dataclass(frozen=True)
class PackRequest:
    ref: str
    name: str
    tag: str | None  # version or alias; None: the active version
    beta: float | None
    field: str  # "packs[0]" for error messages


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
    skip_special_tokens: bool = False  # the text leaves special tokens out (OpenAI front-end default)
    response_format: ResponseFormat | None = None  # the output is held to this JSON grammar (serve.structured)

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
    """specs: (ref, beta or None) pairs, in request order."""
    specs = list(specs)
    if base_only and specs:
        raise invalid("base_only", f"base_only excludes packs, but {len(specs)} pack(s) are named")
    if len(specs) > limits.max_packs_per_request:
        raise invalid(prefix, f"{len(specs)} packs named, limit {limits.max_packs_per_request}")
    out, seen = [], set()
    for i, (ref, beta) in enumerate(specs):
        f = f"{prefix}[{i}]"
        name, tag = parse_pack_ref(ref, f + ".ref")
        if name in seen:
            raise invalid(f + ".ref", f"pack {name!r} is named twice")
        seen.add(name)
        if beta is not None:
            beta = _finite(f + ".beta", beta)
            if beta < 0:
                raise invalid(f + ".beta", f"must be >= 0, got {beta}")
        out.append(PackRequest(ref, name, tag, beta, f))
    return out


def _pb_packs(specs) -> list[tuple[str, float | None]]:
    return [(s.ref, s.beta if s.HasField("beta") else None) for s in specs]


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


def check_unicode(text: str, field_name: str) -> None:
    """A text must be encodable as UTF-8: a lone surrogate (JSON's ``"\\ud800"``) is the client's mistake."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise invalid(field_name, f"not valid Unicode: {e.reason} at character {e.start}") from None


def _tokenize_text(tokenizer, text: str, field_name: str, max_len: int, what: str) -> list[int]:
    if not text:
        raise invalid(field_name, f"empty {what}")
    if len(text) > MAX_TEXT_CHARS:
        raise invalid(field_name, f"{what} has {len(text)} characters, limit {MAX_TEXT_CHARS}")
    # refused before tokenizing (which costs the engine's CPU): a text longer than this cannot fit max_len
    cap = max_len * max_token_chars(tokenizer)
    if len(text) > cap:
        raise invalid(
            field_name,
            f"{what} has {len(text)} characters: more than {max_len} tokens "
            f"(limit {max_len}; a token spans at most {cap // max_len} characters)",
        )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise invalid(field_name, f"{what} tokenizes to no tokens")
    if len(ids) > max_len:
        raise invalid(field_name, f"{what} has {len(ids)} tokens, limit {max_len}")
    return list(ids)


def _request_id(rid: str, field_name: str = "request_id") -> str:
    """The client's id, or a fresh one: every request needs a key for logs and the A/B split."""
    if len(rid) > MAX_REQUEST_ID:
        raise invalid(field_name, f"longer than {MAX_REQUEST_ID} characters")
    return rid or uuid.uuid4().hex


def _input_ids(req, oneof: str, text_field: str, ids_field: str, what: str, tokenizer, limit: int, vocab: Vocabulary):
    """The request's text (tokenized) or token ids, whichever the `oneof` holds: (field set, ids)."""
    which = req.WhichOneof(oneof)
    if which is None:
        raise invalid(oneof, f"a {what} is required: set {text_field} or {ids_field}")
    if which == text_field:
        return which, _tokenize_text(tokenizer, getattr(req, text_field), text_field, limit, what)
    return which, _check_ids(getattr(req, ids_field).ids, f"{ids_field}.ids", limit, what, vocab)


@dataclass
class GenerateInput:
    """A generation request as a front-end received it, before validation (the proto's groups, flat).

    `max_new_tokens` 0 takes limits.default_max_new_tokens; `temperature` 0 with `greedy` False samples
    at 1.0 (the proto's rule; the HTTP front-end maps OpenAI's temperature 0 to greedy itself)."""

    request_id: str = ""
    text: str | None = None
    prompt_ids: list[int] | None = None
    greedy: bool = True
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 0
    min_new_tokens: int = 0
    stop_sequences: list[str] = field(default_factory=list)
    include_stop_sequence: bool = False
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    want_tokens: bool = False
    want_logprobs: bool = False
    top_n: int = 0
    want_input_tokens: bool = False
    want_prompt_logprobs: bool = False
    repetition_penalty: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    packs: list[tuple[str, float | None]] = field(default_factory=list)
    base_only: bool = False
    ab_key: str = ""
    skip_special_tokens: bool = False
    until_context: bool = False  # max_new_tokens unset means up to the context (OpenAI chat), not the default
    response_format: ResponseFormat | None = None


# Field names in error messages: the proto's paths; a front-end passes its own names for the same fields.
GRPC_FIELDS: dict[str, str] = {}


def validate_generation(
    g: GenerateInput, tokenizer, limits, context_len: int, vocab: Vocabulary, names: dict[str, str] | None = None
) -> GenerationRequest:
    """The one validation of a generation request, whichever front-end it came from. `names` maps the
    proto's field paths (``sampling.top_p``) to the front-end's (``top_p``) in error messages."""
    names = names or GRPC_FIELDS

    def n(key: str) -> str:
        return names.get(key, key)

    rid = _request_id(g.request_id, n("request_id"))
    if g.text is not None:
        which = "text"
        prompt = _tokenize_text(tokenizer, g.text, n("text"), limits.max_prompt_tokens, "prompt")
    elif g.prompt_ids is not None:
        which = "token_ids"
        prompt = _check_ids(g.prompt_ids, n("token_ids.ids"), limits.max_prompt_tokens, "prompt", vocab)
    else:
        raise invalid(n("input"), "a prompt is required: set text or token_ids")

    greedy = g.greedy
    temperature = _finite(n("sampling.temperature"), g.temperature)
    if temperature < 0 or temperature > limits.max_temperature:
        raise invalid(n("sampling.temperature"), f"must lie in [0, {limits.max_temperature}], got {temperature}")
    if not greedy and temperature == 0:
        temperature = 1.0
    if g.top_k < 0 or g.top_k > vocab.size:
        raise invalid(n("sampling.top_k"), f"must lie in [0, {vocab.size}], got {g.top_k}")
    top_p = _finite(n("sampling.top_p"), g.top_p)
    if top_p < 0 or top_p > 1:
        raise invalid(n("sampling.top_p"), f"must lie in [0, 1], got {top_p}")
    seed = None
    if g.seed is not None:
        if not 0 <= g.seed <= MAX_SEED:
            raise invalid(n("sampling.seed"), f"must lie in [0, 2**64 - 1], got {g.seed}")
        seed = int(g.seed)

    f_max = n("stopping.max_new_tokens")
    if g.max_new_tokens < 0:
        raise invalid(f_max, f"must be >= 0, got {g.max_new_tokens}")
    budget = limits.max_batched_tokens
    if g.until_context and not g.max_new_tokens:  # to EOS or the context, within limits.max_new_tokens
        room = min(context_len, budget if budget is not None else context_len) - len(prompt)
        if room < 1:
            raise invalid(
                n("text") if which == "text" else n("token_ids.ids"),
                f"prompt ({len(prompt)} tokens) leaves no room to generate in the model context ({context_len})",
            )
        max_new = min(limits.max_new_tokens, room)
    else:
        max_new = g.max_new_tokens or limits.default_max_new_tokens
    if max_new > limits.max_new_tokens:
        raise invalid(f_max, f"{max_new} above the limit {limits.max_new_tokens}")
    if len(prompt) + max_new > context_len:
        raise invalid(
            f_max,
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new}) exceeds the model context ({context_len})",
        )
    if budget is not None and len(prompt) + max_new > budget:
        raise invalid(
            f_max,
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new}) exceeds limits.max_batched_tokens ({budget})",
        )
    if g.min_new_tokens < 0 or g.min_new_tokens > max_new:
        raise invalid(
            n("stopping.min_new_tokens"), f"must lie in [0, max_new_tokens={max_new}], got {g.min_new_tokens}"
        )
    stops = list(g.stop_sequences)
    f_stop = n("stopping.stop_sequences")
    if len(stops) > limits.max_stop_sequences:
        raise invalid(f_stop, f"{len(stops)} given, limit {limits.max_stop_sequences}")
    for i, seq in enumerate(stops):
        if not seq:
            raise invalid(f"{f_stop}[{i}]", "empty stop sequence")
        if len(seq) > limits.max_stop_sequence_chars:
            raise invalid(f"{f_stop}[{i}]", f"longer than {limits.max_stop_sequence_chars} characters")
    if g.top_n < 0 or g.top_n > limits.max_top_n_tokens:
        raise invalid(n("response.top_n_tokens"), f"must lie in [0, {limits.max_top_n_tokens}], got {g.top_n}")

    rep_pen = _finite(n("sampling.repetition_penalty"), g.repetition_penalty) or 1.0
    if not 0 < rep_pen <= 10:
        raise invalid(n("sampling.repetition_penalty"), f"must lie in (0, 10] (0: off), got {rep_pen}")
    pres = _finite(n("sampling.presence_penalty"), g.presence_penalty)
    freq = _finite(n("sampling.frequency_penalty"), g.frequency_penalty)
    for key, v in (("sampling.presence_penalty", pres), ("sampling.frequency_penalty", freq)):
        if not -2 <= v <= 2:
            raise invalid(n(key), f"must lie in [-2, 2], got {v}")
    min_p = _finite(n("sampling.min_p"), g.min_p)
    if not 0 <= min_p <= 1:
        raise invalid(n("sampling.min_p"), f"must lie in [0, 1], got {min_p}")
    f_bias = n("sampling.logit_bias")
    if len(g.logit_bias) > limits.max_logit_bias:
        raise invalid(f_bias, f"{len(g.logit_bias)} entries, limit {limits.max_logit_bias}")
    bias = {}
    for t, v in sorted(g.logit_bias.items()):
        f = f"{f_bias}[{t}]"
        if not vocab.contains(t):
            raise invalid(f, f"token id {t} outside the shared vocabulary [0, {vocab.size})")
        v = _finite(f, v)
        if not -100 <= v <= 100:
            raise invalid(f, f"must lie in [-100, 100], got {v}")
        bias[int(t)] = v
    f_sti = n("stopping.stop_token_ids")
    if len(g.stop_token_ids) > limits.max_stop_token_ids:
        raise invalid(f_sti, f"{len(g.stop_token_ids)} given, limit {limits.max_stop_token_ids}")
    for i, t in enumerate(g.stop_token_ids):
        if not vocab.contains(t):
            raise invalid(f"{f_sti}[{i}]", f"token id {t} outside the shared vocabulary [0, {vocab.size})")

    if g.response_format is not None:
        grammars_for(tokenizer, vocab.size).check(g.response_format, n("response_format"))
    packs = parse_packs(g.packs, limits, g.base_only, prefix=n("packs"))
    if len(g.ab_key) > MAX_REQUEST_ID:
        raise invalid(n("ab_key"), f"longer than {MAX_REQUEST_ID} characters")
    return GenerationRequest(
        request_id=rid,
        prompt_ids=prompt,
        packs=packs,
        base_only=g.base_only,
        greedy=greedy,
        temperature=temperature if not greedy else 1.0,
        top_k=int(g.top_k),
        top_p=top_p if top_p > 0 else 1.0,
        seed=seed,
        max_new_tokens=max_new,
        min_new_tokens=g.min_new_tokens,
        stop_sequences=stops,
        include_stop_sequence=g.include_stop_sequence,
        ignore_eos=g.ignore_eos,
        want_tokens=g.want_tokens or g.want_logprobs or g.top_n > 0,
        want_logprobs=g.want_logprobs,
        top_n=g.top_n,
        want_input_tokens=g.want_input_tokens,
        ab_key=g.ab_key or rid,
        input_field=which,
        repetition_penalty=rep_pen,
        presence_penalty=pres,
        frequency_penalty=freq,
        logit_bias=bias,
        min_p=min_p,
        stop_token_ids=frozenset(int(t) for t in g.stop_token_ids),
        want_prompt_logprobs=g.want_prompt_logprobs,
        skip_special_tokens=g.skip_special_tokens,
        response_format=g.response_format,
    )


def parse_generate(
    req: pb.GenerateRequest, tokenizer, limits, context_len: int, vocab: Vocabulary
) -> GenerationRequest:
    """A gRPC GenerateRequest, validated. `vocab`: the served pairing's (token ids and top_k are bounded
    by its size)."""
    which = req.WhichOneof("input")
    s, st, ro = req.sampling, req.stopping, req.response
    if s.method not in (pb.GREEDY, pb.SAMPLE):
        raise invalid("sampling.method", f"unknown decoding method {s.method}")
    g = GenerateInput(
        request_id=req.request_id,
        text=req.text if which == "text" else None,
        prompt_ids=list(req.token_ids.ids) if which == "token_ids" else None,
        greedy=s.method == pb.GREEDY,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        seed=int(s.seed) if s.HasField("seed") else None,
        max_new_tokens=st.max_new_tokens,
        min_new_tokens=st.min_new_tokens,
        stop_sequences=list(st.stop_sequences),
        include_stop_sequence=st.include_stop_sequence,
        ignore_eos=st.ignore_eos,
        stop_token_ids=list(st.stop_token_ids),
        want_tokens=ro.generated_tokens,
        want_logprobs=ro.token_logprobs,
        top_n=ro.top_n_tokens,
        want_input_tokens=ro.input_tokens,
        want_prompt_logprobs=ro.prompt_logprobs,
        repetition_penalty=s.repetition_penalty,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        min_p=s.min_p,
        logit_bias=dict(s.logit_bias),
        packs=_pb_packs(req.packs),
        base_only=req.base_only,
        ab_key=req.ab_key,
    )
    return validate_generation(g, tokenizer, limits, context_len, vocab)


def parse_score(req: pb.ScoreRequest, tokenizer, limits, context_len: int, vocab: Vocabulary) -> ScoreRequest:
    rid = _request_id(req.request_id)
    _, prefix = _input_ids(
        req, "prefix", "prefix_text", "prefix_token_ids", "prefix", tokenizer, limits.max_prompt_tokens, vocab
    )
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
            raise invalid(
                f, f"prefix + continuation ({len(prefix) + len(ids)} tokens) exceeds the model context ({context_len})"
            )
        if limits.max_batched_tokens is not None and len(prefix) + len(ids) > limits.max_batched_tokens:
            raise invalid(
                f,
                f"prefix + continuation ({len(prefix) + len(ids)} tokens) exceeds "
                f"limits.max_batched_tokens ({limits.max_batched_tokens})",
            )
        conts.append(ids)
    packs = parse_packs(_pb_packs(req.packs), limits)
    return ScoreRequest(rid, prefix, conts, packs, include_base=req.include_base or not packs)
