"""Incremental Backpack decoding against full forward passes."""

import pytest
import torch

from ensemble.backpack import BackpackConfig, BackpackLM
from ensemble.incremental import backpack_logits, decode_step, prefill, slide_windows


def _model(**kw):
    torch.manual_seed(0)
    return BackpackLM(BackpackConfig.tiny(**kw)).eval()


def _full(model, tokens):
    with torch.no_grad():
        out = model(torch.tensor([tokens]))
    return out.logits[0, -1], out.alpha[0, :, -1]  # (V,), (k, s)


@pytest.mark.slow
def test_incremental_equals_full_forward_over_64_steps_ragged_batch():
    model = _model(n_positions=128)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
    cache = prefill(model, prompts)
    seqs = [list(p) for p in prompts]
    for step in range(66):
        alpha = cache.last_alpha
        logits = backpack_logits(model, cache, alpha)
        for b, toks in enumerate(seqs):
            ref_logits, ref_alpha = _full(model, toks)
            n = len(toks)
            torch.testing.assert_close(alpha[b, :, :n], ref_alpha, atol=1e-5, rtol=0)
            assert torch.all(alpha[b, :, n:] == 0)
            torch.testing.assert_close(logits[b], ref_logits, atol=1e-5, rtol=1e-5)
        nxt = torch.randint(0, 50257, (len(seqs),), generator=g)
        decode_step(model, cache, nxt)
        for b, t in enumerate(nxt.tolist()):
            seqs[b].append(t)


def test_rows_that_do_not_advance_are_untouched():
    model = _model(n_positions=64)
    cache = prefill(model, [[1, 2, 3], [4, 5]])
    before = [k.clone() for k in cache.keys]
    alpha_before = cache.last_alpha.clone()
    decode_step(model, cache, torch.tensor([7, 8]), advance=torch.tensor([True, False]))
    assert cache.lengths.tolist() == [4, 2]
    for k0, k1 in zip(before, cache.keys):
        assert torch.equal(k0[1], k1[1])
    assert torch.equal(cache.last_alpha[1], alpha_before[1])
    _, ref_alpha = _full(model, [1, 2, 3, 7])
    torch.testing.assert_close(cache.last_alpha[0, :, :4], ref_alpha, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sliding_window_past_n_positions_matches_fresh_forward_over_window():
    model = _model(n_positions=32)
    keep = 24
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in (30, 5)]
    cache = prefill(model, seqs)
    slides = 0
    for _ in range(80):  # both rows run well past 32 tokens
        nxt = torch.randint(0, 50257, (2,), generator=g)
        slides += slide_windows(model, cache, torch.ones(2, dtype=torch.bool), keep)
        decode_step(model, cache, nxt)
        for b, t in enumerate(nxt.tolist()):
            seqs[b].append(t)
        for b in range(2):
            window = cache.window_tokens(b)
            assert window == seqs[b][-len(window):]  # the most recent tokens
            assert len(window) <= 32
            ref_logits, ref_alpha = _full(model, window)
            torch.testing.assert_close(cache.last_alpha[b, :, : len(window)], ref_alpha, atol=1e-5, rtol=0)
            logits = backpack_logits(model, cache, cache.last_alpha)
            torch.testing.assert_close(logits[b], ref_logits, atol=1e-5, rtol=1e-5)
    assert slides >= 6
