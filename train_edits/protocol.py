"""The test protocol of the paper: every method on every seed, then Tables 3 and 4 with standard errors.

    DIR/<method>/seed-<s>/   one full run each (senses: select → train → calibrate → eval → pack;
                             a baseline: train → eval), seeds train.seed, train.seed + 1, ...
    DIR/tables.{md,json,png} mean ± SE over the seeds (train_edits.tables)

Upstream runs 10 seeds per (task, ε) with the hyperparameters chosen by the sweep
(``configs/test/make_test.py``: ``for seed in range(10)``); so does this by default (``--seeds``).
The models, tokenizer and corpora are loaded once and shared by every run.
"""

from __future__ import annotations

import json

from tqdm import tqdm

from .config import validate
from .pipeline import run_all
from .run import Run, event
from .tables import find_reports, write_tables


def protocol(run: Run, seeds: int = 10, methods: tuple[str, ...] = ("senses",)) -> dict:
    base = run.cfg.train.seed
    todo = [(m, base + i) for m in methods for i in range(seeds)]
    for m, s in tqdm(todo, desc=f"protocol {run.cfg.task.name}", disable=not run.progress):
        data = json.loads(run.cfg.model_dump_json())
        data["method"] = m
        data["train"]["seed"] = s
        needs_large = m.endswith("-large") or (m == "senses" and bool(run.cfg.models.large))
        sub = run.derive(run.dir / m / f"seed-{s}", validate(data), recompute=True, large=needs_large)
        run_all(sub)
        event("protocol_run", method=m, seed=s, run_dir=str(sub.dir))
    paths = write_tables(find_reports([run.dir / m for m in methods]), run.dir)
    return {k: str(v) for k, v in paths.items()}
