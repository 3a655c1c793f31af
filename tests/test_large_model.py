import json

import pytest
import safetensors
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ensemble import zoo
from ensemble.backpack import BackpackLM
from ensemble.demo import tiny_backpack
from ensemble.ensemble import Ensemble
from ensemble.large_batch import LargeModelBatch, full_logits
from ensemble.large_model import (
    LargeModelInfo,
    large_model_info,
    large_model_info_from_checkpoint,
    load_large_model,
    model_fingerprint,
    tiny_gptj,
)
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
    assert model_fingerprint(b) == model_fingerprint(a)  # remembered per model object...
    assert model_fingerprint(a) != model_fingerprint(b, fresh=True)  # ...until asked again
    assert model_fingerprint(tiny_gptj(seed=3).to(torch.bfloat16)) != model_fingerprint(a)


# --- the large model's identity read from its checkpoint, without loading it (vLLM serving) ---


def _oracle(folder, dtype=None):
    """What the checkpoint-only fingerprint must equal: the real load's."""
    return model_fingerprint(load_large_model(str(folder), dtype=dtype))


def _from_checkpoint(folder, dtype=None):
    return large_model_info_from_checkpoint(str(folder), dtype=dtype).fingerprint


def _tiny_llama(seed=0):
    """A tied Llama (as SmolLM2) at test size."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def _header(path):
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(n))


@pytest.fixture(scope="module")
def gptj_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gptj")
    tiny_gptj(seed=5).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16"])
def test_checkpoint_fingerprint_equals_the_loaded_models(gptj_dir, dtype):
    assert _from_checkpoint(gptj_dir, dtype) == _oracle(gptj_dir, dtype)


def test_checkpoint_fingerprint_of_a_bf16_save_served_in_float32_and_auto(tmp_path):
    tiny_gptj(seed=6).to(torch.bfloat16).save_pretrained(tmp_path)
    assert {t["dtype"] for k, t in _header(tmp_path / "model.safetensors").items() if k != "__metadata__"} == {"BF16"}
    assert _from_checkpoint(tmp_path, "float32") == _oracle(tmp_path, "float32")
    info = large_model_info_from_checkpoint(str(tmp_path))  # "auto": the checkpoint's bfloat16
    assert info.dtype == "bfloat16"
    assert info.fingerprint == _oracle(tmp_path)


def test_checkpoint_fingerprint_of_a_tied_llama(tmp_path):
    _tiny_llama(seed=1).save_pretrained(tmp_path)
    assert "lm_head.weight" not in _header(tmp_path / "model.safetensors")  # read through the tie
    for dtype in (None, "bfloat16"):
        assert _from_checkpoint(tmp_path, dtype) == _oracle(tmp_path, dtype)


def test_checkpoint_fingerprint_of_a_sharded_save(tmp_path, gptj_dir):
    tiny_gptj(seed=5).save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert _from_checkpoint(tmp_path) == _oracle(tmp_path) == _from_checkpoint(gptj_dir)


def test_checkpoint_fingerprint_changes_with_a_sampled_weight_and_the_dtype(tmp_path, gptj_dir):
    model = tiny_gptj(seed=5)
    with torch.no_grad():
        model.transformer.h[1].mlp.fc_in.weight[0, 0] += 1.0  # element 0 is always sampled
    model.save_pretrained(tmp_path)
    changed = _from_checkpoint(tmp_path)
    assert changed != _from_checkpoint(gptj_dir)
    assert changed == _oracle(tmp_path)
    assert _from_checkpoint(gptj_dir, "bfloat16") != _from_checkpoint(gptj_dir, "float32")


def test_checkpoint_info_matches_the_loaded_models_info(gptj_dir, tmp_path):
    loaded = large_model_info(load_large_model(str(gptj_dir)), str(gptj_dir))
    assert loaded == LargeModelInfo(
        name=str(gptj_dir),
        fingerprint=_oracle(gptj_dir),
        architecture="GPTJForCausalLM",
        vocab_rows=50400,
        context_limit=2048,
        dtype="float32",
        device="cpu",
    )
    assert large_model_info_from_checkpoint(str(gptj_dir), device="cpu") == loaded
    assert large_model_info_from_checkpoint(str(gptj_dir)).device == "vllm"
    _tiny_llama().save_pretrained(tmp_path)
    llama = large_model_info_from_checkpoint(str(tmp_path), dtype="bf16", device="cpu")
    assert llama == large_model_info(load_large_model(str(tmp_path), dtype="bf16"), str(tmp_path))
    assert (llama.architecture, llama.vocab_rows, llama.context_limit, llama.dtype) == (
        "LlamaForCausalLM",
        300,
        512,
        "bfloat16",
    )


def test_a_folder_without_safetensors_is_refused_clearly(tmp_path):
    model = tiny_gptj(seed=1)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no safetensors checkpoint.*pytorch_model\.bin"):
        large_model_info_from_checkpoint(str(tmp_path))


def test_a_hub_id_not_in_the_local_cache_is_named(tmp_path, monkeypatch):
    """train_edits asks without download: a hub id missing from the (empty) cache is refused, named."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError, match=r"no-such-org/no-such-model: not a local folder nor a hub id in the local"):
        large_model_info_from_checkpoint("no-such-org/no-such-model")


def test_a_weight_missing_from_the_checkpoint_is_named(tmp_path):
    model = tiny_gptj(seed=1)
    model.config.save_pretrained(tmp_path)
    state = {k: v for k, v in model.state_dict().items() if k != "transformer.ln_f.bias"}
    safetensors.torch.save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"transformer\.ln_f\.bias") as err:
        large_model_info_from_checkpoint(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_the_checkpoint_is_never_loaded_whole(gptj_dir, monkeypatch):
    """Only strided samples are read (memory map): no whole-tensor or whole-model loader is called."""
    expected = _oracle(gptj_dir)

    def refuse(*args, **kwargs):
        raise AssertionError("a whole checkpoint load was called")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "load", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    assert _from_checkpoint(gptj_dir) == expected


def test_checkpoint_fingerprint_of_the_smollm2_zoo_folder():
    name = "smollm2-135m-instruct"
    if not zoo.is_cached(name):
        pytest.skip(f"{name} is not in the zoo cache ({zoo.REGISTRY[name].folder}); this test does not download it")
    info = large_model_info_from_checkpoint(name, device="cpu")
    assert info == large_model_info(load_large_model(name), name)
    assert info.architecture == "LlamaForCausalLM"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batch_cache_grows_in_place_and_stays_exact(arch):
    """Decode steps write into spare cache columns and regrow past them; rows join mid-way (a long one
    widening the batch) and leave: every step's logits equal a full forward of each row's tokens so far."""
    torch.manual_seed(1)
    if arch == "llama":
        model = _tiny_llama(seed=1)
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=512)).eval()
    gen = torch.Generator().manual_seed(0)
    rows = {"a": [5, 6, 7], "b": [8, 9, 10, 11, 12]}
    batch = LargeModelBatch(model)
    batch.prefill([rows["a"], rows["b"]])
    order = ["a", "b"]
    for t in range(90):  # _room gives 32 spare columns at these widths: several regrowths
        if t == 20:  # a long row joins: the batch widens to its length
            rows["c"] = torch.randint(0, 300, (120,), generator=gen).tolist()
            batch.prefill([rows["c"]])
            order.append("c")
        if t == 50:  # the first row leaves
            batch.select([1, 2])
            order.remove("a")
        toks = torch.randint(0, 300, (len(order),), generator=gen)
        got = batch.step(toks)
        for i, key in enumerate(order):
            rows[key].append(int(toks[i]))
        ref = full_logits(model, [rows[k] for k in order])
        for i in range(len(order)):
            torch.testing.assert_close(got[i], ref[i][-1], atol=1e-4, rtol=0)
