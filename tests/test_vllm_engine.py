"""VLLMEngine (serve.vllm.engine): the serve engine surface on vLLM, against the embedded reference.

Greedy generations through the engine (with and without packs, several requests in flight) equal
`Ensemble.generate_greedy`; returned logprobs are the ensemble's; stop sequences and cancellation
behave as in the embedded engine. Skipped where vLLM is not installed.
"""

from __future__ import annotations

import math
import queue

import pytest

from tests.vllm_gate import require_vllm

require_vllm()

from ensemble.demo import demo_pack, tiny_backpack  # noqa: E402
from ensemble.ensemble import Ensemble  # noqa: E402
from ensemble.tokenizer import load_tokenizer  # noqa: E402
from sensepack_testing.vllm import save_tiny_gptj  # noqa: E402
from serve import engine as eng  # noqa: E402
from serve import scheduler as sched  # noqa: E402
from serve.config import LimitsConfig  # noqa: E402
from serve.metrics import Metrics  # noqa: E402
from serve.params import GenerationRequest  # noqa: E402
from serve.sampling_params import SamplingParams  # noqa: E402
from serve.vllm.engine import VLLMEngine  # noqa: E402
from serve.vllm.resolver import DictSource  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gptj-engine")
    large = save_tiny_gptj(folder, seed=0)
    tok = load_tokenizer()
    bp = tiny_backpack(0)
    pack = demo_pack(bp, tok)
    metrics = Metrics()
    engine = VLLMEngine(
        dict(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8, seed=0),
        tok,
        LimitsConfig(max_running=4, max_waiting=16),
        metrics,
        backpack=bp,
        pack_source=DictSource({(pack.name, pack.version): pack.edits}),
    )
    engine.start()
    yield dict(engine=engine, ens=Ensemble(large, bp, tok), tok=tok, pack=pack, metrics=metrics)
    engine.stop(0)
    from serve.vllm.resolver import REGISTRY

    REGISTRY.clear()


def _run(seq, timeout=120):
    evs = []
    while True:
        ev = seq.events.get(timeout=timeout)
        evs.append(ev)
        if isinstance(ev, eng.FinishEvent):
            return evs


def _req(i, ids, n, **kw):
    return GenerationRequest(
        request_id=f"r{i}", prompt_ids=ids, packs=[], sampling=SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)
    )


PROMPTS = [
    "The capital of Mauritius is",
    "Mauritius is an island whose capital is",
    "The weather in Paris is",
    "Once upon a time",
    "My favourite island, Mauritius, has",
    "Hello",
]


def test_engine_greedy_equals_embedded(world):
    e, tok, pack = world["engine"], world["tok"], world["pack"]
    prompts = [tok(p).input_ids for p in PROMPTS]
    packs = [[pack], [pack], [], [], [pack], []]
    # 6 > max_running=4
    seqs = [e.submit(_req(i, p, 10), pk) for i, (p, pk) in enumerate(zip(prompts, packs, strict=True))]
    got = [_run(s)[-1] for s in seqs]
    ref = world["ens"].generate_greedy(prompts, packs, 10)
    assert [f.output_ids for f in got] == ref
    assert all(f.reason == sched.MAX_TOKENS for f in got)
    base_ref = world["ens"].generate_greedy(prompts[:2], [[], []], 10)
    assert ref[:2] != base_ref  # the pack changed what was generated
    assert e.running == 0 and e.waiting == 0
    assert world["metrics"].generation_tokens._value.get() >= 60


def test_engine_logprobs_are_the_ensembles(world):
    e, tok, pack = world["engine"], world["tok"], world["pack"]
    ids = tok(PROMPTS[0]).input_ids
    evs = _run(e.submit(_req(0, ids, 4, want_logprobs=True, top_n=3), [pack]))
    toks = [ev.token_id for ev in evs[:-1]] + [evs[-1].last.token_id]
    infos = [(ev.logprob, ev.top) for ev in evs[:-1]] + [(evs[-1].last.logprob, evs[-1].last.top)]
    batch = world["ens"].new_batch()
    batch.add(0, ids, [pack])
    for t, (lp, top) in zip(toks, infos, strict=True):
        ref = batch.logprobs()[0]
        assert math.isclose(lp, float(ref[t]), abs_tol=2e-3)
        ref_top = ref.topk(3)
        assert [i for i, _ in top] == ref_top.indices.tolist()
        batch.append({0: t})


def test_engine_stop_sequence_and_cancel(world):
    e, tok = world["engine"], world["tok"]
    ids = tok(PROMPTS[3]).input_ids
    full = world["ens"].generate_greedy([ids], [[]], 8)[0]
    stop = tok.decode(full[2:4])
    fin = _run(e.submit(_req(1, ids, 8, stop_sequences=[stop]), []))[-1]
    assert fin.reason == sched.STOP_SEQUENCE
    assert fin.output_ids == full[: len(fin.output_ids)] and len(fin.output_ids) <= 4
    seq = e.submit(_req(2, ids, 200), [])
    e.cancel(seq)
    fin = _run(seq)[-1]
    assert fin.reason == sched.CANCELLED
    assert e.running == 0
    with pytest.raises(queue.Empty):
        seq.events.get(timeout=0.2)
