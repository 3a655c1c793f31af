"""vLLM removes requests from its batch and adds them back (not scheduled in a step, or preempted when
its KV cache runs out); the sensepack processor parks their Backpack state and resumes it, so a re-added
request does no new Backpack prefill, and the output stays the embedded engine's, token for token.

A KV cache of 5 blocks of 32 tokens for 4 requests that grow to ~47 tokens forces preemptions. The
engine (VLLMEngine, in-process) exports the processors' counters through vLLM's collective_rpc
(serve.vllm.worker): resumed re-adds, exact skips, Backpack time. Skipped where vLLM is not installed.
"""

from __future__ import annotations

import queue

import pytest

from tests.vllm_gate import require_vllm

require_vllm()

from ensemble import delta  # noqa: E402
from ensemble.demo import demo_pack, tiny_backpack  # noqa: E402
from ensemble.ensemble import Ensemble  # noqa: E402
from ensemble.tokenizer import load_tokenizer  # noqa: E402
from sensepack_testing.vllm import save_tiny_gptj  # noqa: E402
from serve import engine as eng  # noqa: E402
from serve.config import LimitsConfig  # noqa: E402
from serve.metrics import Metrics  # noqa: E402
from serve.params import GenerationRequest  # noqa: E402
from serve.sampling_params import SamplingParams  # noqa: E402
from serve.scheduler import Sequence  # noqa: E402
from serve.vllm.engine import VLLMEngine, sampling_params  # noqa: E402
from serve.vllm.resolver import REGISTRY, DictSource  # noqa: E402

PROMPTS = [
    "The capital of Mauritius is",
    "Mauritius is an island whose capital is",
    "In Mauritius people",
    "My trip to Mauritius was",
]
N = 40


def _run(seq, timeout=300):
    while True:
        ev = seq.events.get(timeout=timeout)
        if isinstance(ev, eng.FinishEvent):
            return ev


def _starved(tmp_path, monkeypatch):
    """A started VLLMEngine whose KV cache (5 blocks of 32 tokens) forces preemptions, the tiny pairing and
    its demo pack, and the list of Backpack prefill sizes (delta.prefill counted)."""
    prefills: list[int] = []
    real = delta.prefill
    monkeypatch.setattr(delta, "prefill", lambda model, windows: prefills.append(len(windows)) or real(model, windows))
    large = save_tiny_gptj(tmp_path / "gptj", seed=0)
    tok = load_tokenizer()
    bp = tiny_backpack(0)
    pack = demo_pack(bp, tok)
    metrics = Metrics()
    engine = VLLMEngine(
        dict(
            model=str(tmp_path / "gptj"),
            dtype="float32",
            enforce_eager=True,
            max_model_len=96,
            max_num_seqs=8,
            block_size=32,
            num_gpu_blocks_override=5,
            seed=0,
        ),
        tok,
        LimitsConfig(max_running=8, max_waiting=8),
        metrics,
        backpack=bp,
        pack_source=DictSource({(pack.name, pack.version): pack.edits}),
    )
    engine.start()
    return engine, large, tok, bp, pack, metrics, prefills


def test_readded_requests_resume_without_backpack_prefill(tmp_path, monkeypatch):
    engine, large, tok, bp, pack, metrics, prefills = _starved(tmp_path, monkeypatch)
    try:
        prompts = [tok(p).input_ids for p in PROMPTS]
        seqs = [
            engine.submit(
                GenerationRequest(
                    request_id=f"r{i}",
                    prompt_ids=p,
                    packs=[],
                    sampling=SamplingParams(max_new_tokens=N, ignore_eos=True),
                ),
                [pack],
            )
            for i, p in enumerate(prompts)
        ]
        got = [_run(s) for s in seqs]
        served_prefills = sum(prefills)
        ref = Ensemble(large, bp, tok).generate_greedy(prompts, [[pack]] * len(prompts), N)
        assert [f.output_ids for f in got] == ref
        proc = [p for p in REGISTRY.processors if p.core.stats.rows_added][-1]
        assert proc.core.stats.resumed >= 1  # vLLM did remove and re-add requests ...
        assert proc.core.stats.rows_added == len(prompts)  # ... and none was rebuilt
        assert served_prefills == len(prompts)  # one Backpack prefill per request, no more
        assert metrics.backpack_resumes._value.get() == proc.core.stats.resumed  # exported from the worker
        # one Backpack-time observation per step where the Backpack ran, none twice
        assert (
            metrics.registry.get_sample_value("sensepack_backpack_step_seconds_count")
            == proc.core.stats.delta_applies
            > 0
        )
        assert proc.core.parked == 0  # finished requests keep no parked state
    finally:
        engine.stop(0)
        REGISTRY.clear()


def test_forced_scores_survive_preemption(tmp_path, monkeypatch):
    """Forced-scoring requests (serve.vllm.scoring) in the same starved KV cache: vLLM removes and re-adds
    them mid-continuation; their records continue by position and their Backpack state resumes, so every
    score still equals `Ensemble.score` (base and packed), with one Backpack prefill per packed row."""
    from serve.vllm.scoring import VLLMScorer

    engine, large, tok, bp, pack, _, prefills = _starved(tmp_path, monkeypatch)
    try:
        scorer = VLLMScorer(engine)
        text = tok(" Mauritius is an island in the Indian Ocean, and its capital is Port Louis." * 4).input_ids
        rows = [(tok(p).input_ids, text[i : i + N]) for i, p in enumerate(PROMPTS)]
        jobs = [scorer.score(prefix, cont, [pack], True, True) for prefix, cont in rows]
        got = [j.result(timeout=300) for j in jobs]
        ens = Ensemble(large, bp, tok)
        for (prefix, cont), (base, packed) in zip(rows, got, strict=True):
            ref_b, ref_p = ens.score([prefix], [cont], [[]])[0], ens.score([prefix], [cont], [[pack]])[0]
            assert base.tolist() == pytest.approx(ref_b.tolist(), abs=2e-5)
            assert packed.tolist() == pytest.approx(ref_p.tolist(), abs=2e-5)
        proc = [p for p in REGISTRY.processors if p.core.stats.rows_added][-1]
        assert proc.core.stats.resumed >= 1  # vLLM did remove and re-add score rows ...
        assert proc.core.stats.rows_added == len(rows) and sum(prefills) == len(rows)  # ... none rebuilt
        assert not proc.core._scores and not engine.runner.busy()  # every record handed over
    finally:
        engine.stop(0)
        REGISTRY.clear()


def test_sampling_params_mapping():
    """The request's sampling / stopping fields reach vllm.SamplingParams; temperatures under vLLM's floor
    (it raises them to 0.01) go as greedy, their T -> 0 limit, which the embedded sampler also gives."""

    def params(**kw):
        req = GenerationRequest(
            request_id="r", prompt_ids=[1, 2], packs=[], sampling=SamplingParams(max_new_tokens=7, **kw)
        )
        return sampling_params(Sequence(3, req, [], queue.Queue(), seed=11))

    p = params(greedy=False, temperature=1e-39)
    assert p.temperature == 0.0
    p = params(
        greedy=False,
        temperature=0.7,
        top_k=5,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        logit_bias={7: 2.0},
        stop_token_ids=frozenset({9}),
        min_new_tokens=2,
    )
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.seed) == (0.7, 5, 0.9, 0.05, 11)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.2, 0.5, 0.25)
    assert p.logit_bias == {7: 2.0} and p.stop_token_ids == [9] and (p.max_tokens, p.min_tokens) == (7, 2)
    assert p.extra_args["sensepack"]["request_id"] == "sp-3"  # unique per engine request: parks by it
