"""No request can hurt another: the batched sampler against a naive per-row
formula, numerically safe sampling for every accepted parameter, and a bad
request among running streams on a live server."""

from __future__ import annotations

import math
import threading

import grpc
import pytest
import torch

from ensemble.vocab import Vocabulary
from sensepack_proto import pb, pb_grpc
from sensepack_testing.serve import channel, demo_served, running_server
from serve.client import build_generate_request
from serve.sampler import RowError, RowParams, sample
from serve.sampling_params import SamplingParams

PROMPT = "The capital of Mauritius is"
EOS = Vocabulary.gpt2().eos_id  # the sampler masks it only for rows below min_new_tokens


def _naive(lp: torch.Tensor, p: RowParams, u: float) -> int:
    """The textbook recipe in float64, one row: softmax(lp/T), top-k, top-p, inverse CDF at u."""
    x = lp.double().tolist()
    if p.sampling.greedy:
        return max(range(len(x)), key=lambda i: x[i])
    m = max(x)
    z = [(v - m) / p.sampling.temperature for v in x]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    if p.sampling.top_k:
        kth = z[order[p.sampling.top_k - 1]]
        order = [i for i in order if z[i] >= kth]
    w = [math.exp(z[i]) for i in order]
    tot = sum(w)
    probs = [v / tot for v in w]
    if p.sampling.top_p < 1.0:
        keep, acc = [], 0.0
        for i, q in zip(order, probs, strict=True):
            if acc >= p.sampling.top_p:
                break
            keep.append(i)
            acc += q
        order = keep
        w = [math.exp(z[i]) for i in order]
        tot = sum(w)
        probs = [v / tot for v in w]
    acc = 0.0
    for i, q in zip(order, probs, strict=True):
        acc += q
        if acc >= u:
            return i
    return order[-1]


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.5, 8, 0.8), (100.0, 0, 1.0)]
)
def test_batched_sampler_matches_naive_formula(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(6, 40, generator=g) * 2, dim=-1)
    for seed in range(30):
        params = [
            RowParams(
                SamplingParams(greedy=(r == 2), temperature=temperature, top_k=top_k, top_p=top_p),
                generator=torch.Generator().manual_seed(seed * 10 + r),
            )
            for r in range(6)
        ]
        got = [s.token for s in sample(lp, params, EOS)]
        want = []
        for r in range(6):
            u = float(torch.rand((), generator=torch.Generator().manual_seed(seed * 10 + r), dtype=torch.float64))
            want.append(_naive(lp[r], params[r], u))
        assert got == want


@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 1e-7, 5e-324])
def test_tiny_temperature_is_the_argmax(temperature):
    lp = torch.log_softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(1)), dim=-1)
    params = [
        RowParams(SamplingParams(greedy=False, temperature=temperature), generator=torch.Generator().manual_seed(r))
        for r in range(3)
    ]
    assert [s.token for s in sample(lp, params, EOS)] == lp.argmax(-1).tolist()


def test_non_finite_row_names_its_row():
    lp = torch.log_softmax(torch.randn(3, 20), dim=-1)
    lp[1, 4] = float("nan")
    with pytest.raises(RowError) as ei:
        sample(lp, [RowParams(SamplingParams(greedy=True))] * 3, EOS)
    assert ei.value.row == 1


def test_a_faulty_row_ends_only_its_request():
    """The embedded runner's sampling: a row with a NaN score gets an error (its request alone ends with
    ERROR); the others get their argmax."""
    import queue

    from serve.engine import sample_isolated
    from serve.params import GenerationRequest
    from serve.scheduler import Sequence

    seqs = [
        Sequence(i, GenerationRequest(request_id=str(i), prompt_ids=[1], packs=[]), [], queue.Queue()) for i in range(3)
    ]
    lp = torch.log_softmax(torch.randn(3, 50257, generator=torch.Generator().manual_seed(2)), dim=-1)
    lp[1, 7] = float("nan")
    outs = sample_isolated(lp, seqs, EOS)
    assert [o.seq_id for o in outs] == [0, 1, 2]
    assert [t.token for t in outs[0].tokens] == [int(lp[0].argmax())]
    assert [t.token for t in outs[2].tokens] == [int(lp[2].argmax())]
    assert outs[1].tokens == [] and "not finite" in outs[1].error and not outs[0].error and not outs[2].error


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("store"), demo_served(), **{"limits.max_new_tokens": 64}) as srv:
        yield srv


def test_tiny_temperature_among_eight_streams(server):
    """Eight streams run; a SAMPLE request at temperature 1e-39 joins them: it gets the greedy tokens (the
    T -> 0 limit), and all eight finish normally with the same tokens as when run alone."""
    stub = pb_grpc.GenerationServiceStub(channel(server))

    def req(**kw):
        return build_generate_request(PROMPT, base_only=True, max_new_tokens=24, ignore_eos=True, tokens=True, **kw)

    alone = [t.id for t in stub.Generate(req()).tokens]
    streams = [stub.GenerateStream(req()) for _ in range(8)]
    for s in streams:
        next(s)  # admitted
    results: list = [None] * 8

    def drain(i):
        results[i] = list(streams[i])

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    bad = stub.Generate(req(greedy=False, temperature=1e-39, seed=7))
    for t in threads:
        t.join()
    assert [t.id for t in bad.tokens] == alone and bad.stop_reason == pb.MAX_TOKENS
    for msgs in results:
        assert msgs[-1].stop_reason == pb.MAX_TOKENS
        assert [t.id for m in msgs for t in m.tokens] == alone


def test_every_accepted_sampling_extreme_is_served(server):
    stub = pb_grpc.GenerationServiceStub(channel(server))
    for temperature, top_k, top_p in [
        (1e-39, 0, 1.0),
        (100.0, 0, 1.0),
        (100.0, 1, 1.0),
        (1.0, 50257, 1e-9),
        (5e-324, 1, 0.0),
        (0.5, 0, 1.0),
    ]:
        r = stub.Generate(
            build_generate_request(
                PROMPT,
                base_only=True,
                greedy=False,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                max_new_tokens=4,
                ignore_eos=True,
                seed=3,
            )
        )
        assert r.generated_token_count == 4
    with pytest.raises(grpc.RpcError) as ei:
        stub.Generate(build_generate_request(PROMPT, base_only=True, greedy=False, temperature=-1e-39))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details().startswith("sampling.temperature:")
