"""train_edits: sense finetuning on a tiny Backpack, ball tracking, gradient accumulation."""

import random

import pytest
import torch

from ensemble.backpack import BackpackConfig, BackpackLM
from ensemble.tokenizer import load_tokenizer
from tests.conftest import SHARED
from train_edits.compute import EditIndex, GLoss, cache_sequences, own_sequence_deltas
from train_edits.corpora import read_documents, split_corpora
from train_edits.encoding import encode_example
from train_edits.finetune import FinetuneParams, finetune
from train_edits.losses import training_loss
from train_edits.tasks import LossType, TaskData

DATA = str(SHARED / "data" / "canonical-examples")
needs_data = pytest.mark.skipif(
    not (SHARED / "data" / "canonical-examples").is_dir(),
    reason=f"the canonical-examples data is not at {DATA} (set SENSEPACK_SHARED)",
)
pytestmark = needs_data  # every test here reads it (fixtures built from val100 and the task files)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return BackpackLM(BackpackConfig.tiny()).eval()


@pytest.fixture(scope="module")
def corpora(tok):
    docs = read_documents([f"{DATA}/val100-val.jsonl"])[:40]
    sp = split_corpora(tok, docs, chunk_len=64, seed=0)
    return [torch.tensor(c) for c in sp.g[:12]], [torch.tensor(c) for c in sp.r[:12]]


@pytest.fixture(scope="module")
def country(tok):
    data = TaskData.builtin("country_capital", DATA)
    train = [encode_example(tok, e, 128) for e in data.train[:6]]
    return train


def pairs_for(train, tok, g):
    """Senses of the examples' tokens that are rare in G, plus one type that occurs in a few G chunks
    (so the ball is exercised while most chunks stay untouched)."""

    def chunks_with(t):
        return sum(bool((c == t).any()) for c in g)

    toks = []
    for ex in train:
        s = ex.seqs[0]
        toks += [t for t in s.ids[: s.start + s.n - 1] if chunks_with(t) <= len(g) // 2]
    seen, pairs = set(), []
    for t in toks:
        for ell in range(4):
            if (t, ell) not in seen:
                seen.add((t, ell))
                pairs.append((t, ell))
    return pairs


def naive_g_ratio(model, chunks, edits) -> float:
    """Full forward over every chunk (no skipping), base and edited."""
    tot0 = tot1 = 0.0
    with torch.no_grad():
        for c in chunks:
            ids = c[None]
            for edt, acc in ((None, 0), (edits, 1)):
                lp = torch.log_softmax(model(ids, sense_edits=edt).logits[0, :-1], -1)
                nll = -float(lp.gather(-1, c[1:, None]).double().sum())
                if acc:
                    tot1 += nll
                else:
                    tot0 += nll
    return tot1 / tot0


def test_cached_forward_matches_model_forward(tiny, tok, country, corpora):
    pairs = pairs_for(country, tok, corpora[0])
    idx = EditIndex(pairs, 4)
    torch.manual_seed(3)
    deltas = torch.randn(len(idx), 64)
    edits = idx.edits(deltas)
    cached = cache_sequences(tiny, [e.seqs[0] for e in country], idx)
    for c in cached:
        ids = torch.tensor([c.scored.ids])
        with torch.no_grad():
            lp = torch.log_softmax(tiny(ids, sense_edits=edits).logits[0], -1)
        ref = -sum(float(lp[p, t]) for p, t in zip(c.scored.positions, c.scored.targets, strict=True))
        with torch.no_grad():
            got = float(c.nll_sum(tiny.embedding, deltas))
        assert got == pytest.approx(ref, rel=1e-5)
    # our δ and the core's agree on full sequences
    from ensemble.delta import sequence_deltas

    ids = corpora[0][0][None]
    with torch.no_grad():
        alpha = tiny.contextualize(ids)
    assert torch.allclose(own_sequence_deltas(alpha, ids, edits), sequence_deltas(alpha, ids, edits), atol=1e-5)


def test_trainable_parameters_are_sparse(tiny, tok, country, corpora):
    pairs = pairs_for(country, tok, corpora[0])[:5]
    p = FinetuneParams(lr=0.5, epochs=1, kl_weight=0.0, grad_accum=1, epsilons=(1e-3,), eval_every_epoch=False)
    res = finetune(tiny, country[:2], LossType.GOOD, pairs, corpora[0][:2], corpora[1][:2], p, progress=False)
    assert res.deltas[1e-3].shape == (5, 64)
    assert all(not prm.requires_grad for prm in tiny.parameters())


def test_training_loss_falls_and_ball_choice(tiny, tok, country, corpora):
    g0, r = corpora
    pairs = pairs_for(country, tok, g0)
    # G also holds the canonical prefixes with other continuations: raising p(suffix | prefix) must cost G
    other = tok.encode(" not a city that many people know about today.", add_special_tokens=False)
    g = [torch.tensor(list(ex.seqs[0].ids[: ex.seqs[0].start]) + other) for ex in country] + g0
    eps = (0.5, 2e-3, 1e-12)
    p = FinetuneParams(lr=1.0, epochs=4, kl_weight=0.01, grad_accum=1, epsilons=eps, eval_every_epoch=False, seed=1)
    res = finetune(tiny, country, LossType.GOOD, pairs, g, r, p, progress=False)
    losses = [h.train_loss for h in res.history]
    assert losses[-1] < losses[0] - 0.5, losses  # the training loss falls
    ratios = [h.g_ratio for h in res.history]
    assert ratios[0] == 1.0
    assert all(r_ > 1.0 for r_ in ratios[1:]), ratios
    for e in eps:
        expect = max(ep for ep, r_ in enumerate(ratios) if r_ < 1 + e)  # the last in-ball epoch
        assert res.chosen_epoch[e] == expect
        assert ratios[res.chosen_epoch[e]] < 1 + e
    # the ball ratio of the kept deltas, recomputed with a naive full pass over G
    idx = EditIndex(pairs, 4)
    e_big = 0.5
    assert res.chosen_epoch[e_big] > 0
    assert naive_g_ratio(tiny, g, idx.edits(res.deltas[e_big])) == pytest.approx(
        ratios[res.chosen_epoch[e_big]], rel=1e-6
    )
    # ε so small that no trained epoch fits: epoch 0, all-zero deltas, no effect on the model
    assert res.chosen_epoch[1e-12] == 0
    assert torch.count_nonzero(res.deltas[1e-12]) == 0
    ids = torch.tensor([country[0].seqs[0].ids])
    with torch.no_grad():
        assert torch.equal(tiny(ids, sense_edits=idx.edits(res.deltas[1e-12])).logits, tiny(ids).logits)
        assert not torch.allclose(tiny(ids, sense_edits=idx.edits(res.deltas[e_big])).logits, tiny(ids).logits)


def test_gloss_exact_skip_is_paired(tiny, tok, country, corpora):
    g = corpora[0]
    pairs = pairs_for(country, tok, g)
    idx = EditIndex(pairs, 4)
    gl = GLoss(tiny, g, idx, batch_size=4)
    assert 0 < len(gl.touched) < len(g)
    assert gl.ratio(torch.zeros(len(idx), 64)) == 1.0
    torch.manual_seed(0)
    d = torch.randn(len(idx), 64) * 3
    assert gl.ratio(d) == pytest.approx(naive_g_ratio(tiny, g, idx.edits(d)), rel=1e-6)


def _manual_adamw_step(lr, grad):
    opt_p = torch.nn.Parameter(torch.zeros_like(grad))
    opt = torch.optim.AdamW([opt_p], lr=lr, betas=(0.9, 0.995), weight_decay=0.0)
    opt_p.grad = grad.clone()
    opt.step()
    return opt_p.detach()


@pytest.mark.parametrize("bug", [False, True])
def test_gradient_accumulation(tiny, tok, country, corpora, bug):
    """One epoch, grad_accum = #examples: correct mode steps once on the mean gradient of all examples;
    the upstream bug steps once on the last example's gradient only."""
    pairs = pairs_for(country, tok, corpora[0])[:20]
    n = len(country)
    p = FinetuneParams(
        lr=0.01,
        epochs=1,
        kl_weight=0.0,
        grad_accum=n,
        upstream_grad_bug=bug,
        epsilons=(10.0,),
        eval_every_epoch=False,
        seed=7,
    )
    res = finetune(tiny, country, LossType.GOOD, pairs, corpora[0][:2], [], p, progress=False)
    assert res.optimizer_steps == 1
    assert res.examples_counted == (1 if bug else n)
    idx = EditIndex(pairs, 4)
    cached = [cache_sequences(tiny, list(ex.seqs), idx) for ex in country]
    order = list(range(n))
    random.Random(7).shuffle(order)
    d = torch.zeros(len(idx), 64, requires_grad=True)

    def loss_of(i):
        return training_loss("good", [c.nll_sum(tiny.embedding, d) for c in cached[i]], [c.scored.n for c in cached[i]])

    if bug:
        grad = torch.autograd.grad(loss_of(order[-1]), d)[0]
    else:
        grad = torch.autograd.grad(sum(loss_of(i) for i in range(n)) / n, d)[0]
    expect = _manual_adamw_step(0.01, grad)
    # Adam's first step is lr·g/(|g|+eps): where |g| is at float-noise level (a type whose gradient
    # nearly cancels), summation order alone moves the step, so compare where the gradient is resolved.
    resolved = grad.abs() > 1e-6
    assert resolved.float().mean() > 0.5
    assert torch.allclose(res.deltas[10.0][resolved], expect[resolved], atol=1e-6)
    assert (res.deltas[10.0] - expect).abs().max() <= 0.01 + 1e-6


def test_remainder_and_bug_counts(tiny, tok, country, corpora):
    pairs = pairs_for(country, tok, corpora[0])[:8]
    for bug, steps, counted in ((False, 2 * 2, 2 * 6), (True, 2 * 1, 2 * 1)):  # 6 examples, accum 4, 2 epochs
        p = FinetuneParams(
            lr=0.01,
            epochs=2,
            kl_weight=0.0,
            grad_accum=4,
            upstream_grad_bug=bug,
            epsilons=(10.0,),
            eval_every_epoch=False,
        )
        res = finetune(tiny, country, LossType.GOOD, pairs, corpora[0][:1], [], p, progress=False)
        assert (res.optimizer_steps, res.examples_counted) == (steps, counted)


def test_reproducible(tiny, tok, country, corpora):
    pairs = pairs_for(country, tok, corpora[0])[:10]
    p = FinetuneParams(lr=0.3, epochs=2, kl_weight=0.1, grad_accum=2, epsilons=(10.0,), eval_every_epoch=False, seed=5)
    a = finetune(tiny, country[:4], LossType.GOOD, pairs, corpora[0][:2], corpora[1][:6], p, progress=False)
    b = finetune(tiny, country[:4], LossType.GOOD, pairs, corpora[0][:2], corpora[1][:6], p, progress=False)
    assert torch.equal(a.deltas[10.0], b.deltas[10.0])


def test_kl_includes_last_position_against_full_forward(tiny, tok, country, corpora):
    """KL(p_orig ‖ p_new) summed over every position of the chunk, the last one included (upstream
    regularize.py:26-32), against a plain full forward with and without the edits."""
    from train_edits.compute import KLRegularizer

    r = corpora[1]
    pairs = pairs_for(country, tok, corpora[0])
    idx = EditIndex(pairs, 4)
    torch.manual_seed(4)
    deltas = torch.randn(len(idx), 64)
    # a chunk whose last token is edited too: only the last position sees that token's senses
    last_tok = pairs[0][0]
    chunk = torch.cat([r[0][:20], torch.tensor([last_tok])])
    chunks = [chunk] + list(r[:3])
    kl = KLRegularizer(tiny, chunks, idx)
    for i, c in enumerate(chunks):
        with torch.no_grad():
            lp0 = torch.log_softmax(tiny(c[None]).logits[0].float(), -1)
            lp1 = torch.log_softmax(tiny(c[None], sense_edits=idx.edits(deltas)).logits[0].float(), -1)
        ref = float((lp0.exp() * (lp0 - lp1)).sum())  # every position 0 .. len-1
        got = kl.loss(i, tiny.embedding, deltas)
        assert (0.0 if got is None else float(got)) == pytest.approx(ref, rel=1e-4, abs=1e-6)
    # the edited last token alone moves only the last position: a KL that skipped it would be 0 here
    only_last = torch.cat(
        [torch.tensor([t for t in r[0][:20].tolist() if t not in idx.tokens][:10]), torch.tensor([last_tok])]
    )
    kl2 = KLRegularizer(tiny, [only_last], idx)
    assert float(kl2.loss(0, tiny.embedding, deltas)) > 1e-6


def test_rest_kl_counts_outside_the_answer_against_full_forward(tiny, tok, country, corpora):
    """KLRegularizer(starts=..., exclude=...) sums KL(p_orig ‖ p_new) over positions ≥ max(start, first edited) and
    outside [lo, hi): every position of a canonical example but those predicting its answer (the rest-of-example
    KL of finetune), against plain full forwards with and without the edits."""
    from train_edits.compute import KLRegularizer

    r = corpora[1]
    pairs = pairs_for(country, tok, corpora[0])
    idx = EditIndex(pairs, 4)
    torch.manual_seed(7)
    deltas = torch.randn(len(idx), 64)
    ex = country[0].seqs[0]
    end = ex.start + ex.n
    seq = torch.tensor(list(ex.ids[:end]) + r[0][:12].tolist())
    lo, hi = ex.start - 1, end - 1  # the positions predicting the answer's tokens
    kl = KLRegularizer(tiny, [seq, seq, seq], idx, starts=[end - 1, 0, 0], exclude=[(0, 0), (0, 0), (lo, hi)])
    with torch.no_grad():
        lp0 = torch.log_softmax(tiny(seq[None]).logits[0].float(), -1)
        lp1 = torch.log_softmax(tiny(seq[None], sense_edits=idx.edits(deltas)).logits[0].float(), -1)
    per_pos = (lp0.exp() * (lp0 - lp1)).sum(-1)
    assert float(kl.loss(0, tiny.embedding, deltas)) == pytest.approx(float(per_pos[end - 1 :].sum()), rel=1e-4)
    assert float(kl.loss(1, tiny.embedding, deltas)) == pytest.approx(float(per_pos.sum()), rel=1e-4)
    outside = float(per_pos.sum() - per_pos[lo:hi].sum())
    assert float(kl.loss(2, tiny.embedding, deltas)) == pytest.approx(outside, rel=1e-4)
    assert float(per_pos[lo:hi].sum()) > 1e-6  # the exclusion mattered: the answer's own positions moved


def test_rest_kl_keeps_the_rest_of_the_example_closer(tiny, tok, country, corpora):
    """With the rest-of-example KL, the edit moves the example's other positions (and the text after it) less."""
    from train_edits.compute import KLRegularizer

    pairs = pairs_for(country, tok, corpora[0])
    exs = country[:6]
    rest = []
    for i, ex in enumerate(exs):
        s = ex.seqs[0]
        end = s.start + s.n
        rest.append([(torch.tensor(list(s.ids[:end]) + corpora[1][i][:16].tolist()), s.start - 1, end - 1)])
    base = dict(lr=0.3, epochs=3, kl_weight=0.0, grad_accum=1, epsilons=(10.0,), eval_every_epoch=False, seed=1)
    runs = {}
    for w in (0.0, 3.0):
        p = FinetuneParams(**base, rest_kl_weight=w)
        runs[w] = finetune(tiny, exs, LossType.GOOD, pairs, corpora[0][:1], [], p, progress=False, rest=rest)
    idx = EditIndex(pairs, 4)
    flat = [seq for g in rest for seq in g]
    probe = KLRegularizer(tiny, [ids for ids, _, _ in flat], idx, exclude=[(lo, hi) for _, lo, hi in flat])

    def rest_kl(deltas):
        return sum(float(probe.loss(j, tiny.embedding, deltas) or 0.0) for j in range(len(flat)))

    assert rest_kl(runs[3.0].deltas[10.0]) < rest_kl(runs[0.0].deltas[10.0])


def test_lr_by_epsilon_equals_separate_runs(tiny, tok, country, corpora):
    """Per-ε learning rates: each ε's deltas and history are exactly those of a run at its lr alone."""
    pairs = pairs_for(country, tok, corpora[0])[:10]
    base = dict(epochs=2, kl_weight=0.1, grad_accum=2, eval_every_epoch=False, seed=3)
    g, r, exs = corpora[0][:2], corpora[1][:4], country[:4]
    both = finetune(
        tiny,
        exs,
        LossType.GOOD,
        pairs,
        g,
        r,
        FinetuneParams(lr=0.3, epsilons=(10.0, 1e-9), lr_by_epsilon={1e-9: 0.01}, **base),
        progress=False,
    )
    for eps, lr in ((10.0, 0.3), (1e-9, 0.01)):
        alone = finetune(
            tiny, exs, LossType.GOOD, pairs, g, r, FinetuneParams(lr=lr, epsilons=(eps,), **base), progress=False
        )
        assert torch.equal(both.deltas[eps], alone.deltas[eps])
        assert both.chosen_epoch[eps] == alone.chosen_epoch[eps]
        assert [h.g_ratio for h in both.history_of[eps]] == [h.g_ratio for h in alone.history]
    assert [h.lr for h in both.history] == [h.lr for h in both.history_of[10.0]]  # `history`: the largest ε's


class _Stop(Exception):
    pass


def test_resume_from_checkpoint_equals_uninterrupted(tiny, tok, country, corpora, tmp_path):
    """A run stopped after epoch 2 and started again from its checkpoints ends exactly where a run never stopped
    ends: deltas of every ε (two trajectories, at two lrs), chosen epochs, history, optimizer step counts."""
    pairs = pairs_for(country, tok, corpora[0])[:10]
    g, r, exs = corpora[0][:2], corpora[1][:4], country[:5]
    p = FinetuneParams(
        lr=0.3, epochs=4, kl_weight=0.1, grad_accum=2, eval_every_epoch=False, seed=7,
        epsilons=(10.0, 1e-3), lr_by_epsilon={1e-3: 0.05},
    )  # fmt: skip
    whole = finetune(tiny, exs, LossType.GOOD, pairs, g, r, p, progress=False)

    def stop_after_2(rec):
        if rec.epoch == 2:
            raise _Stop

    with pytest.raises(_Stop):
        finetune(
            tiny, exs, LossType.GOOD, pairs, g, r, p, progress=False, on_epoch=stop_after_2, checkpoint_dir=tmp_path
        )
    assert sorted(f.name for f in tmp_path.iterdir()) == ["trajectory-lr0.3.pt"]  # the first trajectory, epoch 2
    seen = []
    resumed = finetune(
        tiny, exs, LossType.GOOD, pairs, g, r, p, progress=False, on_epoch=seen.append, checkpoint_dir=tmp_path
    )
    assert [h.epoch for h in seen] == [0, 1, 2, 3, 4] * 2  # the restored history is reported too
    for eps in (10.0, 1e-3):
        assert torch.equal(resumed.deltas[eps], whole.deltas[eps])
        assert resumed.chosen_epoch[eps] == whole.chosen_epoch[eps]
        assert [h.__dict__ for h in resumed.history_of[eps]] == [h.__dict__ for h in whole.history_of[eps]]
    assert (resumed.optimizer_steps, resumed.examples_counted) == (whole.optimizer_steps, whole.examples_counted)


def test_checkpoint_of_other_inputs_is_not_continued(tiny, tok, country, corpora, tmp_path):
    """A checkpoint left by a run with another seed (or other examples, pairs, corpora) is ignored: the new run
    equals a fresh one."""
    pairs = pairs_for(country, tok, corpora[0])[:10]
    g, r, exs = corpora[0][:2], corpora[1][:4], country[:4]
    base = dict(lr=0.3, epochs=2, kl_weight=0.1, grad_accum=2, eval_every_epoch=False, epsilons=(10.0,))
    finetune(tiny, exs, LossType.GOOD, pairs, g, r, FinetuneParams(seed=1, **base), progress=False,
             checkpoint_dir=tmp_path)  # fmt: skip
    fresh = finetune(tiny, exs, LossType.GOOD, pairs, g, r, FinetuneParams(seed=2, **base), progress=False)
    other = finetune(tiny, exs, LossType.GOOD, pairs, g, r, FinetuneParams(seed=2, **base), progress=False,
                     checkpoint_dir=tmp_path)  # fmt: skip
    assert torch.equal(other.deltas[10.0], fresh.deltas[10.0])
    assert len(other.history) == 3
