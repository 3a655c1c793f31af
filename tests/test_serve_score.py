"""Score in bounded memory: chunked projection with logsumexp against a
float64 reference, the sliding-window path, stopping between chunks, the
deadline, and Score counted by admission."""

from __future__ import annotations

import grpc
import pytest
import torch

from ensemble.delta import sequence_deltas
from ensemble.edits import PackRef
from ensemble.large_batch import full_logits
from sensepack_proto import pb_grpc
from sensepack_testing.serve import channel, demo_served, demo_variant, wait_until
from serve.client import Client, build_generate_request
from serve.scoring import ScoreAbandoned, score_row

V = 50257


def _reference64(ens, prefix, cont, pk):
    """log p of each continuation token in float64 from the full (L, V) logits: the naive formula."""
    row = prefix + cont
    z = full_logits(ens.large, [row])[0][:, :V].double()
    if pk is not None:
        _, ed = ens.combined_edits([pk])
        bp, ids = ens.backpack, torch.tensor([row])
        z = z + sequence_deltas(bp.contextualize(ids), ids, ed)[0].double() @ bp.embedding[:V].double().T
    lp = torch.log_softmax(z, -1)[len(prefix) - 1 : len(row) - 1]
    return lp.gather(1, torch.tensor(cont)[:, None]).squeeze(1)


def test_chunked_score_equals_float64_reference():
    served = demo_served()
    ens, tok = served.ensemble, served.tokenizer
    pk = PackRef("capitals", "v", demo_variant(served, " Paris"), 1.0)
    prefix = tok("The capital of Mauritius is", add_special_tokens=False)["input_ids"]
    cont = tok(" Port Louis, and Mauritius is an island." * 8, add_special_tokens=False)["input_ids"][:100]
    assert len(prefix + cont) <= ens.backpack.config.n_positions
    ref_base, ref_packed = _reference64(ens, prefix, cont, None).tolist(), _reference64(ens, prefix, cont, pk).tolist()
    for chunk in (7, 128):  # a ragged last chunk, and one chunk for the whole row
        base, packed = score_row(ens, prefix, cont, [pk], True, True, chunk=chunk)
        assert base.tolist() == pytest.approx(ref_base, rel=1e-6, abs=2e-6)
        assert packed.tolist() == pytest.approx(ref_packed, rel=1e-6, abs=2e-6)
    # past the Backpack's window: the core's sliding-window path
    long = cont + cont[:30]
    _, packed = score_row(ens, prefix, long, [pk], False, True, chunk=16)
    assert packed.tolist() == pytest.approx(ens.score([prefix], [long], [[pk]])[0].tolist(), abs=3e-5)


def test_score_stops_between_chunks():
    served = demo_served()
    calls = []

    def stop_after_three():
        calls.append(1)
        if len(calls) > 3:
            raise ScoreAbandoned()

    with pytest.raises(ScoreAbandoned):
        score_row(served.ensemble, [1, 2, 3], list(range(10, 60)), [], True, False, stop_after_three, chunk=10)
    assert len(calls) == 4  # before the model, then before each chunk: the 3rd chunk never ran


SERVER_CONFIG = {
    "limits.max_running": 1,
    "limits.max_waiting": 0,
    "limits.max_new_tokens": 2000,
    "limits.max_prompt_tokens": 1024,
}


def test_score_is_counted_by_admission(server):
    stub = pb_grpc.GenerationServiceStub(channel(server))
    c = Client(f"127.0.0.1:{server.port}")
    long = stub.GenerateStream(build_generate_request("Hello", base_only=True, max_new_tokens=2000, ignore_eos=True))
    next(long)
    next(long)
    with pytest.raises(grpc.RpcError) as ei:
        c.score("The capital is", [" Paris"])
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full: 1 running, 0 waiting, 0 scoring" in ei.value.details()
    long.cancel()
    assert wait_until(lambda: server.engine.running == 0)
    assert len(c.score("The capital is", [" Paris"]).continuations) == 1


def test_score_deadline_frees_the_engine(server):
    c = Client(f"127.0.0.1:{server.port}")
    conts = [list(range(1000 + i, 2000 + i)) for i in range(64)]
    with pytest.raises(grpc.RpcError) as ei:
        c.score(list(range(100, 124)), conts, packs=["capitals"], include_base=True, timeout=0.3)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the server gives up between chunks: the Score leaves admission and the engine serves again
    assert wait_until(lambda: server.engine.scoring == 0, timeout=120)
    assert c.generate("Hi", base_only=True, max_new_tokens=2).generated_token_count == 2
