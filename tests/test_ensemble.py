"""The cached-α ensemble against the paper's naive formula, exact skip, continuous batching, scoring."""

import pytest
import torch

from ensemble.backpack import BackpackConfig, BackpackLM
from ensemble.edits import PackRef, SenseEdits
from ensemble.ensemble import Ensemble
from ensemble.large_model import tiny_gptj
from ensemble.vocab import Vocabulary

U = Vocabulary.gpt2().size  # the tiny pairing shares GPT-2's tokenizer


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    backpack = BackpackLM(BackpackConfig.tiny(n_positions=64)).eval()
    return tiny_gptj(seed=1), backpack


def make_pack(backpack, tokens, name, seed, scale=3.0, senses=None):
    g = torch.Generator().manual_seed(seed)
    k = backpack.config.num_senses
    senses = senses or list(range(k))
    tok = torch.tensor([t for t in tokens for _ in senses])
    sen = torch.tensor([s for _ in tokens for s in senses])
    deltas = torch.randn(len(tok), backpack.config.n_embd, generator=g) * scale
    return SenseEdits(tok, sen, deltas)


@torch.no_grad()
def naive_logprobs(large, backpack, tokens, packs):
    """The paper's formula, both Backpacks run in full over the whole prefix:
    log_softmax_U(z + Σ_p β_p (log_softmax(Backpack + Δ_p) − log_softmax(Backpack)))."""
    ids = torch.tensor([tokens])
    z = large(ids).logits[0, -1, :U].float()
    pre = torch.log_softmax(backpack(ids).logits[0, -1], -1)
    total = z.clone()
    for p in packs:
        ft = torch.log_softmax(backpack(ids, sense_edits=p.edits).logits[0, -1], -1)
        total += p.beta * (ft - pre)[:U]
    return torch.log_softmax(total, -1)


def run_and_compare(ens, prompts, packs, steps):
    large, backpack = ens.large, ens.backpack
    batch = ens.new_batch()
    for i, (p, pk) in enumerate(zip(prompts, packs, strict=True)):
        batch.add(i, p, pk)
    seqs = [list(p) for p in prompts]
    for _ in range(steps):
        lp = batch.logprobs()
        assert lp.shape == (len(prompts), U)
        for row, sid in enumerate(batch.seq_ids):
            ref = naive_logprobs(large, backpack, seqs[sid], packs[sid])
            torch.testing.assert_close(lp[row], ref, atol=1e-5, rtol=0)
        nxt = lp.argmax(-1).tolist()
        for sid, t in zip(batch.seq_ids, nxt, strict=True):
            seqs[sid].append(t)
        batch.append(dict(zip(batch.seq_ids, nxt, strict=True)))
    return seqs


@pytest.mark.parametrize("budget", [1, 4, 7])
def test_chunked_prefill_equals_the_naive_formula(models, tokenizer, budget):
    """Prompts prefilled `budget` tokens per call beside rows that decode: a row appears once its whole
    prompt is in, and from then on equals the naive formula (the Backpack and the exact skip unchanged)."""
    large, backpack = models
    ens = Ensemble(large, backpack, tokenizer)
    trig = tokenizer(" Mauritius").input_ids
    pack = PackRef("p", "v1", make_pack(backpack, trig, "p", 0), 1.0)
    prompts = {
        0: tokenizer("The capital of Mauritius is").input_ids,
        1: tokenizer("A long unrelated sentence about the weather in the mountains near the sea").input_ids,
        2: tokenizer("In Mauritius, the capital city is called").input_ids,
    }
    packs = {0: [pack], 1: [pack], 2: []}
    batch = ens.new_batch()
    seqs: dict[int, list[int]] = {}
    joined_at = {}
    for step in range(30):
        if step in (0, 2, 3):  # rows join while others decode
            sid = {0: 0, 2: 1, 3: 2}[step]
            batch.add(sid, prompts[sid], packs[sid])
            seqs[sid] = list(prompts[sid])
        lp = batch.logprobs(budget)
        for row, sid in enumerate(batch.seq_ids):
            joined_at.setdefault(sid, step)
            torch.testing.assert_close(
                lp[row], naive_logprobs(large, backpack, seqs[sid], packs[sid]), atol=1e-5, rtol=0
            )
        nxt = lp.argmax(-1).tolist()
        for sid, t in zip(batch.seq_ids, nxt, strict=True):
            seqs[sid].append(t)
        batch.append(dict(zip(batch.seq_ids, nxt, strict=True)))
    assert set(joined_at) == {0, 1, 2}
    # each prompt needed ceil(len / budget) calls at least (the budget is shared, in join order)
    assert joined_at[1] >= 2 + -(-len(prompts[1]) // budget) - 1
    assert ens.stats.exact_skip_rows > 0


def test_a_row_removed_mid_prefill_leaves_no_trace(models, tokenizer):
    large, backpack = models
    ens = Ensemble(large, backpack, tokenizer)
    batch = ens.new_batch()
    batch.add("a", tokenizer("Short prompt").input_ids)
    batch.add("b", tokenizer("A much longer prompt that will take several calls to prefill").input_ids)
    batch.logprobs(1)
    assert batch.seq_ids == [] and batch.prefilling == ["a", "b"]
    batch.remove("b")
    lp = batch.logprobs(100)
    assert batch.seq_ids == ["a"] and batch.prefilling == []
    ref = naive_logprobs(large, backpack, tokenizer("Short prompt").input_ids, [])
    torch.testing.assert_close(lp[0], ref, atol=1e-5, rtol=0)
    assert not batch.large._partial


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_cached_alpha_equals_naive_formula_prompt_tokens(models, tokenizer, beta):
    large, backpack = models
    ens = Ensemble(large, backpack, tokenizer)
    prompts = [
        tokenizer("The capital of Mauritius is").input_ids,
        tokenizer("Mauritius").input_ids,
        tokenizer("A long unrelated sentence about the weather in the mountains").input_ids,
    ]
    trig = tokenizer(" Mauritius").input_ids + tokenizer("Mauritius").input_ids
    pack = PackRef("p", "v1", make_pack(backpack, trig, "p", 0), beta)
    run_and_compare(ens, prompts, [[pack], [pack], [pack]], steps=10)


def test_cached_alpha_equals_naive_formula_generated_tokens_and_two_packs(models, tokenizer):
    large, backpack = models
    ens = Ensemble(large, backpack, tokenizer)
    prompt = tokenizer("The nurse said that").input_ids
    base = ens.generate_greedy([prompt], [[]], 8)[0]
    new_tokens = [t for t in base[2:5] if t not in prompt]
    assert new_tokens, "need a generated token that is not in the prompt"
    gen_pack = PackRef("gen", "v1", make_pack(backpack, new_tokens[:1], "gen", 1, senses=[0, 2]), 1.0)
    prompt_pack = PackRef("nurse", "v1", make_pack(backpack, tokenizer(" nurse").input_ids, "n", 2), 0.5)
    run_and_compare(ens, [prompt, prompt], [[gen_pack], [gen_pack, prompt_pack]], steps=10)
    calls_before = ens.stats.backpack_calls
    assert calls_before > 0


def test_a_batch_mixing_pack_sets_equals_the_naive_formula_row_by_row(models, tokenizer):
    """Rows with different pack sets (one, two, three packs, shared and own, different β, and none) in one
    batch: each row's log-probs equal the paper's formula with its own packs, step after step."""
    large, backpack = models
    ens = Ensemble(large, backpack, tokenizer)
    words = [" Paris", " nurse", " the", " capital", " Mauritius"]
    k = backpack.config.num_senses
    packs = [
        PackRef(f"p{i}", "v1", make_pack(backpack, tokenizer(w).input_ids, w, 10 + i, senses=list(range(i % k + 1))), b)
        for i, (w, b) in enumerate(zip(words, [1.0, 0.5, 0.8, 1.5, 0.3], strict=True))
    ]
    prompts = [
        tokenizer("The capital of Mauritius is").input_ids,
        tokenizer("The nurse said that the").input_ids,
        tokenizer("Paris and the capital").input_ids,
        tokenizer("Hello world").input_ids,
        tokenizer("Mauritius, the nurse and Paris").input_ids,
        tokenizer("The capital of Mauritius is").input_ids,
    ]
    sets = [[packs[4]], [packs[1], packs[2]], [packs[0], packs[2], packs[3]], [packs[0]], packs[:3], []]
    run_and_compare(ens, prompts, sets, steps=6)


def test_exact_skip_is_bit_identical_and_never_calls_the_backpack(models, tokenizer):
    large, backpack = models
    prompts = [tokenizer("Hello world, this is a test").input_ids, tokenizer("Another prompt").input_ids]
    rare = tokenizer(" Mauritius").input_ids
    pack = PackRef("p", "v1", make_pack(backpack, rare, "p", 3), 1.0)

    def decode(packs):
        ens = Ensemble(large, backpack, tokenizer)
        batch = ens.new_batch()
        for i, p in enumerate(prompts):
            batch.add(i, p, packs)
        out = []
        for _ in range(12):
            lp = batch.logprobs()
            out.append(lp.clone())
            nxt = lp.argmax(-1).tolist()
            assert all(t not in rare for t in nxt)
            batch.append(dict(zip(batch.seq_ids, nxt, strict=True)))
        return out, ens.stats

    with_pack, stats = decode([pack])
    base, _ = decode([])
    for a, b in zip(with_pack, base, strict=True):
        assert torch.equal(a, b)  # bit-identical
    assert stats.backpack_calls == 0
    assert stats.exact_skip_rows == 2 * 12
    # And the base itself is the large model's own log-softmax over the shared vocabulary.
    z = large(torch.tensor([prompts[1]])).logits[0, -1, :U].float()
    torch.testing.assert_close(base[0][1], torch.log_softmax(z, -1), atol=1e-6, rtol=0)


def test_backpack_prefills_once_when_first_edited_token_appears(models, tokenizer):
    large, backpack = models
    ens = Ensemble(large, backpack, tokenizer)
    prompt = tokenizer("Once upon a time").input_ids
    batch = ens.new_batch()
    trig = 1234
    pack = PackRef("p", "v1", make_pack(backpack, [trig], "p", 4), 1.0)
    batch.add("s", prompt, [pack])
    for _ in range(3):
        batch.logprobs()
        batch.append({"s": 11})
    assert ens.stats.backpack_calls == 0
    batch.logprobs()
    batch.append({"s": trig})  # first edited token: one prefill, then one step per token
    lp = batch.logprobs()
    assert ens.stats.backpack_calls == 1
    batch.append({"s": 12})
    lp = batch.logprobs()
    assert ens.stats.backpack_calls == 2
    ref = naive_logprobs(large, backpack, prompt + [11, 11, 11, trig, 12], [pack])
    torch.testing.assert_close(lp[0], ref, atol=1e-5, rtol=0)


def test_continuous_batching_join_and_leave_matches_solo_decoding(models, tokenizer):
    large, backpack = models
    ens = Ensemble(large, backpack, tokenizer)
    trig = tokenizer(" Paris").input_ids
    pack = PackRef("p", "v1", make_pack(backpack, trig, "p", 5), 0.7)
    prompts = {
        "a": tokenizer("I went to Paris and").input_ids,
        "b": tokenizer("The weather").input_ids,
        "c": tokenizer("Paris is").input_ids,
    }
    packs = {"a": [pack], "b": [pack], "c": []}
    solo = {k: ens.generate_greedy([prompts[k]], [packs[k]], 8)[0] for k in prompts}

    batch = ens.new_batch()
    out = {k: [] for k in prompts}
    schedule = {0: ["a"], 2: ["b"], 3: ["c"]}
    for step in range(14):
        for k in schedule.get(step, []):
            batch.add(k, prompts[k], packs[k])
        if not len(batch):
            break
        lp = batch.logprobs()
        nxt = dict(zip(batch.seq_ids, lp.argmax(-1).tolist(), strict=True))
        for k, t in nxt.items():
            out[k].append(t)
        done = [k for k in nxt if len(out[k]) == 8]
        batch.append({k: t for k, t in nxt.items() if k not in done})
        for k in done:
            batch.remove(k)
    assert out == solo


def test_score_equals_incremental_logprobs(models, tokenizer):
    large, backpack = models
    ens = Ensemble(large, backpack, tokenizer)
    trig = tokenizer(" capital").input_ids
    pack = PackRef("p", "v1", make_pack(backpack, trig, "p", 6), 1.0)
    prefix = tokenizer("The capital of Mauritius is").input_ids
    cont = tokenizer(" Port Louis, a city").input_ids
    for packs in ([], [pack]):
        scored = ens.score([prefix], [cont], [packs])[0]
        expect = ens._score_incremental(prefix, cont, packs)
        torch.testing.assert_close(scored, expect, atol=1e-5, rtol=0)
        naive = torch.stack(
            [naive_logprobs(large, backpack, prefix + cont[:i], packs)[cont[i]] for i in range(len(cont))]
        )
        torch.testing.assert_close(scored, naive, atol=1e-5, rtol=0)


def test_paired_nll_equals_the_naive_formula_and_skips_rows_without_edited_tokens(models, tokenizer):
    large, backpack = models
    ens = Ensemble(large, backpack, tokenizer)
    trig = tokenizer(" capital").input_ids
    pack = PackRef("p", "v1", make_pack(backpack, trig, "p", 8), 0.7)
    rows = [tokenizer("The capital of Mauritius is Port Louis").input_ids, tokenizer("No edited word here").input_ids]
    base, packed = ens.paired_nll(rows, [pack])
    for row, b, p in zip(rows, base, packed, strict=True):
        for nll, packs in ((b, []), (p, [pack])):
            naive = -sum(float(naive_logprobs(large, backpack, row[:i], packs)[row[i]]) for i in range(1, len(row)))
            assert nll == pytest.approx(naive, abs=1e-4)
    assert packed[1] == base[1] and packed[0] != base[0]  # exact skip: the base's own number
    with pytest.raises(ValueError, match="row 0 needs 2 or more ids"):
        ens.paired_nll([[5]], [pack])


def test_sequences_past_the_backpack_window_keep_decoding(models, tokenizer):
    large, backpack = models  # n_positions = 64
    ens = Ensemble(large, backpack, tokenizer, window_keep=48)
    trig = tokenizer(" the").input_ids
    pack = PackRef("p", "v1", make_pack(backpack, trig, "p", 7, scale=0.5), 1.0)
    prompt = tokenizer(" the" * 60).input_ids
    out = ens.generate_greedy([prompt], [[pack]], 30)[0]
    assert len(out) == 30 and all(0 <= t < U for t in out)
    assert ens.stats.window_reprefills >= 1
    # Scoring a sequence longer than the window goes through the same sliding-window path.
    s = ens.score([prompt], [out[:5]], [[pack]])[0]
    assert s.shape == (5,) and torch.isfinite(s).all()


def test_bad_inputs_are_refused_with_a_clear_error(models, tokenizer):
    large, backpack = models
    batch = Ensemble(large, backpack, tokenizer).new_batch()
    with pytest.raises(ValueError, match="prompt_ids"):
        batch.add("x", [], [])
    with pytest.raises(ValueError, match="prompt_ids"):
        batch.add("y", [50300], [])
    bad = PackRef("bad", "v", SenseEdits(torch.tensor([1]), torch.tensor([99]), torch.zeros(1, 64)), 1.0)
    with pytest.raises(ValueError, match="sense_ids"):
        batch.add("z", [1, 2], [bad])


def test_never_samples_padding_ids(models, tokenizer):
    _, backpack = models
    large = tiny_gptj(seed=2)  # GPT-J's 50400 rows: make the padding rows the most likely
    with torch.no_grad():
        large.lm_head.bias[U:] = 1e4
    ens = Ensemble(large, backpack, tokenizer)
    out = ens.generate_greedy([tokenizer("Hi").input_ids], [[]], 4)[0]
    assert all(t < U for t in out)


def test_combined_pack_sets_are_shared_and_bounded_by_bytes(models, tokenizer):
    """One combined set per (packs, β) mix, equal to Σ β Δ; past the byte budget the least recently used goes
    and the set just built stays."""
    from ensemble.edits import CombinedEditsCache, combine_packs, pack_key

    _, backpack = models
    d = backpack.config.n_embd
    packs = [PackRef(f"p{i}", "v1", make_pack(backpack, [100 + i, 200 + i], "x", i), 1.0 + i) for i in range(4)]
    one = sum(t.nbytes for t in (packs[0].edits.token_ids, packs[0].edits.sense_ids, packs[0].edits.deltas))
    cache = CombinedEditsCache(d, budget_bytes=2 * one)
    built = []

    def get(*ps):
        return cache.get(pack_key(list(ps)), lambda: built.append(ps) or list(ps))

    a = get(packs[0])
    assert get(packs[0]) is a and len(built) == 1  # shared, built once
    both = get(packs[1], packs[2])  # two packs' rows: the whole budget; the least recent (packs[0]) goes
    torch.testing.assert_close(both.deltas, combine_packs([packs[1], packs[2]], d).deltas)
    assert len(cache) == 1 and cache.nbytes == 2 * one and cache.evictions == 1
    big = get(packs[0], packs[1], packs[3])  # over the budget alone: it stays, alone
    assert len(cache) == 1 and cache.nbytes == 3 * one and get(packs[0], packs[1], packs[3]) is big
    get(packs[3])
    assert len(cache) == 1 and cache.nbytes == one
