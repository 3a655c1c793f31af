"""Request validation at the boundary: proto message -> one validated dataclass.

Every problem raises `serve.errors.InvalidRequest` with a message that
starts with the offending field (``sampling.top_p: must lie in [0, 1], got 1.5``).
Pack references are checked for syntax here; resolving them (NOT_FOUND,
FAILED_PRECONDITION, β range) is the pack manager's job.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from edits_store import InvalidReferenceError, PackReference, parse_pack_reference
from ensemble.vocab import Vocabulary
from sensepack_proto import pb
from serve.errors import InvalidRequest
from serve.sampling_params import GRPC_FIELDS, SamplingParams, finite

MAX_REQUEST_ID = 256
MAX_TEXT_CHARS = 1_000_000


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
    """A validated generation request: its prompt and packs, and how its tokens are chosen (`sampling`)."""

    request_id: str
    prompt_ids: list[int]
    packs: list[PackRequest]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    base_only: bool = False
    ab_key: str = ""
    input_field: str = "text"


@dataclass
class ScoreRequest:
    request_id: str
    prefix_ids: list[int]
    continuations: list[list[int]]
    packs: list[PackRequest]
    include_base: bool


def parse_pack_ref(ref: str, field_name: str = "ref") -> PackReference:
    """The store's reference grammar (`edits_store.parse_pack_reference`) at a front-end: its refusal as a
    client error naming the request's field."""
    if not ref:
        raise invalid(field_name, "empty pack reference (expected name, name@version or name@alias)")
    try:
        parsed = parse_pack_reference(ref)  # the store's grammar: what it would refuse is refused here
    except InvalidReferenceError as exc:
        raise invalid(field_name, f"malformed pack reference {ref!r}: {exc.detail}") from None
    return parsed


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
        parsed = parse_pack_ref(ref, f + ".ref")
        name, tag = parsed.name, parsed.selector
        if name in seen:
            raise invalid(f + ".ref", f"pack {name!r} is named twice")
        seen.add(name)
        if beta is not None:
            beta = finite(f + ".beta", beta)
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
    """A generation request as a front-end received it, before validation: `sampling` holds the client's
    values as sent (serve.sampling_params says how unset fields are spelled)."""

    request_id: str = ""
    text: str | None = None
    prompt_ids: list[int] | None = None
    sampling: SamplingParams = field(
        default_factory=lambda: SamplingParams(temperature=0.0, top_p=0.0, max_new_tokens=0)
    )
    packs: list[tuple[str, float | None]] = field(default_factory=list)
    base_only: bool = False
    ab_key: str = ""


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

    prompt_field = n("text") if which == "text" else n("token_ids.ids")
    sampling = g.sampling.validated(limits, vocab, tokenizer, len(prompt), context_len, prompt_field, names)
    packs = parse_packs(g.packs, limits, g.base_only, prefix=n("packs"))
    if len(g.ab_key) > MAX_REQUEST_ID:
        raise invalid(n("ab_key"), f"longer than {MAX_REQUEST_ID} characters")
    return GenerationRequest(
        request_id=rid,
        prompt_ids=prompt,
        packs=packs,
        sampling=sampling,
        base_only=g.base_only,
        ab_key=g.ab_key or rid,
        input_field=which,
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
        sampling=SamplingParams(
            greedy=s.method == pb.GREEDY,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            seed=int(s.seed) if s.HasField("seed") else None,
            repetition_penalty=s.repetition_penalty,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            min_p=s.min_p,
            logit_bias=dict(s.logit_bias),
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
        ),
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
