"""The Backpack reimplementation against the upstream checkpoint layout and the original code's outputs."""

import json
import shutil

import pytest
import torch

from ensemble.backpack import ALIASES, BackpackConfig, BackpackLM
from tests.conftest import SHARED

LAYOUT = SHARED / "data" / "backpack-gpt2" / "checkpoint-layout.json"
DTYPES = {"float32": torch.float32, "bool": torch.bool}


def test_reference_tiny_reproduces_original_outputs(reference_tiny_dir):
    model = BackpackLM.from_pretrained(reference_tiny_dir)
    ref = torch.load(reference_tiny_dir / "reference_outputs.pt", weights_only=True)
    with torch.no_grad():
        out = model(ref["input_ids"])
    assert out.logits.shape == ref["logits"].shape
    assert out.alpha.shape == ref["alpha"].shape  # [batch, sense, target, source]
    torch.testing.assert_close(out.logits, ref["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.alpha, ref["alpha"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.senses, ref["senses"], atol=1e-5, rtol=0)
    assert not model.training  # dropout off at inference


@pytest.mark.skipif(not LAYOUT.exists(), reason=f"{LAYOUT} not present")
def test_full_size_upstream_layout_loads_strictly_and_exactly(tmp_path):
    """A checkpoint written key by key from the layout file (real shapes, buffers, aliases sharing storage)."""
    layout = json.loads(LAYOUT.read_text())
    assert len(layout["state_dict"]) == 191
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, spec in layout["state_dict"].items():
        if key in ALIASES:
            continue
        shape, dtype = spec["shape"], DTYPES[spec["dtype"]]
        sd[key] = torch.rand(shape, generator=g) > 0.5 if dtype == torch.bool else torch.randn(shape, generator=g)
    for alias, target in ALIASES.items():
        sd[alias] = sd[target]  # shares storage, as transformers saved it
    assert set(sd) == set(layout["state_dict"])
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(layout["config"]))

    model = BackpackLM.from_pretrained(tmp_path)
    ours = model.state_dict()
    checked = 0
    for key, tensor in sd.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key in ALIASES:
            continue
        assert torch.equal(ours[key.removeprefix("backpack.")], tensor), key
        checked += 1
    assert checked == 191 - 24 - 3
    # c_attn.bias of the GPT-2 blocks and of the weight network survive the buffer filter.
    assert torch.equal(ours["gpt2_model.h.0.attn.c_attn.bias"], sd["backpack.gpt2_model.h.0.attn.c_attn.bias"])
    assert torch.equal(ours["sense_weight_net.c_attn.bias"], sd["backpack.sense_weight_net.c_attn.bias"])
    # Conv1D weights are [in, out]; the weight network's nn.Linear is [out, in].
    assert tuple(ours["gpt2_model.h.0.mlp.c_fc.weight"].shape) == (768, 3072)
    assert tuple(ours["sense_weight_net.c_attn.weight"].shape) == (1536, 768)


@pytest.mark.skipif(not LAYOUT.exists(), reason=f"{LAYOUT} not present")
def test_our_checkpoint_writer_matches_the_layout_keys():
    layout = json.loads(LAYOUT.read_text())
    model = BackpackLM(BackpackConfig.tiny(n_layer=12))
    assert set(model.upstream_state_dict()) == set(layout["state_dict"])


@pytest.mark.parametrize("safe", [False, True])
def test_save_and_reload_roundtrip(tmp_path, safe):
    torch.manual_seed(3)
    model = BackpackLM(BackpackConfig.tiny()).eval()
    model.save_pretrained(tmp_path, safe=safe)
    again = BackpackLM.from_pretrained(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert model.fingerprint() == again.fingerprint()


def _copy_with(reference_tiny_dir, tmp_path, mutate):
    shutil.copy(reference_tiny_dir / "config.json", tmp_path / "config.json")
    sd = torch.load(reference_tiny_dir / "pytorch_model.bin", weights_only=True)
    mutate(sd)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    return tmp_path


def test_extra_key_is_refused_by_name(reference_tiny_dir, tmp_path):
    folder = _copy_with(reference_tiny_dir, tmp_path, lambda sd: sd.__setitem__("backpack.extra.weight", torch.ones(2)))
    with pytest.raises(ValueError, match=r"unexpected key 'backpack\.extra\.weight'"):
        BackpackLM.from_pretrained(folder)


def test_missing_key_is_refused_by_name(reference_tiny_dir, tmp_path):
    folder = _copy_with(reference_tiny_dir, tmp_path, lambda sd: sd.pop("backpack.sense_weight_net.c_attn.bias"))
    with pytest.raises(ValueError, match=r"missing key.*backpack\.sense_weight_net\.c_attn\.bias"):
        BackpackLM.from_pretrained(folder)


def test_wrong_shape_is_refused_by_name(reference_tiny_dir, tmp_path):
    def mutate(sd):
        sd["backpack.gpt2_model.h.1.mlp.c_fc.weight"] = sd["backpack.gpt2_model.h.1.mlp.c_fc.weight"].T.contiguous()

    folder = _copy_with(reference_tiny_dir, tmp_path, mutate)
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight.*shape"):
        BackpackLM.from_pretrained(folder)


def test_alpha_rows_are_causal_distributions_and_logits_decompose(reference_tiny_dir):
    model = BackpackLM.from_pretrained(reference_tiny_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids)
        senses = model.sense_vectors(ids)  # (b, k, s, d)
    alpha = out.alpha
    torch.testing.assert_close(alpha.sum(-1), torch.ones(alpha.shape[:-1]), atol=1e-6, rtol=0)
    upper = torch.ones(20, 20, dtype=torch.bool).triu(1)
    assert torch.all(alpha[..., upper] == 0)
    # logits[b, t] = Σ_ℓ Σ_j α[b, ℓ, t, j] · (E C(x_j)_ℓ), written as an explicit loop.
    E = model.embedding
    b, t = 1, 13
    expect = torch.zeros(model.config.vocab_size)
    for ell in range(model.config.num_senses):
        for j in range(t + 1):
            expect += alpha[b, ell, t, j] * (E @ senses[b, ell, j])
    torch.testing.assert_close(out.logits[b, t], expect, atol=1e-4, rtol=1e-5)


def test_padding_mask_does_not_change_real_positions(reference_tiny_dir):
    model = BackpackLM.from_pretrained(reference_tiny_dir)
    a = torch.tensor([[5, 9, 2, 7, 1, 3]])
    padded = torch.tensor([[5, 9, 2, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        full = model(a[:, :4])
        pad = model(padded, attention_mask=mask)
    torch.testing.assert_close(pad.logits[:, :4], full.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(pad.alpha[:, :, :4, :4], full.alpha, atol=1e-6, rtol=0)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="num_senses"):
        BackpackConfig.from_dict({"vocab_size": 10, "n_embd": 8, "n_layer": 1, "n_head": 2, "n_positions": 8})
    with pytest.raises(ValueError, match="n_head"):
        BackpackConfig(n_embd=10, n_head=3, num_senses=2)
