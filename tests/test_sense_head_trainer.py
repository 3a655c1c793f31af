"""The sense-head distiller on a tiny GPT-J: the teacher pass is cached and resumable, training resumes exactly,
the output loads attached to its large model, and the CLI validates its options."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from ensemble.large_model import load_large_model, model_fingerprint, tiny_gptj
from ensemble.sense_model import load_sense_model
from ensemble.tokenizer import PACKAGED_TOKENIZER_DIR
from train_edits.cli import main as train_edits
from train_edits.sense_head_trainer import SenseHeadTrainConfig, train_sense_head


@pytest.fixture(scope="module")
def large_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gptj")
    tiny_gptj(seed=3).save_pretrained(d)
    return d


def _cfg(large_dir, out, cache, **kw):
    base = dict(
        out=str(out),
        large=str(large_dir),
        tokenizer=str(PACKAGED_TOKENIZER_DIR),
        block_len=32,
        max_train_blocks=6,
        heldout_blocks=2,
        num_senses=4,
        max_distance=16,
        n_positions=64,
        topk=4,
        shard_blocks=4,
        batch_size=2,
        warmup_steps=1,
        max_steps=4,
        eval_every=2,
        checkpoint_every=2,
        cache_dir=str(cache),
    )
    base.update(kw)
    return SenseHeadTrainConfig(**base)


def test_resume_is_exact_and_the_teacher_pass_runs_once(large_dir, tmp_path):
    cache = tmp_path / "cache"
    straight = train_sense_head(_cfg(large_dir, tmp_path / "a", cache), progress=False)
    shards = sorted(cache.rglob("shard-*.safetensors"))
    assert len(shards) == 3  # 6 train blocks in shards of 4 (2 files) + 2 held-out blocks (1 file)
    stamps = [p.stat().st_mtime_ns for p in shards]
    train_sense_head(_cfg(large_dir, tmp_path / "b", cache, max_steps=2), progress=False)
    resumed = train_sense_head(_cfg(large_dir, tmp_path / "b", cache, max_steps=4), progress=False)
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # cached: computed once
    large = load_large_model(str(large_dir), dtype="float32")
    a, b = load_sense_model(straight, large=large), load_sense_model(resumed, large=large)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), k
    rec = json.loads((straight / "training.json").read_text())
    assert rec["steps"] == 4 and rec["history"]["eval_step"] == [2, 4]
    assert json.loads((straight / "config.json").read_text())["context_fingerprint"] == model_fingerprint(large)
    # the held-out NLL it records is the head's own on those blocks, recomputed here
    assert rec["heldout_nll"] > 0 and rec["large_heldout_nll"] > 0


def test_an_interrupted_teacher_pass_resumes_at_the_missing_shard(large_dir, tmp_path):
    cache = tmp_path / "cache"
    train_sense_head(_cfg(large_dir, tmp_path / "a", cache, max_steps=1), progress=False)
    shards = sorted(cache.rglob("shard-*.safetensors"))
    kept = shards[0].stat().st_mtime_ns
    shards[-1].unlink()  # as if the pass had stopped before its last shard
    train_sense_head(_cfg(large_dir, tmp_path / "b", cache, max_steps=1), progress=False)
    assert shards[-1].is_file() and shards[0].stat().st_mtime_ns == kept


def test_cli_validates_and_trains(large_dir, tmp_path):
    r = CliRunner().invoke(train_edits, ["sense-head", "train", "--lr", "-1", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "lr" in r.output
    args = ["sense-head", "train", "--large", str(large_dir), "--tokenizer", str(PACKAGED_TOKENIZER_DIR)]
    args += ["--out", str(tmp_path / "h"), "--block-len", "32", "--max-train-blocks", "4", "--heldout-blocks", "1"]
    args += ["--num-senses", "4", "--n-positions", "64", "--max-steps", "2", "--batch-size", "2", "--topk", "4"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--drop-checkpoints", "--no-progress"]
    r = CliRunner().invoke(train_edits, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    out = json.loads(r.output[r.output.rindex('{"out"') :])  # stderr (transformers' loading bar) shares r.output
    assert out["steps"] == 2 and not (tmp_path / "h" / "checkpoints").exists()
