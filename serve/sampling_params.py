"""How one request's tokens are chosen, when it stops and what it returns: a frozen value that a front-end
builds from its wire format, that validates itself field by field (`validated`), and that travels unchanged to
the embedded sampler (serve.sampler reads it per row) or to vLLM (`to_vllm`).

A front-end fills the fields with what the client sent, its "unset" as the proto's zero (temperature 0 with
`greedy` False samples at 1.0; top_p 0, repetition_penalty 0 and max_new_tokens 0 take their defaults);
`validated` checks each field against the server's limits and returns the value the engine runs.
Errors name the field as the front-end spells it (`names` maps the proto's paths, ``sampling.top_p``, to
``top_p`` for the OpenAI API).

Adding a knob: a field here with its check in `validated` and its vLLM mapping in `to_vllm`, the sampler's use of
it (serve/sampler.py), and the wire formats that carry it (proto + `serve.params.parse_generate`, the HTTP
bodies in serve/http/).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ensemble.vocab import Vocabulary
from serve.errors import InvalidRequest
from serve.structured import ResponseFormat, grammars_for

MAX_SEED = 2**64 - 1  # a uint64, as the proto's field (torch generators take no more)
# vLLM raises temperatures in (0, 0.01) to 0.01 (its numerical floor); their T -> 0 limit, which the
# embedded sampler reaches (temperature 1e-39 samples the argmax), is greedy decoding
VLLM_MIN_TEMPERATURE = 0.01

# Field names in error messages: the proto's paths; a front-end passes its own names for the same fields.
GRPC_FIELDS: dict[str, str] = {}


def finite(field_name: str, x: float) -> float:
    if not math.isfinite(x):
        raise InvalidRequest(field_name, f"must be a finite number, got {x}")
    return float(x)


@dataclass(frozen=True)
class SamplingParams:
    # sampling
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    response_format: ResponseFormat | None = None  # the output is held to this JSON grammar (serve.structured)
    # stopping
    max_new_tokens: int = 32  # 0 (unvalidated): limits.default_max_new_tokens, or the context with until_context
    until_context: bool = False  # max_new_tokens unset means up to the context (OpenAI chat), not the default
    min_new_tokens: int = 0
    stop_sequences: Sequence[str] = ()
    include_stop_sequence: bool = False
    ignore_eos: bool = False
    stop_token_ids: frozenset[int] | Sequence[int] = frozenset()  # a sequence as sent; a frozenset once validated
    # what the response carries
    want_tokens: bool = False
    want_logprobs: bool = False
    top_n: int = 0
    want_input_tokens: bool = False
    want_prompt_logprobs: bool = False
    skip_special_tokens: bool = False  # the text leaves special tokens out (OpenAI front-end default)

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validated(
        self,
        limits: Any,
        vocab: Vocabulary,
        tokenizer: Any,
        prompt_len: int,
        context_len: int,
        prompt_field: str,
        names: dict[str, str] | None = None,
    ) -> SamplingParams:
        """This request's parameters checked against the server's `limits` and the served `vocab`, unset
        fields given their defaults. `prompt_len` tokens of prompt (`prompt_field` names it) must leave room
        for max_new_tokens in `context_len`."""
        names = names or GRPC_FIELDS

        def n(key: str) -> str:
            return names.get(key, key)

        def bad(key: str, message: str) -> InvalidRequest:
            return InvalidRequest(n(key), message)

        greedy = self.greedy
        temperature = finite(n("sampling.temperature"), self.temperature)
        if temperature < 0 or temperature > limits.max_temperature:
            raise bad("sampling.temperature", f"must lie in [0, {limits.max_temperature}], got {temperature}")
        if not greedy and temperature == 0:
            temperature = 1.0
        if self.top_k < 0 or self.top_k > vocab.size:
            raise bad("sampling.top_k", f"must lie in [0, {vocab.size}], got {self.top_k}")
        top_p = finite(n("sampling.top_p"), self.top_p)
        if top_p < 0 or top_p > 1:
            raise bad("sampling.top_p", f"must lie in [0, 1], got {top_p}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise bad("sampling.seed", f"must lie in [0, 2**64 - 1], got {self.seed}")
        max_new = self._max_new_tokens(limits, prompt_len, context_len, prompt_field, n)
        if self.min_new_tokens < 0 or self.min_new_tokens > max_new:
            raise bad(
                "stopping.min_new_tokens", f"must lie in [0, max_new_tokens={max_new}], got {self.min_new_tokens}"
            )
        f_stop = n("stopping.stop_sequences")
        if len(self.stop_sequences) > limits.max_stop_sequences:
            raise InvalidRequest(f_stop, f"{len(self.stop_sequences)} given, limit {limits.max_stop_sequences}")
        for i, seq in enumerate(self.stop_sequences):
            if not seq:
                raise InvalidRequest(f"{f_stop}[{i}]", "empty stop sequence")
            if len(seq) > limits.max_stop_sequence_chars:
                raise InvalidRequest(f"{f_stop}[{i}]", f"longer than {limits.max_stop_sequence_chars} characters")
        if self.top_n < 0 or self.top_n > limits.max_top_n_tokens:
            raise bad("response.top_n_tokens", f"must lie in [0, {limits.max_top_n_tokens}], got {self.top_n}")

        rep_pen = finite(n("sampling.repetition_penalty"), self.repetition_penalty) or 1.0
        if not 0 < rep_pen <= 10:
            raise bad("sampling.repetition_penalty", f"must lie in (0, 10] (0: off), got {rep_pen}")
        pres = finite(n("sampling.presence_penalty"), self.presence_penalty)
        freq = finite(n("sampling.frequency_penalty"), self.frequency_penalty)
        for key, v in (("sampling.presence_penalty", pres), ("sampling.frequency_penalty", freq)):
            if not -2 <= v <= 2:
                raise bad(key, f"must lie in [-2, 2], got {v}")
        min_p = finite(n("sampling.min_p"), self.min_p)
        if not 0 <= min_p <= 1:
            raise bad("sampling.min_p", f"must lie in [0, 1], got {min_p}")
        bias = self._logit_bias(limits, vocab, n("sampling.logit_bias"))
        f_sti = n("stopping.stop_token_ids")
        if len(self.stop_token_ids) > limits.max_stop_token_ids:
            raise InvalidRequest(f_sti, f"{len(self.stop_token_ids)} given, limit {limits.max_stop_token_ids}")
        for i, t in enumerate(self.stop_token_ids):
            if not vocab.contains(t):
                raise InvalidRequest(f"{f_sti}[{i}]", f"token id {t} outside the shared vocabulary [0, {vocab.size})")
        if self.response_format is not None:
            grammars_for(tokenizer, vocab.size).check(self.response_format, n("response_format"))

        return replace(
            self,
            temperature=temperature if not greedy else 1.0,
            top_k=int(self.top_k),
            top_p=top_p if top_p > 0 else 1.0,
            seed=None if self.seed is None else int(self.seed),
            repetition_penalty=rep_pen,
            presence_penalty=pres,
            frequency_penalty=freq,
            min_p=min_p,
            logit_bias=bias,
            max_new_tokens=max_new,
            until_context=False,
            stop_sequences=tuple(self.stop_sequences),
            stop_token_ids=frozenset(int(t) for t in self.stop_token_ids),
            want_tokens=self.want_tokens or self.want_logprobs or self.top_n > 0,
        )

    def _logit_bias(self, limits: Any, vocab: Vocabulary, f_bias: str) -> dict[int, float]:
        if len(self.logit_bias) > limits.max_logit_bias:
            raise InvalidRequest(f_bias, f"{len(self.logit_bias)} entries, limit {limits.max_logit_bias}")
        bias = {}
        for t, v in sorted(self.logit_bias.items()):
            f = f"{f_bias}[{t}]"
            if not vocab.contains(t):
                raise InvalidRequest(f, f"token id {t} outside the shared vocabulary [0, {vocab.size})")
            v = finite(f, v)
            if not -100 <= v <= 100:
                raise InvalidRequest(f, f"must lie in [-100, 100], got {v}")
            bias[int(t)] = v
        return bias

    def _max_new_tokens(self, limits: Any, prompt_len: int, context_len: int, prompt_field: str, n: Any) -> int:
        f_max = n("stopping.max_new_tokens")
        if self.max_new_tokens < 0:
            raise InvalidRequest(f_max, f"must be >= 0, got {self.max_new_tokens}")
        budget = limits.max_batched_tokens
        if self.until_context and not self.max_new_tokens:  # to EOS or the context, within limits.max_new_tokens
            room = min(context_len, budget if budget is not None else context_len) - prompt_len
            if room < 1:
                raise InvalidRequest(
                    prompt_field,
                    f"prompt ({prompt_len} tokens) leaves no room to generate in the model context ({context_len})",
                )
            max_new = min(limits.max_new_tokens, room)
        else:
            max_new = self.max_new_tokens or limits.default_max_new_tokens
        if max_new > limits.max_new_tokens:
            raise InvalidRequest(f_max, f"{max_new} above the limit {limits.max_new_tokens}")
        if prompt_len + max_new > context_len:
            raise InvalidRequest(
                f_max,
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) exceeds the model context ({context_len})",
            )
        if budget is not None and prompt_len + max_new > budget:
            raise InvalidRequest(
                f_max,
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) exceeds "
                f"limits.max_batched_tokens ({budget})",
            )
        return max_new

    def to_vllm(self, seed: int | None, extra_args: dict[str, Any]) -> Any:
        """vllm.SamplingParams of these (validated) parameters: the same sampling and stopping as the embedded
        sampler; `seed` the request's (drawn when the client gave none), `extra_args` for the sensepack
        logits processor."""
        from vllm import SamplingParams as VllmSamplingParams

        n_lp = max(self.top_n, 1) if (self.want_logprobs or self.top_n) else None
        kw: dict[str, Any] = dict(
            max_tokens=self.max_new_tokens,
            min_tokens=self.min_new_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=n_lp,
            extra_args=extra_args,
            stop_token_ids=sorted(self.stop_token_ids) or None,
            detokenize=False,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            min_p=self.min_p,
            logit_bias=dict(self.logit_bias) or None,
        )
        if self.response_format is not None:  # vLLM's own structured outputs, applied after the sensepack processor
            kw.update(structured_outputs=self.response_format.to_vllm())
        if self.greedy or self.temperature < VLLM_MIN_TEMPERATURE:
            kw.update(temperature=0.0)
        else:
            kw.update(temperature=self.temperature, top_k=self.top_k or 0, top_p=self.top_p, seed=seed)
        return VllmSamplingParams(**kw)
