"""Pairing defaults: `train_edits run --large smollm2-135m-instruct` gets the pairing's sense model, tokenizer and
the settings chosen on val, and anything the user sets wins."""

from __future__ import annotations

from train_edits.config import validate
from train_edits.pairings import PAIRINGS, apply_pairing_defaults


def test_known_large_model_gets_its_sense_model_and_chosen_settings():
    pairing = PAIRINGS["smollm2-135m-instruct"]
    data = {"task": {"builtin": "country_capital"}, "models": {"large": "smollm2-135m-instruct"}}
    filled = apply_pairing_defaults(data, corpora=False)
    assert filled["models.backpack"] == pairing.sense_model == "sense-smollm2"
    assert filled["models.tokenizer"] == "smollm2-135m-instruct"
    for path, value in pairing.settings.items():
        assert filled[path] == value
    cfg = validate({**data, "task": {"builtin": "country_capital", "data_dir": "x"}})
    assert cfg.models.backpack == "sense-smollm2" and cfg.train.lr == pairing.settings["train.lr"]


def test_user_settings_win_and_other_sense_models_get_no_tuned_settings():
    data = {"models": {"large": "smollm2-135m-instruct"}, "train": {"lr": 0.5}}
    filled = apply_pairing_defaults(data, corpora=False)
    assert "train.lr" not in filled and data["train"]["lr"] == 0.5
    other = {"models": {"large": "smollm2-135m-instruct", "backpack": "backpack-smollm2"}}
    filled = apply_pairing_defaults(other, corpora=False)
    assert set(filled) == {"models.tokenizer"}  # settings were chosen for sense-smollm2, not this Backpack
    baseline = {"models": {"large": "smollm2-135m-instruct"}, "method": "lora-large"}
    assert not any(k.startswith("train.") for k in apply_pairing_defaults(baseline, corpora=False))


def test_unknown_large_model_gets_nothing():
    data = {"models": {"large": "EleutherAI/gpt-j-6b"}}
    assert apply_pairing_defaults(data) == {} and data == {"models": {"large": "EleutherAI/gpt-j-6b"}}
