"""train_edits evaluation: the one-pass multi-variant ensemble scorer against the paper's naive formula."""

import pytest
import torch

from ensemble.backpack import BackpackConfig, BackpackLM
from ensemble.edits import SenseEdits
from ensemble.large_model import tiny_gptj
from ensemble.tokenizer import load_tokenizer
from ensemble.vocab import Vocabulary
from train_edits.encoding import encode_example
from train_edits.evaluate import EncodedTask, EnsembleScorer, task_metrics_all
from train_edits.tasks import LossType, SingleExample, TextExample

U = Vocabulary.gpt2().size


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    bp = BackpackLM(BackpackConfig.tiny()).eval()
    return tiny_gptj(seed=1), bp, load_tokenizer()


def _edits(bp, tok, word: str, scale: float, seed: int) -> SenseEdits:
    ids = tok(word).input_ids
    g = torch.Generator().manual_seed(seed)
    k = bp.config.num_senses
    tokens = torch.tensor([t for t in ids for _ in range(k)])
    senses = torch.tensor([s for _ in ids for s in range(k)])
    return SenseEdits(tokens, senses, torch.randn(len(tokens), bp.config.n_embd, generator=g) * scale)


def _naive_nll(large, bp, ids, start, n, edits, beta) -> float:
    """log_softmax_U(z + β·(log p_ft − log p_pre)) from two full Backpack forwards (the paper's formula)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        z = large(x).logits[0, :, :U].float()
        if edits is not None and beta:
            pre = torch.log_softmax(bp(x).logits[0], -1)[:, :U]
            ft = torch.log_softmax(bp(x, sense_edits=edits).logits[0], -1)[:, :U]
            z = z + beta * (ft - pre)
        lp = torch.log_softmax(z, -1)
    return -sum(float(lp[p - 1, ids[p]]) for p in range(start, start + n))


def test_variants_in_one_pass_equal_the_naive_formula_per_variant(models):
    large, bp, tok = models
    exs = [
        SingleExample("The capital of Mauritius is", " Port Louis", 1),
        SingleExample("In Paris, the capital of France, one finds", " the Louvre", 2),
        SingleExample("Mauritius lies in the Indian Ocean; its capital is", " Port Louis", 3),
    ]
    enc = [encode_example(tok, e) for e in exs]
    texts = [encode_example(tok, TextExample("Mauritius is an island nation.", 4))]
    task = EncodedTask("t", LossType.GOOD, 3.0, enc, enc, enc, texts)
    a, b = _edits(bp, tok, " Mauritius", 0.5, 0), _edits(bp, tok, " Mauritius", 2.0, 1)
    variants = [(None, 0.0), (a, 1.0), (b, 0.3), (a, 0.0)]
    scorer = EnsembleScorer(large, bp, vocab_size=U, variants=variants, batch_size=2)
    sums = scorer.nll_sums_all([e.seqs[0] for e in enc])
    assert sums.shape == (4, 3)
    for v, (ed, beta) in enumerate(variants):
        for j, e in enumerate(enc):
            s = e.seqs[0]
            assert float(sums[v, j]) == pytest.approx(
                _naive_nll(large, bp, list(s.ids), s.start, s.n, ed, beta), rel=1e-5, abs=1e-5
            )
    # β = 0 and no edits are the large model alone, bit for bit; the Paris row has no edited token.
    assert torch.equal(sums[0], sums[3])
    assert float(sums[1, 1]) == float(sums[0, 1])
    # task metrics of every variant equal those of a single-variant scorer
    together = task_metrics_all(scorer, task)
    for v, (ed, beta) in enumerate(variants):
        alone = task_metrics_all(EnsembleScorer(large, bp, ed, beta, vocab_size=U), task)[0]
        assert together[v] == pytest.approx(alone, rel=1e-9)
