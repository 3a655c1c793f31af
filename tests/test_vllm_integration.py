"""vLLM with the sensepack V1 logits processor == the embedded engine, token for token.

A tiny random GPT-J (head_dim 32, float32) is saved to a folder that vLLM loads; the same weights
drive `ensemble.Ensemble.generate_greedy` (the reference embedded decode). Several prompts run in
one vLLM batch, with and without packs (one pack, two packs combined, a β other than 1, a pack
whose trigger appears only in generated text is not tested: random weights make that unlikely).

Runs where vLLM is installed (`scripts/test-vllm.sh`, or /tmp/vllm-venv); skipped otherwise.
The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the processor finds the
Backpack and packs in serve.vllm.resolver.REGISTRY, the way an in-process server fills it.
"""
from __future__ import annotations

import math
import os

import pytest

from tests.vllm_gate import require_vllm

require_vllm()


from ensemble.demo import demo_pack, tiny_backpack  # noqa: E402
from ensemble.ensemble import Ensemble  # noqa: E402
from ensemble.tokenizer import load_tokenizer  # noqa: E402
from ensemble.vocab import Vocabulary  # noqa: E402
from serve.vllm import V1_PROCESSOR_FQCN  # noqa: E402
from serve.vllm.args import build_extra_args  # noqa: E402
from serve.vllm.resolver import REGISTRY, DictSource  # noqa: E402
from serve.vllm.testing import random_pack, save_tiny_gptj  # noqa: E402

U = Vocabulary.gpt2().size  # the tiny pairing shares GPT-2's tokenizer

N_NEW = 12
PROMPTS = [
    "The capital of Mauritius is",
    "Mauritius is an island nation whose capital city is",
    "The weather today in Paris is",
    "Once upon a time, in a small village, there lived",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gptj-vllm")
    large = save_tiny_gptj(folder, seed=0)
    tok = load_tokenizer()
    backpack = tiny_backpack(0)
    demo = demo_pack(backpack, tok)
    prompts = [tok(p).input_ids for p in PROMPTS]
    # a random pack on words of the 2nd and 3rd prompts, combined with the demo pack in some requests
    rnd = random_pack(backpack, tok(" island weather").input_ids, name="rnd", version="r1", beta=0.75, seed=3)
    source = DictSource({(demo.name, demo.version): demo.edits, (rnd.name, rnd.version): rnd.edits})
    REGISTRY.configure(backpack, source, vocab_size=U)
    from vllm import LLM

    # max_num_batched_tokens=64: long prompts are prefilled in chunks (the processor sees partial-chunk rows)
    llm = LLM(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=16,
              max_num_batched_tokens=64, seed=0, logits_processors=[V1_PROCESSOR_FQCN],
              logprobs_mode="processed_logprobs")
    ens = Ensemble(large, backpack, tok)
    yield dict(llm=llm, ens=ens, tok=tok, demo=demo, rnd=rnd, prompts=prompts, backpack=backpack)
    REGISTRY.clear()


def _vllm_greedy(llm, prompts, packs, n=N_NEW, logprobs=None):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=logprobs,
                             extra_args=build_extra_args(pk) if pk else None) for pk in packs]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], outs


def test_greedy_equals_embedded_with_and_without_packs(setup):
    s = setup
    prompts = s["prompts"]
    base = [[] for _ in prompts]
    mixed = [[s["demo"]], [s["demo"], s["rnd"]], [s["rnd"]], []]
    ref_base = s["ens"].generate_greedy(prompts, base, N_NEW)
    ref_mixed = s["ens"].generate_greedy(prompts, mixed, N_NEW)
    # the packs must matter, or this test could not tell an ignored delta from a working one
    assert ref_mixed[0] != ref_base[0] and ref_mixed[1] != ref_base[1] and ref_mixed[2] != ref_base[2]
    assert ref_mixed[3] == ref_base[3]            # no pack: the same tokens

    # one batch holding base and edited requests of every prompt
    got, _ = _vllm_greedy(s["llm"], prompts + prompts, base + mixed)
    assert got[: len(prompts)] == ref_base
    assert got[len(prompts):] == ref_mixed
    assert all(t < U for row in got for t in row)


def test_demo_pack_steers_toward_target_like_embedded(setup):
    s = setup
    tok, demo = s["tok"], s["demo"]
    p = [tok("The capital of Mauritius is").input_ids]
    ref = s["ens"].generate_greedy(p, [[demo]], 6)
    got, _ = _vllm_greedy(s["llm"], p, [[demo]], n=6)
    assert got == ref
    assert set(tok(" Port Louis").input_ids) & set(got[0])   # the demo pack's target appears


def test_beta_and_staggered_lengths_with_compaction(setup):
    """Requests finishing at different steps force vLLM to compact the batch (moves) mid-run."""
    from ensemble.edits import PackRef

    s = setup
    prompts = s["prompts"]
    half = PackRef(s["demo"].name, s["demo"].version, s["demo"].edits, 0.5)
    packs = [[half], [s["rnd"]], [], [s["demo"], s["rnd"]]]
    lens = [3, 9, 5, 12]
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                             extra_args=build_extra_args(pk) if pk else None) for pk, n in zip(packs, lens)]
    outs = s["llm"].generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outs]
    ref = s["ens"].generate_greedy(prompts, packs, max(lens))
    assert got == [r[:n] for r, n in zip(ref, lens)]


def test_long_prompts_chunked_prefill_and_backpack_window_slide(setup):
    """Prompts longer than a prefill chunk (64) and sequences past the tiny Backpack's 128 positions
    (sliding window, re-prefilled): still the embedded engine's tokens."""
    s = setup
    tok = s["tok"]
    filler = tok(" and then the story went on for a while, as stories do,")["input_ids"]
    long1 = (filler * 12)[:100] + tok(" The capital of Mauritius is")["input_ids"]
    long2 = (filler * 12)[:90] + tok(" The weather was fine, and on the island")["input_ids"]
    prompts = [long1, long2, s["prompts"][0]]
    packs = [[s["demo"]], [s["rnd"]], [s["demo"]]]
    n = 40                                           # 100+ prompt tokens + 40 > 128 Backpack positions
    proc = REGISTRY.processors[-1]
    slides = proc.core.tracker.stats.window_reprefills
    got, _ = _vllm_greedy(s["llm"], prompts, packs, n=n)
    ref = s["ens"].generate_greedy(prompts, packs, n)
    assert got == ref
    assert proc.core.tracker.stats.window_reprefills > slides      # the window did slide


def test_processed_logprobs_are_the_ensembles(setup):
    s = setup
    p = [s["prompts"][0]]
    got, outs = _vllm_greedy(s["llm"], p, [[s["demo"]]], n=4, logprobs=1)
    batch = s["ens"].new_batch()
    batch.add(0, p[0], [s["demo"]])
    for step, t in enumerate(got[0]):
        ref = batch.logprobs()[0]
        lp = outs[0].outputs[0].logprobs[step][t].logprob
        assert math.isclose(lp, float(ref[t]), abs_tol=2e-3), (step, lp, float(ref[t]))
        batch.append({0: t})


def test_invalid_extra_args_are_refused_with_the_field_named(setup):
    from vllm import SamplingParams

    bad = SamplingParams(max_tokens=2, extra_args={"sensepack": {"packs": [{"name": "x", "version": "v",
                                                                            "beta": float("nan")}]}})
    with pytest.raises(Exception, match=r"extra_args\.sensepack\.packs\[0\]\.beta"):
        setup["llm"].generate(["hi"], [bad], use_tqdm=False)


def test_exact_skip_base_rows_untouched(setup):
    """Base-only batches: the processor never runs the Backpack and adds nothing."""
    s = setup
    proc = REGISTRY.processors[-1]
    before_calls = proc.core.tracker.stats.backpack_calls
    before = (proc.core.stats.skipped, proc.core.stats.delta_applies)
    _vllm_greedy(s["llm"], [s["prompts"][3]], [[s["demo"]]], n=4)   # pack whose trigger is absent
    _vllm_greedy(s["llm"], s["prompts"], [[] for _ in s["prompts"]], n=4)
    assert proc.core.tracker.stats.backpack_calls == before_calls
    assert proc.core.stats.delta_applies == before[1]
    assert proc.core.stats.skipped > before[0]
    # a finished request leaves at the next step's BatchUpdate: after the base-only run, none is left
    assert not proc.core.rows
