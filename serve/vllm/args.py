"""The per-request arguments the processor reads from ``SamplingParams.extra_args``.

    extra_args = {"sensepack": {"packs": [{"name": "capitals", "version": "3f2a...", "beta": 1.0}, ...],
                                "base_only": False, "request_id": "sp-12"}}

A *forced-scoring* request (Score, the activation gate and the A/B re-scoring through the serving
engine, serve.vllm.scoring) adds ``"score": {"tokens": [...], "prefix_len": N}``: the processor
records the base and packed log-probs of ``tokens[k]`` at the k-th sampled position and forces
that token (serve.vllm.core); ``request_id`` is then required (the records are keyed by it).

The server resolves each request's pack refs to pinned (name, version, β) at admission (pack
manager, same pinning rules as the embedded engine) and sends only these plain values: extra_args
crosses a msgpack boundary (frontend -> engine core), so no tensors. A request without the
"sensepack" key, or with ``base_only: true`` or no packs, is served by the large model alone
(exact skip). Validation raises ``ArgsError`` (a ValueError) naming the offending field; the
shims re-raise it as vLLM's validation error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

KEY = "sensepack"
_TOP_FIELDS = {"packs", "base_only", "request_id", "score"}
_PACK_FIELDS = {"name", "version", "beta"}
_SCORE_FIELDS = {"tokens", "prefix_len", "top_n"}


class ArgsError(ValueError):
    def __init__(self, field: str, message: str, value=None):
        super().__init__(f"extra_args.{field}: {message}")
        self.field = f"extra_args.{field}"
        self.value = value


@dataclass(frozen=True)
class PinnedPack:
    name: str
    version: str
    beta: float

    @property
    def key(self) -> tuple[str, str, float]:
        return (self.name, self.version, float(self.beta))  # == ensemble.edits.PackRef.key


@dataclass(frozen=True)
class ScoreSpec:
    """Forced scoring: the continuation to record and force, after a prompt of `prefix_len` tokens."""

    tokens: tuple[int, ...]
    prefix_len: int
    top_n: int | None = None  # also record each position's rank and top-n tokens (0: the rank alone)


@dataclass(frozen=True)
class RequestPacks:
    packs: tuple[PinnedPack, ...]
    request_id: str | None = None
    score: ScoreSpec | None = None

    @property
    def key(self) -> tuple:
        """== ensemble.edits.pack_key: requests with the same pinned packs share one edit table."""
        return tuple(sorted(p.key for p in self.packs))

    @property
    def edits_anything(self) -> bool:
        return any(p.beta != 0.0 for p in self.packs)


def build_extra_args(
    packs, base_only: bool = False, request_id: str | None = None, score: ScoreSpec | None = None
) -> dict:
    """extra_args for a request: `packs` are PackRef-like (name, version, beta) objects or dicts."""
    out = []
    for p in packs:
        if isinstance(p, dict):
            out.append({"name": str(p["name"]), "version": str(p["version"]), "beta": float(p["beta"])})
        else:
            out.append({"name": str(p.name), "version": str(p.version), "beta": float(p.beta)})
    body: dict[str, Any] = {"packs": out, "base_only": bool(base_only)}
    if request_id is not None:
        body["request_id"] = str(request_id)
    if score is not None:
        spec: dict[str, Any] = {"tokens": [int(t) for t in score.tokens], "prefix_len": int(score.prefix_len)}
        if score.top_n is not None:
            spec["top_n"] = int(score.top_n)
        body["score"] = spec
    return {KEY: body}


def _parse_score(body: dict, rid) -> ScoreSpec | None:
    spec = body.get("score")
    if spec is None:
        return None
    f = f"{KEY}.score"
    if not isinstance(spec, dict):
        raise ArgsError(f, f"must be a mapping with tokens, prefix_len; got {type(spec).__name__}", spec)
    unknown = sorted(set(spec) - _SCORE_FIELDS)
    if unknown:
        raise ArgsError(f"{f}.{unknown[0]}", f"unknown field (allowed: {sorted(_SCORE_FIELDS)})", spec[unknown[0]])
    tokens = spec.get("tokens")
    if not isinstance(tokens, (list, tuple)) or not tokens:
        raise ArgsError(f"{f}.tokens", f"must be a non-empty list of token ids, got {tokens!r}", tokens)
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ArgsError(f"{f}.tokens[{i}]", f"must be a token id (int >= 0), got {t!r}", t)
    n = spec.get("prefix_len")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ArgsError(f"{f}.prefix_len", f"must be an int >= 1, got {n!r}", n)
    top_n = spec.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0):
        raise ArgsError(f"{f}.top_n", f"must be an int >= 0, got {top_n!r}", top_n)
    if rid is None:
        raise ArgsError(f"{KEY}.request_id", "required with score (the records are keyed by it)", rid)
    return ScoreSpec(tuple(tokens), n, top_n)


def parse_extra_args(extra_args) -> RequestPacks | None:
    """Validate and parse; None when the request carries no edits (base model alone)."""
    if extra_args is None:
        return None
    if not isinstance(extra_args, dict):
        raise ArgsError("", f"must be a mapping, got {type(extra_args).__name__}", extra_args)
    if KEY not in extra_args:
        return None
    body = extra_args[KEY]
    if body is None:
        return None
    if not isinstance(body, dict):
        raise ArgsError(KEY, f"must be a mapping, got {type(body).__name__}", body)
    unknown = sorted(set(body) - _TOP_FIELDS)
    if unknown:
        raise ArgsError(f"{KEY}.{unknown[0]}", f"unknown field (allowed: {sorted(_TOP_FIELDS)})", body[unknown[0]])
    base_only = body.get("base_only", False)
    if not isinstance(base_only, bool):
        raise ArgsError(f"{KEY}.base_only", f"must be a bool, got {base_only!r}", base_only)
    rid = body.get("request_id")
    if rid is not None and not isinstance(rid, str):
        raise ArgsError(f"{KEY}.request_id", f"must be a string, got {rid!r}", rid)
    packs = body.get("packs", [])
    if not isinstance(packs, (list, tuple)):
        raise ArgsError(f"{KEY}.packs", f"must be a list, got {type(packs).__name__}", packs)
    if base_only and packs:
        raise ArgsError(f"{KEY}.base_only", "true together with a non-empty packs list", base_only)
    parsed: list[PinnedPack] = []
    seen = set()
    for i, p in enumerate(packs):
        f = f"{KEY}.packs[{i}]"
        if not isinstance(p, dict):
            raise ArgsError(f, f"must be a mapping with name, version, beta; got {type(p).__name__}", p)
        unknown = sorted(set(p) - _PACK_FIELDS)
        if unknown:
            raise ArgsError(f"{f}.{unknown[0]}", "unknown field (allowed: beta, name, version)", p[unknown[0]])
        for name in ("name", "version"):
            v = p.get(name)
            if not isinstance(v, str) or not v or "@" in v or v != v.strip():
                raise ArgsError(
                    f"{f}.{name}", f"must be a non-empty string without '@' or surrounding spaces, got {v!r}", v
                )
        beta = p.get("beta")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)):
            raise ArgsError(f"{f}.beta", f"must be a number, got {beta!r}", beta)
        beta = float(beta)
        if not math.isfinite(beta) or beta < 0:
            raise ArgsError(f"{f}.beta", f"must be finite and >= 0, got {beta!r}", beta)
        if (p["name"], p["version"]) in seen:
            raise ArgsError(f"{f}.name", f"pack {p['name']}@{p['version']} named twice", p["name"])
        seen.add((p["name"], p["version"]))
        parsed.append(PinnedPack(p["name"], p["version"], beta))
    score = _parse_score(body, rid)
    if (base_only or not parsed) and score is None:
        return None
    return RequestPacks(tuple(parsed), rid, score)


def validate_sampling_params(sampling_params) -> None:
    """Both processors' `validate_params` (vLLM's frontend calls it at admission): bad `extra_args` become
    vLLM's own validation error, naming the field, so vLLM refuses that request alone."""
    try:
        parse_extra_args(sampling_params.extra_args)
    except ArgsError as e:
        from vllm.exceptions import VLLMValidationError  # this module stays importable without vLLM

        raise VLLMValidationError(str(e), parameter=e.field, value=e.value) from None
