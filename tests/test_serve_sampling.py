"""Sampling parity with vLLM's parameters (repetition / presence / frequency
penalties, logit_bias, min_p, stop token ids, prompt log-probs): the batched
sampler against a naive per-row formula, and the engine's wiring against a
decode loop written here on the core's own batch session."""

from __future__ import annotations

import math

import grpc
import pytest
import torch

from ensemble.vocab import Vocabulary
from sensepack_proto import pb, pb_grpc
from sensepack_testing.serve import channel, demo_served
from serve.client import build_generate_request
from serve.sampler import RowParams, sample
from serve.sampling_params import SamplingParams

PROMPT = "The capital of Mauritius is"
EOS = Vocabulary.gpt2().eos_id  # the sampler masks it only for rows below min_new_tokens


def _adjust(lp: list[float], p: RowParams) -> list[float]:
    """logit_bias, repetition, frequency and presence penalties, one token at a time (float64)."""
    s = list(lp)
    for t, b in (p.sampling.logit_bias or {}).items():
        s[t] += b
    out = p.output_ids or []
    seen = set(p.prompt_ids or []) | set(out)
    for t in range(len(s)):
        if t in seen:
            s[t] = s[t] / p.sampling.repetition_penalty if s[t] > 0 else s[t] * p.sampling.repetition_penalty
        c = out.count(t)
        s[t] -= p.sampling.frequency_penalty * c + p.sampling.presence_penalty * (c > 0)
    return s


def _naive(lp: torch.Tensor, p: RowParams, u: float) -> int:
    s = _adjust(lp.double().tolist(), p)
    if p.sampling.greedy:
        return max(range(len(s)), key=lambda i: s[i])
    m = max(s)
    z = [(v - m) / p.sampling.temperature for v in s]
    keep = [i for i in range(len(z)) if math.exp(z[i]) >= p.sampling.min_p]  # p(v) / max p >= min_p
    keep.sort(key=lambda i: -z[i])
    if p.sampling.top_k:
        kth = sorted((z[i] for i in range(len(z))), reverse=True)[p.sampling.top_k - 1]
        keep = [i for i in keep if z[i] >= kth]
    w = [math.exp(z[i]) for i in keep]
    acc = 0.0
    for i, q in zip(keep, w, strict=True):
        acc += q / sum(w)
        if acc >= u:
            return i
    return keep[-1]


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize(
    "kw",
    [
        dict(repetition_penalty=1.8),
        dict(repetition_penalty=0.5, logit_bias={3: 5.0, 17: -100.0}),
        dict(frequency_penalty=1.5, presence_penalty=-0.5),
        dict(min_p=0.2, temperature=0.7),
        dict(min_p=1.0),
        dict(
            repetition_penalty=1.3,
            frequency_penalty=0.7,
            presence_penalty=0.4,
            logit_bias={0: 2.0},
            min_p=0.05,
            top_k=6,
        ),
    ],
)
def test_adjusted_sampling_matches_naive_formula(kw, greedy):
    g = torch.Generator().manual_seed(1)
    lp = torch.log_softmax(torch.randn(5, 30, generator=g) * 2, dim=-1)
    for seed in range(20):
        rng = torch.Generator().manual_seed(100 + seed)
        prompts = [torch.randint(0, 30, (4,), generator=rng).tolist() for _ in range(5)]
        outs = [
            torch.randint(0, 30, (int(torch.randint(0, 6, (), generator=rng)),), generator=rng).tolist()
            for _ in range(5)
        ]
        params = [
            RowParams(
                SamplingParams(greedy=greedy, **kw),
                generator=torch.Generator().manual_seed(seed * 10 + r),
                prompt_ids=prompts[r],
                output_ids=outs[r],
            )
            for r in range(5)
        ]
        got = [x.token for x in sample(lp, params, EOS)]
        want = [
            _naive(
                lp[r],
                params[r],
                float(torch.rand((), dtype=torch.float64, generator=torch.Generator().manual_seed(seed * 10 + r))),
            )
            for r in range(5)
        ]
        assert got == want


@pytest.fixture(scope="module")
def env(server):
    return {"server": server, "served": demo_served(), "stub": pb_grpc.GenerationServiceStub(channel(server))}


def _request(**kw) -> pb.GenerateRequest:
    sampling = kw.pop("sampling", {})
    stop_ids = kw.pop("stop_token_ids", [])
    req = build_generate_request(PROMPT, tokens=True, ignore_eos=True, **kw)
    for k, v in sampling.items():
        if k == "logit_bias":
            for t, b in v.items():
                req.sampling.logit_bias[t] = b
        else:
            setattr(req.sampling, k, v)
    req.stopping.stop_token_ids.extend(stop_ids)
    return req


def _reference_greedy(env, n, packs, **kw):
    """Greedy decode on the core's batch session with the adjustments applied by `_adjust` (float64)."""
    ens, tok = env["served"].ensemble, env["served"].tokenizer
    prompt = tok(PROMPT, add_special_tokens=False)["input_ids"]
    batch = ens.new_batch()
    batch.add(0, prompt, packs)
    out = []
    for _ in range(n):
        lp = batch.logprobs()[0].float()
        s = _adjust(
            lp.double().tolist(), RowParams(SamplingParams(greedy=True, **kw), prompt_ids=prompt, output_ids=out)
        )
        t = max(range(len(s)), key=lambda i: s[i])
        out.append(t)
        batch.append({0: t})
    return out


def test_penalties_and_bias_through_the_server(env):
    kw = dict(repetition_penalty=1.7, frequency_penalty=0.8, presence_penalty=0.3, logit_bias={11: 1.5, 13: 0.5})
    r = env["stub"].Generate(_request(base_only=True, max_new_tokens=10, sampling=kw))
    assert [t.id for t in r.tokens] == _reference_greedy(env, 10, [], **kw)
    # a +100 bias wins every step
    r = env["stub"].Generate(_request(base_only=True, max_new_tokens=5, sampling={"logit_bias": {4242: 100.0}}))
    assert [t.id for t in r.tokens] == [4242] * 5


def test_stop_token_ids(env):
    plain = [t.id for t in env["stub"].Generate(_request(base_only=True, max_new_tokens=12)).tokens]
    k = next(i for i in range(3, 12) if plain[i] not in plain[:i])
    r = env["stub"].Generate(_request(base_only=True, max_new_tokens=12, stop_token_ids=[plain[k], 50000]))
    assert [t.id for t in r.tokens] == plain[: k + 1] and r.stop_reason == pb.STOP_TOKEN
    req = _request(base_only=True, max_new_tokens=12, stop_token_ids=[plain[k]])
    req.stopping.min_new_tokens = 12  # masked (like EOS) before min_new_tokens
    r = env["stub"].Generate(req)
    assert r.generated_token_count == 12 and plain[k] not in [t.id for t in r.tokens]


def test_prompt_logprobs_equal_core_scoring(env):
    server, served = env["server"], env["served"]
    req = _request(packs=["capitals"], max_new_tokens=2)
    req.response.prompt_logprobs = True
    head = next(env["stub"].GenerateStream(req))
    ids = served.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    pk = server.packs.routes()["capitals"].pack_ref()
    want = served.ensemble.score([ids[:1]], [ids[1:]], [[pk]])[0].double().tolist()
    # float32 log-probs of ~15 nats from a batched prefill vs a lone teacher-forced pass: a few ulps apart
    assert list(head.prompt_logprobs) == pytest.approx(want, abs=3e-5, rel=1e-5)
    assert len(env["stub"].Generate(_request(base_only=True, max_new_tokens=1)).prompt_logprobs) == 0


@pytest.mark.parametrize(
    "field,mutate",
    [
        ("sampling.repetition_penalty", lambda r: setattr(r.sampling, "repetition_penalty", -1.0)),
        ("sampling.repetition_penalty", lambda r: setattr(r.sampling, "repetition_penalty", float("nan"))),
        ("sampling.presence_penalty", lambda r: setattr(r.sampling, "presence_penalty", 2.5)),
        ("sampling.frequency_penalty", lambda r: setattr(r.sampling, "frequency_penalty", -3.0)),
        ("sampling.min_p", lambda r: setattr(r.sampling, "min_p", 1.5)),
        ("sampling.logit_bias[50257]", lambda r: r.sampling.logit_bias.__setitem__(50257, 1.0)),
        ("sampling.logit_bias[5]", lambda r: r.sampling.logit_bias.__setitem__(5, 101.0)),
        ("stopping.stop_token_ids[1]", lambda r: r.stopping.stop_token_ids.extend([5, -1])),
    ],
)
def test_parity_parameters_are_validated(env, field, mutate):
    req = _request(base_only=True, max_new_tokens=2)
    mutate(req)
    with pytest.raises(grpc.RpcError) as ei:
        env["stub"].Generate(req)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and ei.value.details().startswith(field + ":")
