import json
import shutil
import subprocess
import sys

import pytest
import torch

from ensemble.edits import SenseEdits
from ensemble.tokenizer import PACKAGED_TOKENIZER_DIR, load_tokenizer, tokenizer_fingerprint
from tests.conftest import REPO, SHARED


def test_packaged_tokenizer_is_the_real_gpt2_bpe(tokenizer):
    assert len(tokenizer) == 50257
    assert tokenizer("The capital of Mauritius is").input_ids == [464, 3139, 286, 46106, 3754, 318]
    assert tokenizer(" Port Louis").input_ids == [4347, 5593]  # leading space kept, no BOS
    assert tokenizer.eos_token_id == 50256
    shared = SHARED / "data" / "gpt2-tokenizer"
    if not shared.is_dir():
        pytest.skip(f"{shared} not present: the packaged copy is checked against it where it is")
    for name in ("vocab.json", "merges.txt", "LICENSE"):
        assert (PACKAGED_TOKENIZER_DIR / name).read_bytes() == (shared / name).read_bytes()


def test_fingerprint_is_stable_and_sensitive(tmp_path, tokenizer):
    fp = tokenizer_fingerprint(tokenizer)
    assert fp == tokenizer_fingerprint(load_tokenizer()) and fp.startswith("sha256:")
    # A folder with its own tokenizer files uses them; changing one merge changes the fingerprint.
    shutil.copy(PACKAGED_TOKENIZER_DIR / "vocab.json", tmp_path / "vocab.json")
    lines = (PACKAGED_TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    (tmp_path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    own = load_tokenizer(tmp_path)
    assert tokenizer_fingerprint(own) != fp
    shutil.copy(PACKAGED_TOKENIZER_DIR / "merges.txt", tmp_path / "merges.txt")
    assert tokenizer_fingerprint(load_tokenizer(tmp_path)) == fp


def test_combine_sums_duplicate_pairs_with_betas():
    a = SenseEdits(torch.tensor([5, 7]), torch.tensor([0, 1]), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    b = SenseEdits(torch.tensor([7, 9]), torch.tensor([1, 0]), torch.tensor([[4.0, 4.0], [1.0, 1.0]]))
    c = SenseEdits.combine([(a, 0.5), (b, 2.0)])
    got = {(int(t), int(s)): d.tolist() for t, s, d in zip(c.token_ids, c.sense_ids, c.deltas, strict=True)}
    assert got == {(5, 0): [0.5, 0.0], (7, 1): [8.0, 9.0], (9, 0): [2.0, 2.0]}


def test_demo_cli_runs_offline_and_the_pack_changes_the_output():
    proc = subprocess.run(
        [sys.executable, "-m", "serve.cli", "generate", "--demo", "--json", "The capital of Mauritius is"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["base"] != result["edited"]
    assert " Louis" in result["edited"]
    proc = subprocess.run(
        [sys.executable, "-m", "serve.cli", "generate", "--json", "x"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 2 and "--demo" in proc.stderr
