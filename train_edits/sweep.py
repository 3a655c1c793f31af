"""Random hyperparameter search (paper appendix C).

Each trial draws lr = 10^−U(1.5, 4), KL weight = 10^U(−1, 0) and k ∈ {5..11}
(λ from the config, 1000 by default) from a ``random.Random`` seeded with
``seed * 100003 + trial``, then selects senses and trains on the **selection
split**. For each ε the score of a trial is the eval success rate at its last
in-ball epoch; the best trial per ε (ties: the earlier trial) is kept.

The **report** then re-runs, per ε, the whole pipeline (select, train,
calibrate, eval, pack) with that trial's hyperparameters on the **report
split**, with training capped at the epoch chosen on the selection split (same
cosine schedule length; training stops at the cap and the last in-ball epoch
up to the cap is kept).
Everything is written under the sweep's run directory:

    trials/trial-NN/      one selection run each (config, selection, training)
    report-eps<ε>/        one full run per ε
    sweep.json            every trial's draws and scores, the best per ε
    report.json/.md       the report runs' results in one table
"""

from __future__ import annotations

import json
import random

from .config import RunConfig, validate
from .pipeline import Run, event, run_all, step_select, step_train
from .report import eps_key, write_reports


def draw(seed: int, trial: int) -> dict:
    rng = random.Random(seed * 100003 + trial)
    return {"lr": 10 ** -rng.uniform(1.5, 4), "kl_weight": 10 ** rng.uniform(-1, 0), "k": rng.randint(5, 11)}


def _with(cfg: RunConfig, **changes) -> RunConfig:
    data = json.loads(cfg.model_dump_json())
    for dotted, v in changes.items():
        sec, key = dotted.split(".")
        data[sec][key] = v
    if "task.split" in changes and data["task"].get("builtin"):
        for k in ("train", "eval", "hard_neg", "unconditional"):
            data["task"][k] = None
    return validate(data)


def sweep(run: Run, trials: int, report_split: str | None = None) -> dict:
    cfg = run.cfg
    seed = cfg.train.seed
    rows = []
    for t in range(trials):
        hp = draw(seed, t)
        tcfg = _with(cfg, **{"train.lr": hp["lr"], "train.kl_weight": hp["kl_weight"], "select.k": hp["k"],
                             "train.eval_every_epoch": True, "train.seed": seed * 1000 + t})
        trun = Run(run.dir / "trials" / f"trial-{t:02d}", tcfg, run.progress)
        trun._backpack, trun._tok = run.backpack, run.tokenizer  # same models, no reload
        trun._g, trun._r = run.g, run.r
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
    out = {"trials": rows, "best": best, "selection_split": cfg.task.split,
           "report_split": report_split or cfg.task.split}
    if (report_split or cfg.task.split) == cfg.task.split:
        out["warning"] = "report split equals the selection split: the report is not held out"
    run.write_json("sweep.json", out)
    reports = []
    for e, b in best.items():
        changes = {"train.lr": b["lr"], "train.kl_weight": b["kl_weight"], "select.k": b["k"],
                   "train.epoch_cap": {e: b["epoch"]}, "train.epsilons": [float(e)], "train.seed": seed}
        if report_split:
            changes["task.split"] = report_split
        rcfg = _with(cfg, **changes)
        rrun = Run(run.dir / f"report-eps{e}", rcfg, run.progress)
        rrun._backpack, rrun._tok, rrun._large = run.backpack, run.tokenizer, run._large
        rrun._g, rrun._r = run.g, run.r
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
