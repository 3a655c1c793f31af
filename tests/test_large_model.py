import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ensemble.backpack import BackpackLM
from ensemble.demo import tiny_backpack
from ensemble.ensemble import Ensemble
from ensemble.large_model import LargeModelBatch, full_logits, load_large_model, model_fingerprint, tiny_gptj
from ensemble.tokenizer import load_tokenizer


def test_load_large_model_from_a_local_folder_with_dtype(tmp_path):
    model = tiny_gptj(seed=3)
    model.save_pretrained(tmp_path)
    loaded = load_large_model(str(tmp_path), dtype="float32")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert model_fingerprint(loaded) == model_fingerprint(model)
    bf16 = load_large_model(str(tmp_path), dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_large_model(str(tmp_path), dtype="float8")


def test_a_model_without_the_shared_vocabulary_is_refused_by_the_pairing(tmp_path):
    """load_large_model loads any causal LM; the pairing with GPT-2's tokenizer (50257 ids) refuses it."""
    GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    large = load_large_model(str(tmp_path))
    with pytest.raises(ValueError, match=r"large model: vocabulary has 1000 rows, fewer than the tokenizer's 50257"):
        Ensemble(large, tiny_backpack(), load_tokenizer())


def test_any_causal_lm_batches_with_left_padding():
    """GPT-2 (learned positions) through the same left-padded batch as GPT-J (rotary)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=2)).eval()
    batch = LargeModelBatch(model)
    rows = [[5, 6, 7, 8, 9], [10, 11]]
    first = batch.prefill(rows)
    second = batch.step(torch.tensor([1, 2]))
    ref = full_logits(model, [rows[0] + [1], rows[1] + [2]])
    torch.testing.assert_close(first[1], ref[1][-2], atol=1e-5, rtol=0)
    torch.testing.assert_close(second[0], ref[0][-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(second[1], ref[1][-1], atol=1e-5, rtol=0)


def test_backpack_from_pretrained_dtype(reference_tiny_dir):
    model = BackpackLM.from_pretrained(reference_tiny_dir, dtype=torch.bfloat16)
    assert model.embedding.dtype == torch.bfloat16
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.logits.dtype == torch.bfloat16


def test_fingerprint_changes_with_weights_and_dtype():
    a, b = tiny_gptj(seed=3), tiny_gptj(seed=3)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.transformer.h[1].mlp.fc_in.weight[0, 0] += 1.0
    b._sensepack_fingerprint = None
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(tiny_gptj(seed=3).to(torch.bfloat16)) != model_fingerprint(a)
