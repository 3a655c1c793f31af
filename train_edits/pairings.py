"""What a run gets by default for a large model sensepack knows: its sense model, its tokenizer, the corpora
G and R (prepared once from the shipped OpenWebText sample) and the finetuning hyperparameters chosen on the
val splits, so that `train_edits run --task T --large smollm2-135m-instruct` needs no recipe knowledge.

Anything the user sets (flag, config file, or an earlier run's config) wins over these; what was filled is
logged (`pairing_defaults` event) and recorded in the run's config.json like any other setting.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ensemble.zoo import SENSE_SMOLLM2_NAME, SMOLLM2_NAME, cache_dir


@dataclass(frozen=True)
class Pairing:
    large: str
    sense_model: str
    tokenizer: str
    # dotted RunConfig path -> value, chosen on the val splits (docs/results-smollm2.md, "Choosing the defaults")
    settings: dict[str, Any] = field(default_factory=dict)
    chunk_len: int = 256  # G / R chunks prepared from the shipped sample when none are given
    g_limit: int = 64
    r_limit: int = 256


PAIRINGS: dict[str, Pairing] = {
    SMOLLM2_NAME: Pairing(
        large=SMOLLM2_NAME,
        sense_model=SENSE_SMOLLM2_NAME,
        tokenizer=SMOLLM2_NAME,
        # country_capital val, sense-smollm2 (docs/results-smollm2.md, "Choosing the defaults"): lr 0.03 fits the
        # statements inside the 1e-3 ball (+5.3 points); the rest-of-example KL keeps the text after the answer as
        # it was (rest-of-prompt NLL −0.05 instead of +2.35); the smaller balls need smaller steps (lr 0.03 leaves
        # them at epoch 0: empty packs; lr 0.003 stays inside 1e-4 for 8 epochs)
        settings={
            "select.k": 8,
            "train.lr": 0.03,
            "train.epochs": 8,
            "train.rest_kl_weight": 1.0,
            "train.rest_scope": "after",
            "train.lr_by_epsilon": {"0.0001": 0.003, "1e-05": 0.001},
        },
    ),
}


def _get(d: dict, dotted: str) -> Any:
    cur: Any = d
    for k in dotted.split("."):
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def _set(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
    cur[keys[-1]] = value


def shipped_corpora(pairing: Pairing) -> tuple[Path, Path]:
    """G.jsonl and R.jsonl of the shipped OpenWebText sample for the pairing's tokenizer, prepared once into the
    cache (the split prepare-corpora makes: seed 0, half the documents each; the sense head trained on R's)."""
    from ensemble.tokenizer import load_tokenizer

    from .corpora import prepare_corpora, read_documents
    from .recipes import OWT_CORPUS

    folder = cache_dir() / "corpora" / f"{pairing.tokenizer}-owt-{pairing.chunk_len}"
    g, r = folder / "G.jsonl", folder / "R.jsonl"
    if not (folder / "corpora.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        try:
            docs = read_documents([OWT_CORPUS])
            tok = load_tokenizer(pairing.tokenizer)
            prepare_corpora(
                tok, docs, tmp, pairing.chunk_len, inputs=[str(OWT_CORPUS)], tokenizer_spec=pairing.tokenizer
            )
            if not (folder / "corpora.json").is_file():  # another run may have finished first: keep its files
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return g, r


def apply_pairing_defaults(data: dict, corpora: bool = True) -> dict[str, Any]:
    """Fill the unset keys of a run's config data for its large model's pairing; return what was filled."""
    large = _get(data, "models.large")
    pairing = PAIRINGS.get(large) if isinstance(large, str) else None
    if pairing is None:
        return {}
    filled: dict[str, Any] = {}
    if _get(data, "models.backpack") is None:
        filled["models.backpack"] = pairing.sense_model
    if _get(data, "models.tokenizer") is None:
        filled["models.tokenizer"] = pairing.tokenizer
    method = _get(data, "method") or "senses"
    if method == "senses" and (_get(data, "models.backpack") or pairing.sense_model) == pairing.sense_model:
        for path, value in pairing.settings.items():  # chosen for this sense model: not for another one
            if _get(data, path) is None:
                filled[path] = value
    if corpora and _get(data, "corpora.g") is None and _get(data, "corpora.r") is None:
        g, r = shipped_corpora(pairing)
        filled.update({"corpora.g": str(g), "corpora.r": str(r)})
        if _get(data, "corpora.g_limit") is None:
            filled["corpora.g_limit"] = pairing.g_limit
        if _get(data, "corpora.r_limit") is None:
            filled["corpora.r_limit"] = pairing.r_limit
    for path, value in filled.items():
        _set(data, path, value)
    return filled


def describe() -> str:
    return json.dumps({k: v.__dict__ for k, v in PAIRINGS.items()}, default=str, indent=1)
