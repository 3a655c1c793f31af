"""The committed sense head of the SmolLM2 pairing (`sense-smollm2`): its files are the ones the zoo pins, it
attaches to the SmolLM2 the zoo builds on this machine (same fingerprint), and it keeps its quality floor on
held-out text (the G documents of the shipped sample, which it never trained on)."""

from __future__ import annotations

import json

import pytest
import torch

from ensemble import zoo
from ensemble.sense_head import SenseHeadConfig, SenseHeadLM, is_sense_head

# Held-out NLL (nats/token) of the committed head on the first 4 G blocks: 5.027 when it was committed
# (SmolLM2 itself ~3.8, backpack-smollm2 ~6.5); the floor leaves room for float differences, not for a worse head.
HELDOUT_NLL_FLOOR = 5.13


def test_committed_files_match_the_pinned_sha256():
    for name, want in zoo.SENSE_SMOLLM2_FILES.items():
        assert zoo._sha256(zoo.SENSE_SMOLLM2_DIR / name) == want, name
    assert is_sense_head(zoo.SENSE_SMOLLM2_DIR)
    cfg = SenseHeadConfig.from_dict(json.loads((zoo.SENSE_SMOLLM2_DIR / "config.json").read_text()))
    assert cfg.context_model == zoo.SMOLLM2_NAME and cfg.context_fingerprint.startswith("sha256:")


def test_a_tampered_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "SENSE_SMOLLM2_FILES", {"config.json": "0" * 64})
    with pytest.raises(zoo.ZooError, match="sha256 check failed"):
        zoo._install_sense_smollm2(tmp_path)


@pytest.fixture(scope="module")
def head():
    try:
        zoo.resolve(zoo.SMOLLM2_NAME)
    except zoo.ZooError as e:  # no registry here: the rest of the suite still runs
        pytest.skip(f"SmolLM2 could not be fetched: {e}")
    from ensemble.sense_model import load_sense_model

    return load_sense_model(zoo.SENSE_SMOLLM2_NAME)


def test_attaches_to_this_machines_smollm2_and_keeps_its_quality(head):
    from ensemble.tokenizer import load_tokenizer
    from train_edits.corpora import read_documents, split_corpora
    from train_edits.recipes import OWT_CORPUS

    assert isinstance(head, SenseHeadLM)  # attached: the fingerprint the head records is this SmolLM2's
    tok = load_tokenizer(zoo.SMOLLM2_NAME)
    g = split_corpora(tok, read_documents([OWT_CORPUS]), 256).g[:4]
    ids = torch.tensor(g)
    with torch.no_grad():
        logp = torch.log_softmax(head(ids).logits[:, :-1, : len(tok)].float(), -1)
    nll = -float(logp.gather(-1, ids[:, 1:, None]).mean())
    assert nll < HELDOUT_NLL_FLOOR, f"held-out NLL {nll:.3f} above the floor {HELDOUT_NLL_FLOOR}"
