"""train_edits: β calibration in one pass over G vs the paper's descending search (one pass per β)."""

import pytest
import torch

from ensemble.backpack import BackpackConfig, BackpackLM
from ensemble.edits import SenseEdits
from ensemble.large_model import tiny_gptj
from ensemble.tokenizer import load_tokenizer
from tests.conftest import SHARED
from train_edits.calibrate import DEFAULT_GRID, calibrate
from train_edits.compute import chunk_batches
from train_edits.corpora import read_documents, split_corpora

DATA = str(SHARED / "data" / "canonical-examples")
needs_data = pytest.mark.skipif(
    not (SHARED / "data" / "canonical-examples").is_dir(),
    reason=f"the canonical-examples data is not at {DATA} (set SENSEPACK_SHARED)",
)
pytestmark = needs_data  # every test here reads it (fixtures built from val100 and the task files)
U = 50257


@pytest.fixture(scope="module")
def setup():
    tok = load_tokenizer()
    torch.manual_seed(0)
    bp = BackpackLM(BackpackConfig.tiny()).eval()
    large = tiny_gptj(seed=0)
    docs = read_documents([f"{DATA}/val100-val.jsonl"])[:30]
    g = [torch.tensor(c) for c in split_corpora(tok, docs, chunk_len=32, seed=1).g[:6]]
    return tok, bp, large, g


class CountingG:
    """G batches that count how often they are read."""

    def __init__(self, chunks, bs=4):
        self.chunks, self.bs, self.passes = chunks, bs, 0

    def __iter__(self):
        self.passes += 1
        for _, ids, mask in chunk_batches(self.chunks, self.bs):
            yield ids, mask


def naive_mean_nll(large, bp, g, edits, beta):
    """Ensemble by the paper's formula on full vocab log-probs: log_softmax_U(z + β(log p_ft − log p_pre))."""
    tot = cnt = 0.0
    with torch.no_grad():
        for c in g:
            ids = c[None]
            z = large(ids).logits[0, :, :U].float()
            if beta:
                pre = torch.log_softmax(bp(ids).logits[0].float(), -1)[:, :U]
                ft = torch.log_softmax(bp(ids, sense_edits=edits).logits[0].float(), -1)[:, :U]
                z = z + beta * (ft - pre)
            lp = torch.log_softmax(z[:-1], -1).gather(-1, c[1:, None])
            tot += -float(lp.double().sum())
            cnt += len(c) - 1
    return tot / cnt


class Naive:
    """The paper's procedure with one full G pass per β (memoised so the test stays fast)."""

    def __init__(self, large, bp, g):
        self.large, self.bp, self.g, self.memo, self.passes = large, bp, g, {}, 0

    def ratio(self, name, edits, beta):
        for key, b in (((name, beta), beta), (("base", 0.0), 0.0)):
            if key not in self.memo:
                self.passes += 1
                self.memo[key] = naive_mean_nll(self.large, self.bp, self.g, edits, b)
        return self.memo[(name, beta)] / self.memo[("base", 0.0)]

    def descending_search(self, name, edits, eps, grid=DEFAULT_GRID):
        for b in sorted(grid, reverse=True):
            r = self.ratio(name, edits, b) if b else 1.0
            if r < 1 + eps:
                return b, r
        return 0.0, 1.0


def make_edits(tok, scale, seed):
    words = [" the", ",", " and", " of", " to"]
    tids = [tok.encode(w, add_special_tokens=False)[0] for w in words]
    torch.manual_seed(seed)
    tok_ids = torch.tensor([t for t in tids for _ in (0, 2)])
    sen_ids = torch.tensor([s for _ in tids for s in (0, 2)])
    return SenseEdits(tok_ids, sen_ids, torch.randn(len(tok_ids), 64) * scale)


def test_one_pass_grid_matches_descending_search(setup):
    tok, bp, large, g = setup
    naive = Naive(large, bp, g)
    edits = {"a": make_edits(tok, 30.0, 0), "b": make_edits(tok, 12.0, 0)}
    # ε placed (by the naive reference) between the ratios of two grid points: the search must stop there
    cases = []
    for name, target in (("a", 0.8), ("b", 0.5)):
        above = [naive.ratio(name, edits[name], round(b, 1)) for b in DEFAULT_GRID if b > target + 0.1 + 1e-9]
        r_t = naive.ratio(name, edits[name], target)
        r_next = naive.ratio(name, edits[name], round(target + 0.1, 1))
        assert min(above) > r_next > r_t > 1.0  # precondition: ratios fall towards the target
        cases.append((name, (r_t + r_next) / 2 - 1.0, target))
    cg = CountingG(g)
    calls = []
    hook = large.register_forward_hook(lambda *a: calls.append(1))
    try:
        res = calibrate(
            large, bp, cg, {eps: edits[name] for name, eps, _ in cases} | {1e-9: SenseEdits.empty(64)}, vocab_size=U
        )
    finally:
        hook.remove()
    assert cg.passes == 1  # G is read once for the whole grid and every ε
    assert len(calls) == res.batches == 2  # one large-model forward per G batch
    assert res.base_nll == pytest.approx(naive.memo[("base", 0.0)], rel=1e-6)
    for name, eps, target in cases:
        beta, _ = naive.descending_search(name, edits[name], eps)
        assert beta == target
        assert res.beta[eps] == beta
        for b in DEFAULT_GRID:
            if (name, b) in naive.memo:
                assert res.ratios[eps][b] == pytest.approx(naive.ratio(name, edits[name], b), rel=1e-6)
    assert naive.passes > 8  # what the paper's way cost, against one pass here


def test_empty_edits_keep_beta_one_and_ratio_one(setup):
    _, bp, large, g = setup
    res = calibrate(large, bp, CountingG(g), {1e-5: SenseEdits.empty(64)}, vocab_size=U)
    assert res.beta[1e-5] == 1.0 and res.ratios[1e-5][1.0] == 1.0
    assert res.positions_computed == 0


def test_grid_without_zero_falls_back_to_large_alone(setup):
    tok, bp, large, g = setup
    res = calibrate(large, bp, CountingG(g), {1e-9: make_edits(tok, 30.0, 0)}, grid=[1.0, 0.5], vocab_size=U)
    assert min(res.ratios[1e-9].values()) > 1 + 1e-9  # neither grid point is in the ball
    assert res.beta[1e-9] == 0.0 and res.notes
