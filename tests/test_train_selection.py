"""train_edits: sense selection (Eq. 9)."""

import pytest
import torch

from ensemble.backpack import BackpackConfig, BackpackLM
from ensemble.tokenizer import load_tokenizer
from train_edits.encoding import encode_example, encode_prefix_suffix
from train_edits.selection import background_table, example_table, select_senses
from train_edits.tasks import LossType, PairExample, SingleExample


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1)
    return BackpackLM(BackpackConfig.tiny()).eval()


def naive_table(model, scored) -> dict:
    """Σ over suffix-predicting rows t of α[ℓ, t, j], summed per (x_j, ℓ): plain loops over the forward's α."""
    with torch.no_grad():
        alpha = model(torch.tensor([scored.ids])).alpha[0]
    out: dict[tuple[int, int], float] = {}  # (token id, sense) -> summed α
    for t in scored.positions:
        for j in range(t + 1):
            for ell in range(alpha.shape[0]):
                key = (scored.ids[j], ell)
                out[key] = out.get(key, 0.0) + float(alpha[ell, t, j])
    return out


def test_example_table_matches_naive(tok, tiny):
    sc = encode_prefix_suffix(tok, "The capital of the Netherlands is", " Amsterdam city")
    got = example_table(tiny, [sc], LossType.GOOD)
    ref = naive_table(tiny, sc)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7)
    # α rows sum to 1 per sense: total mass = (#scored rows) × senses
    assert sum(got.values()) == pytest.approx(len(sc.positions) * tiny.config.num_senses, rel=1e-5)


@pytest.mark.parametrize("lt", [LossType.BALANCE, LossType.GOOD_V_BAD])
def test_pair_tables_combine(tok, tiny, lt):
    ex = PairExample("The janitor said", " he", " she")
    enc = encode_example(tok, ex)
    t1, t2 = naive_table(tiny, enc.seqs[0]), naive_table(tiny, enc.seqs[1])
    got = example_table(tiny, enc.seqs, lt)
    sign = 1.0 if lt is LossType.BALANCE else -1.0
    keys = set(t1) | set(t2)
    assert set(got) == keys
    for k in keys:
        assert got[k] == pytest.approx(t1.get(k, 0.0) + sign * t2.get(k, 0.0), abs=1e-6)


def test_only_types_present_in_example(tok, tiny):
    exs = [SingleExample("The capital of Peru is", " Lima"), SingleExample("The CEO of Adidas is", " Kasper Rorsted")]
    enc = [encode_example(tok, e) for e in exs]
    bg = torch.zeros(tiny.embedding.shape[0], tiny.config.num_senses, dtype=torch.float64)
    sel = select_senses(tiny, enc, bg, LossType.GOOD, k=6, lam=1000.0)
    for e, per in zip(enc, sel.per_example, strict=True):
        assert len(per) == 6
        assert all(p["token"] in e.seqs[0].ids for p in per)
    assert len(sel.pairs) == len(set(sel.pairs)) <= 12
    assert {tuple(p) for p in sel.pairs} == {(p["token"], p["sense"]) for per in sel.per_example for p in per}


def test_background_table_naive(tok, tiny):
    chunks = [
        torch.tensor(tok.encode(" the cat sat on the mat and the dog", add_special_tokens=False)),
        torch.tensor(tok.encode(" a bird flew over the house", add_special_tokens=False)),
    ]
    got = background_table(tiny, chunks, batch_size=2)  # padded batch
    ref = {}
    for c in chunks:
        with torch.no_grad():
            alpha = tiny(c[None]).alpha[0]
        for t in range(len(c) - 1):  # every row that predicts a next token
            for j in range(t + 1):
                for ell in range(alpha.shape[0]):
                    key = (int(c[j]), ell)
                    ref[key] = ref.get(key, 0.0) + float(alpha[ell, t, j]) / len(chunks)
    nz = {(int(a), int(b)) for a, b in got.nonzero().tolist()}
    assert nz == {k for k, v in ref.items() if v != 0.0}
    for (t, ell), v in ref.items():
        assert float(got[t, ell]) == pytest.approx(v, rel=1e-5)


def test_lambda_shifts_choice_away_from_frequent_r_types(tok, tiny):
    ex = encode_example(tok, SingleExample("The capital of the country is", " Paris"))
    k = 3
    sel0 = select_senses(
        tiny, [ex], torch.zeros(tiny.embedding.shape[0], 4, dtype=torch.float64), LossType.GOOD, k, 0.0
    )
    chosen0 = {t for t, _ in sel0.pairs}
    # an R corpus made of the chosen types (frequent in R) plus unrelated text
    frequent = sorted(chosen0)
    filler = tok.encode(" zebra quantum violin", add_special_tokens=False)
    chunks = [torch.tensor((frequent + filler) * 4) for _ in range(3)]
    bg = background_table(tiny, chunks)
    assert all(float(bg[t].sum()) > 0 for t in frequent)
    for lam, expect_overlap in ((1e-9, True), (1000.0, False)):
        sel = select_senses(tiny, [ex], bg, LossType.GOOD, k, lam)
        chosen = {t for t, _ in sel.pairs}
        assert bool(chosen & chosen0) is expect_overlap
        assert all(t in ex.seqs[0].ids for t in chosen)


def test_rank_pairs_keeps_only_positive_mass_hand_built():
    """Upstream's filter (importance.py:102-103) on a hand-built good-v-bad table: a pair with mass ≤ 0 loses to
    every pair with mass > 0 whatever their scores, and is never kept even when fewer than k remain."""
    from train_edits.selection import rank_pairs

    table = {
        (10, 0): -0.1,  # pulls towards the bad suffix: score -0.1, the best score, but excluded
        (11, 1): 0.0,  # no net mass: excluded
        (12, 2): 0.5,  # score 0.5 - 1000 * 0.01 = -9.5
        (13, 3): 0.2,
    }  # score 0.2 - 1000 * 0.0 = 0.2
    bg = torch.zeros(20, 4, dtype=torch.float64)
    bg[12, 2] = 0.01
    top = rank_pairs(table, bg, lam=1000.0, k=3)
    assert [(t, s) for _, t, s in top] == [(13, 3), (12, 2)]
    assert [sc for sc, _, _ in top] == pytest.approx([0.2, -9.5])
    # without the filter the ordering by score alone would have put (10, 0) second: the filter changed the top-k
    naive = sorted(((m - 1000.0 * float(bg[t, s]), t, s) for (t, s), m in table.items()), key=lambda x: -x[0])[:3]
    assert (10, 0) in [(t, s) for _, t, s in naive]


def test_good_v_bad_selection_has_positive_mass_only(tok, tiny):
    ex = encode_example(tok, PairExample("The keys to the cabinet", " are on the table", " is on the table"))
    table = example_table(tiny, ex.seqs, LossType.GOOD_V_BAD)
    assert any(m <= 0 for m in table.values())  # the case exists in this example
    bg = torch.zeros(tiny.embedding.shape[0], tiny.config.num_senses, dtype=torch.float64)
    sel = select_senses(tiny, [ex], bg, LossType.GOOD_V_BAD, k=len(table), lam=0.0)
    assert sel.pairs and all(table[tuple(p)] > 0 for p in sel.pairs)
    assert len(sel.pairs) == sum(m > 0 for m in table.values())
