"""Random hyperparameter search (paper appendix C).

Each trial draws lr = 10^−U(1.5, 4), KL weight = 10^U(−1, 0) and k ∈ {5..11}
and, for country_capital, λ = ⌊10^U(2, 3.5)⌋ (upstream
``configs/country_capital/backpack_sweep/make_sweep.py:20,25,67,86``; the other
five tasks use λ = 1000 from the config as upstream; ``fixed_lam=True`` keeps
the config's λ for every task) from a ``random.Random`` seeded with
``seed * 100003 + trial``, then selects senses and trains on the **selection
split**. 25 trials by default (upstream's ``SWEEP_SIZE``). For each ε the score
of a trial is the eval success rate at its last in-ball epoch; the best trial
per ε (ties: the earlier trial) is kept.

The **report** then re-runs, per ε, the whole pipeline (select, train,
calibrate, eval, pack) with that trial's hyperparameters on the **report
split** (from ``report_data_dir`` when the test files sit in another folder
than the val files), and, as upstream's test configs (``configs/test/make_test.py``),
keeps the last in-ball epoch of the full training, not capped at the epoch
chosen on the selection split. ``cap_epochs=True`` (``--cap-epochs``) caps it
there instead (same cosine schedule length; training stops at the cap).
Everything is written under the sweep's run directory:

    trials/trial-NN/      one selection run each (config, selection, training)
    report-eps<ε>/        one full run per ε
    sweep.json            every trial's draws and scores, the best per ε
    report.json/.md       the report runs' results in one table
"""

from __future__ import annotations

import json
import math
import random
from typing import Any, TypedDict

from .config import RunConfig, validate
from .pipeline import run_all, step_select, step_train
from .report import eps_key, write_reports
from .run import Run, event

# tasks whose upstream sweep draws λ (the others fix it at 1000)
LAM_SWEPT = ("country_capital",)


class Trial(TypedDict):
    trial: int
    hyperparameters: dict
    seed: int
    scores: dict[str, dict[str, Any]]  # per ε key: epoch, success, g_ratio of its chosen epoch


def draw(seed: int, trial: int, task: str | None = None, fixed_lam: bool = False) -> dict:
    rng = random.Random(seed * 100003 + trial)
    out = {"lr": 10 ** -rng.uniform(1.5, 4), "kl_weight": 10 ** rng.uniform(-1, 0), "k": rng.randint(5, 11)}
    if task in LAM_SWEPT and not fixed_lam:
        out["lam"] = float(math.floor(10 ** rng.uniform(2, 3.5)))  # int(np.power(10.0, U(2, 3.5))) upstream
    return out


def _with(cfg: RunConfig, **changes) -> RunConfig:
    data = json.loads(cfg.model_dump_json())
    for dotted, v in changes.items():
        sec, key = dotted.split(".")
        data[sec][key] = v
    if ("task.split" in changes or "task.data_dir" in changes) and data["task"].get("builtin"):
        for k in ("train", "eval", "hard_neg", "unconditional"):
            data["task"][k] = None
    return validate(data)


def _hp_changes(hp: dict) -> dict:
    out = {"train.lr": hp["lr"], "train.kl_weight": hp["kl_weight"], "select.k": hp["k"]}
    if "lam" in hp:
        out["select.lam"] = hp["lam"]
    return out


def sweep(
    run: Run,
    trials: int = 25,
    report_split: str | None = None,
    report_data_dir: str | None = None,
    cap_epochs: bool = False,
    fixed_lam: bool = False,
) -> dict:
    cfg = run.cfg
    seed = cfg.train.seed
    rows: list[Trial] = []
    for t in range(trials):
        hp = draw(seed, t, cfg.task.builtin, fixed_lam)
        tcfg = _with(cfg, **_hp_changes(hp), **{"train.eval_every_epoch": True, "train.seed": seed * 1000 + t})
        trun = run.derive(run.dir / "trials" / f"trial-{t:02d}", tcfg)
        step_select(trun)
        tr = step_train(trun)
        scores = {}
        for e, ep in tr["chosen_epoch"].items():
            scores[e] = {"epoch": ep, "success": tr["history"][ep]["success"], "g_ratio": tr["history"][ep]["g_ratio"]}
        rows.append({"trial": t, "hyperparameters": hp, "seed": seed * 1000 + t, "scores": scores})
        event("trial", trial=t, **hp, scores=scores)
    best = {}
    for e in (eps_key(x) for x in cfg.train.epsilons):
        top = max(rows, key=lambda r: (r["scores"][e]["success"] or 0.0, -r["trial"]))
        best[e] = {"trial": top["trial"], "epoch": top["scores"][e]["epoch"], **top["hyperparameters"]}
    rsplit, rdir = report_split or cfg.task.split, report_data_dir or cfg.task.data_dir
    out = {
        "trials": rows,
        "best": best,
        "selection_split": cfg.task.split,
        "report_split": rsplit,
        "selection_data_dir": cfg.task.data_dir,
        "report_data_dir": rdir,
        "cap_epochs": cap_epochs,
        "fixed_lam": fixed_lam,
    }
    if rsplit == cfg.task.split and rdir == cfg.task.data_dir:
        out["warning"] = "report split equals the selection split: the report is not held out"
    run.write_json("sweep.json", out)
    reports = []
    for e, b in best.items():
        changes = {**_hp_changes(b), "train.epsilons": [float(e)], "train.seed": seed}
        if cap_epochs:
            changes["train.epoch_cap"] = {e: b["epoch"]}
        if report_split:
            changes["task.split"] = report_split
        if report_data_dir:
            changes["task.data_dir"] = report_data_dir
        rcfg = _with(cfg, **changes)
        rrun = run.derive(run.dir / f"report-eps{e}", rcfg)
        reports.append(run_all(rrun))
    merged = _merge(reports)
    write_reports([merged], run.dir)
    run.write_json("sweep.json", out)
    return out


def _merge(reports: list[dict]) -> dict:
    """One report per ε (each with one 'after' entry) -> one report with all ε."""
    base = json.loads(json.dumps(reports[0]))
    for r in reports[1:]:
        for side in ("backpack", "ensemble"):
            if base.get(side) and r.get(side):
                base[side]["after"].update(r[side]["after"])
    return base
