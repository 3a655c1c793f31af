"""The steps of a run, each reading and writing files in the run directory.

run_dir/
  config.json            resolved, validated config
  log.jsonl              structured log (one JSON object per line)
  selection.json         chosen (token, sense) pairs, per-example top-k with scores
  training.json          epoch history (train loss, G ratio, success), chosen epoch per ε
  edits/eps-<ε>.safetensors   token_ids, sense_ids, deltas of the chosen epoch
  calibration.json       β grid ratios and chosen β per ε (when a large model is configured)
  report.json, report.md evaluation before/after, Backpack and ensemble
  packs/<name>-eps<ε>/   edit packs (edits_store format), one per ε
  plots/*.png            g_ratio.png, success.png, calibration.png
  checkpoints/finetune/  per training trajectory, its state after the last finished epoch (while `train` runs)
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from sensepack_common.errors import ConfigError

from .calibrate import calibrate
from .compute import chunk_batches
from .config import RunConfig
from .corpora import corpus_fingerprint
from .encoding import EncodedExample
from .evaluate import BackpackScorer, EnsembleScorer, task_metrics, task_metrics_all
from .finetune import FinetuneParams, finetune
from .provenance import ensure_earlier, record
from .report import eps_key, write_reports
from .run import Run, event
from .selection import background_table, select_senses

if TYPE_CHECKING:  # pragma: no cover
    from ensemble.edits import SenseEdits

log = logging.getLogger("train_edits")


# --------------------------------------------------------------------------- steps


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def step_select(run: Run) -> dict:
    seed_everything(run.cfg.train.seed)
    t0 = time.time()
    task = run.task
    bg = background_table(run.backpack, run.r, run.cfg.corpora.batch_size, progress=run.progress)
    sel = select_senses(
        run.backpack, task.train, bg, task.loss_type, run.cfg.select.k, run.cfg.select.lam, progress=run.progress
    )
    out = sel.to_json(run.tokenizer)
    out.update(k=run.cfg.select.k, lam=run.cfg.select.lam, n_examples=len(task.train), r_chunks=len(run.r))
    p = run.write_json("selection.json", out)
    record(run, "select", [p], {})
    event("selected", pairs=len(sel.pairs), examples=len(task.train), seconds=round(time.time() - t0, 2))
    return out


def finetune_params(cfg: RunConfig) -> FinetuneParams:
    t = cfg.train
    return FinetuneParams(
        lr=t.lr,
        kl_weight=t.kl_weight,
        epochs=t.epochs,
        grad_accum=t.grad_accum,
        weight_decay=t.weight_decay,
        optimizer=t.optimizer,
        upstream_grad_bug=t.upstream_grad_bug,
        seed=t.seed,
        epsilons=tuple(t.epsilons),
        eval_every_epoch=t.eval_every_epoch,
        epoch_cap={float(k): v for k, v in t.epoch_cap.items()} if t.epoch_cap else None,
        rest_kl_weight=t.rest_kl_weight,
        lr_by_epsilon={float(k): v for k, v in t.lr_by_epsilon.items()} if t.lr_by_epsilon else None,
    )


def rest_sequences(run: Run) -> list[list[tuple[torch.Tensor, int, int]]] | None:
    """Per training example, each of its sequences up to the end of its scored span, then "." and the first
    `train.rest_tokens` tokens of an R chunk (example i takes chunk i mod |R|), with the range [lo, hi) of
    positions the KL does not count: those predicting the span, and with `train.rest_scope` "after" everything
    before them too ("around": the positions before the answer count, e.g. "The capital of Peru" → " is").
    None when the rest-of-example KL is off or R is empty."""
    t = run.cfg.train
    if not t.rest_kl_weight or not run.r:
        return None
    sep = run.tokenizer(".", add_special_tokens=False).input_ids
    out = []
    for i, ex in enumerate(run.task.train):
        tail = sep + run.r[i % len(run.r)][: t.rest_tokens].tolist()
        group = []
        for s in ex.seqs:
            end = s.start + s.n
            ids = list(s.ids[:end]) + tail
            lo = s.start - 1 if t.rest_scope == "around" else 0
            group.append((torch.tensor(ids[: run.max_len], dtype=torch.long), lo, end - 1))
        out.append(group)
    return out


def finetune_checkpoints(run: Run) -> Path:
    """Where sense finetuning keeps each trajectory's state after every epoch, so an interrupted `train` step
    continues where it stopped (gone once the step has written its results)."""
    return run.dir / "checkpoints" / "finetune"


def edits_path(run: Run, eps: float) -> Path:
    return run.dir / "edits" / f"eps-{eps_key(eps)}.safetensors"


def step_train(run: Run) -> dict:
    earlier = ensure_earlier(run, "train", RUNNERS)
    sel = run.read_json("selection.json")
    pairs = [tuple(p) for p in sel["pairs"]]
    task = run.task
    params = finetune_params(run.cfg)
    seed_everything(params.seed)
    t0 = time.time()
    res = finetune(
        run.backpack,
        task.train,
        task.loss_type,
        pairs,
        run.g,
        run.r,
        params,
        eval_examples=task.eval,
        threshold=task.threshold,
        progress=run.progress,
        rest=rest_sequences(run),
        checkpoint_dir=finetune_checkpoints(run),
    )
    seconds = time.time() - t0
    (run.dir / "edits").mkdir(exist_ok=True)
    tok = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    sen = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    written = []
    for eps, d in res.deltas.items():
        save_file({"token_ids": tok, "sense_ids": sen, "deltas": d.float().contiguous()}, str(edits_path(run, eps)))
        written.append(edits_path(run, eps))
    history = [asdict(h) for h in res.history]
    lr_of = {e: (params.lr_by_epsilon or {}).get(e, params.lr) for e in res.chosen_epoch}
    out = {
        "history": history,
        "chosen_epoch": {eps_key(e): c for e, c in res.chosen_epoch.items()},
        "g_ratio": {eps_key(e): res.history_of[e][c].g_ratio for e, c in res.chosen_epoch.items()},
        "n_senses": len(pairs),
        "optimizer_steps": res.optimizer_steps,
        "examples_counted": res.examples_counted,
        "seconds": seconds,
        "seconds_per_epoch": seconds / max(len(history) - 1, 1),
        "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(params).items() if k != "epoch_cap"},
        # per ε: its lr and its trajectory (the same as `history` unless train.lr_by_epsilon gives it another lr)
        "lr_by_epsilon": {eps_key(e): lr for e, lr in lr_of.items()},
        "history_by_epsilon": {eps_key(e): [asdict(h) for h in hist] for e, hist in res.history_of.items()},
        "g_chunks": len(run.g),
        "r_chunks": len(run.r),
        "g_fingerprint": corpus_fingerprint(run.g),
    }
    written.append(run.write_json("training.json", out))
    record(run, "train", written, earlier)
    shutil.rmtree(finetune_checkpoints(run), ignore_errors=True)  # training.json and the edits are what is kept
    event("trained", seconds=round(seconds, 2), chosen=out["chosen_epoch"])
    _plot_training(run, out)
    return out


def _plot_training(run: Run, tr: dict) -> None:
    from .plots import plot_g_ratio, plot_success

    (run.dir / "plots").mkdir(exist_ok=True)
    eps = [float(e) for e in tr["chosen_epoch"]]
    plot_g_ratio(tr["history"], eps, tr["chosen_epoch"], run.dir / "plots" / "g_ratio.png")
    plot_success(tr["history"], run.dir / "plots" / "success.png")


def load_edits(run: Run) -> dict[float, SenseEdits]:
    from ensemble.edits import SenseEdits

    tr = run.read_json("training.json")
    out: dict[float, SenseEdits] = {}
    for e in tr["chosen_epoch"]:
        t = load_file(str(edits_path(run, float(e))))
        out[float(e)] = SenseEdits(t["token_ids"], t["sense_ids"], t["deltas"])
    return out


def nonzero_edits(edits):
    """Drop rows whose Δ is exactly zero (they change nothing); epoch 0 gives an empty edit set."""
    from ensemble.edits import SenseEdits

    keep = edits.deltas.abs().sum(-1) > 0
    return SenseEdits(edits.token_ids[keep], edits.sense_ids[keep], edits.deltas[keep])


def step_calibrate(run: Run) -> dict | None:
    if run.large is None:
        event("calibrate_skipped", reason="no large model configured")
        return None
    earlier = ensure_earlier(run, "calibrate", RUNNERS)
    edits = {e: nonzero_edits(x) for e, x in load_edits(run).items()}
    bs = run.cfg.corpora.batch_size

    def batches():
        for _, ids, mask in chunk_batches(run.g, bs):
            yield ids, mask

    t0 = time.time()
    res = calibrate(
        run.large,
        run.backpack,
        batches(),
        edits,
        run.cfg.calibrate.grid,
        progress=run.progress,
        total=math.ceil(len(run.g) / bs),
        vocab_size=run.vocab.size,
    )
    from ensemble.large_model import model_fingerprint

    out = res.to_json()
    out.update(
        target_model=run.cfg.models.large,
        target_fingerprint=model_fingerprint(run.large),
        g_fingerprint=corpus_fingerprint(run.g),
        tokenizer_fingerprint=run.vocab.fingerprint,
        vocab_size=run.vocab.size,
        seconds=time.time() - t0,
    )
    record(run, "calibrate", [run.write_json("calibration.json", out)], earlier, with_large=True)
    from .plots import plot_calibration

    (run.dir / "plots").mkdir(exist_ok=True)
    plot_calibration(out["per_epsilon"], run.dir / "plots" / "calibration.png", run.cfg.models.large or "")
    event("calibrated", betas={k: v["beta"] for k, v in out["per_epsilon"].items()})
    return out


def step_eval(run: Run) -> dict:
    earlier = ensure_earlier(run, "eval", RUNNERS, with_large=True)
    task = run.task
    tr = run.read_json("training.json")
    edits = {e: nonzero_edits(x) for e, x in load_edits(run).items()}
    label = (lambda what: f"eval {task.name} (Backpack, {what})") if run.progress else (lambda what: None)
    # before and every ε in one pass: α and the senses once per batch for all of them
    bp_variants = [None] + [ed if len(ed) else None for ed in edits.values()]
    bp_metrics = task_metrics_all(BackpackScorer(run.backpack, variants=bp_variants, progress=label("all ε")), task)
    bp_before = bp_metrics[0]
    bp_before["g_ratio"] = 1.0
    bp_after = {}
    for (e, ed), m in zip(edits.items(), bp_metrics[1:], strict=True):
        m.update(epoch=tr["chosen_epoch"][eps_key(e)], g_ratio=tr["g_ratio"][eps_key(e)], n_senses=len(ed))
        bp_after[eps_key(e)] = m
    report: dict[str, object] = {
        "task": task.name,
        "loss_type": task.loss_type.value,
        "threshold": task.threshold,
        "method": "senses",
        "seed": run.cfg.train.seed,
        "backpack": {"name": run.cfg.models.backpack, "before": bp_before, "after": bp_after},
        "ensemble": None,
    }
    cal_path = run.dir / "calibration.json"
    if run.large is not None and cal_path.is_file() and "calibrate" in earlier:
        cal = json.loads(cal_path.read_text())
        # Before and every ε in one pass: the large model runs once per batch for all of them.
        eps_list = list(edits)
        infos = [cal["per_epsilon"][eps_key(e)] for e in eps_list]
        variants = [(None, 0.0)] + [(edits[e], info["beta"]) for e, info in zip(eps_list, infos, strict=True)]
        scorer = EnsembleScorer(
            run.large,
            run.backpack,
            vocab_size=run.vocab.size,
            variants=variants,
            progress=f"eval {task.name} (ensemble)" if run.progress else None,
        )
        metrics = task_metrics_all(scorer, task)
        before = metrics[0]
        before["g_ratio"] = 1.0
        after = {}
        for e, info, m in zip(eps_list, infos, metrics[1:], strict=True):
            m.update(beta=info["beta"], g_ratio=info["ratio"])
            after[eps_key(e)] = m
        if run.cfg.eval.fluency_prompts:
            fluency = _fluency(run, variants)
            before["fluency"] = fluency[0]
            for e, f in zip(eps_list, fluency[1:], strict=True):
                after[eps_key(e)]["fluency"] = f
        report["ensemble"] = {"target": run.cfg.models.large, "before": before, "after": after}
    record(run, "eval", list(write_reports([report], run.dir)), earlier, with_large=True)
    event(
        "evaluated", success_before=bp_before["success"], success_after={k: v["success"] for k, v in bp_after.items()}
    )
    return report


def _fluency(run: Run, variants: list[tuple]) -> list[dict]:
    """Greedy continuations of the first eval prompts (each eval example's prefix, up to its scored span) under
    the large model alone and each ε's pack: repeated n-grams, side by side (evaluate.greedy_fluency)."""
    from ensemble.ensemble import Ensemble

    from .evaluate import greedy_fluency

    prompts = [list(ex.seqs[0].ids[: ex.seqs[0].start]) for ex in run.task.eval[: run.cfg.eval.fluency_prompts]]
    prompts = [p for p in prompts if p]
    ens = Ensemble(run.large, run.backpack, vocab=run.vocab)
    results = greedy_fluency(ens, prompts, variants, run.cfg.eval.fluency_tokens)
    texts = [[run.tokenizer.decode(c) for c in r.pop("continuations")[:5]] for r in results]
    for r, t in zip(results, texts, strict=True):
        r["examples"] = t
    return results


def step_pack(run: Run, names: dict[float, str] | None = None) -> list[Path]:
    """One pack per ε, named `<name>-eps<ε>`; `names` ({ε: pack name}) writes only those ε under those names."""
    from edits_store.format import CalibrationEntry, build_pack, with_calibration, write_pack

    earlier = ensure_earlier(run, "pack", RUNNERS)  # the pack records exactly these step fingerprints
    tr = run.read_json("training.json")
    edits = {e: nonzero_edits(x) for e, x in load_edits(run).items()}
    cal = json.loads((run.dir / "calibration.json").read_text()) if "calibrate" in earlier else None
    if cal and cal.get("tokenizer_fingerprint") and cal["tokenizer_fingerprint"] != run.vocab.fingerprint:
        raise ValueError(
            f"{run.dir / 'calibration.json'}: calibrated with tokenizer {cal['tokenizer_fingerprint']}, "
            f"but the run's tokenizer is {run.vocab.fingerprint}; run `calibrate` again"
        )
    rep = json.loads((run.dir / "report.json").read_text()) if "eval" in earlier else None
    bp = run.backpack
    out = []
    store = None
    if run.cfg.store:
        from edits_store.store import open_store

        store = open_store(run.cfg.store)
    for e, ed in edits.items():
        if names is not None and e not in names:
            continue
        k = eps_key(e)
        training: dict[str, object] = {
            "task": run.cfg.task.name,
            "loss_type": run.cfg.task.resolved().loss_type.value,
            "hyperparameters": tr["params"] | {"k": run.cfg.select.k, "lam": run.cfg.select.lam},
            "selected_senses": tr["n_senses"],
            "epochs": len(tr["history"]) - 1,
            "last_in_ball_epoch": tr["chosen_epoch"][k],
            "backpack_ball_ratio": tr["g_ratio"][k],
            "g_fingerprint": tr["g_fingerprint"],
            "steps": earlier,
        }
        evaluation = {}
        if rep:
            evaluation = {"backpack": {"before": rep["backpack"]["before"], "after": rep["backpack"]["after"][k]}}
            if rep.get("ensemble"):
                evaluation["ensemble"] = {
                    "target": rep["ensemble"]["target"],
                    "before": rep["ensemble"]["before"],
                    "after": rep["ensemble"]["after"][k],
                }
        pack_name = names[e] if names is not None else f"{run.cfg.pack_name}-eps{k}"
        pack = build_pack(
            pack_name,
            ed.token_ids.long(),
            ed.sense_ids.long(),
            ed.deltas.float(),
            backpack_name=run.cfg.models.backpack,
            backpack_fingerprint=bp.fingerprint(),
            tokenizer_fingerprint=run.vocab.fingerprint,
            vocab_size=int(bp.config.vocab_size),
            num_senses=int(bp.config.num_senses),
            epsilon=float(e),
            training=_json_safe(training),
            evaluation=_json_safe(evaluation),
        )
        if cal:
            info = cal["per_epsilon"][k]
            pack = with_calibration(
                pack,
                [
                    CalibrationEntry(
                        target_model=str(cal["target_model"]),
                        target_fingerprint=cal["target_fingerprint"],
                        beta=float(info["beta"]),
                        ball_ratio=float(info["ratio"]),
                        g_fingerprint=cal["g_fingerprint"],
                        g_tokens=int(cal["tokens"]),
                        epsilon=float(e),
                    )
                ],
            )
        folder = run.dir / "packs" / pack.name
        write_pack(pack, folder)
        out.append(folder)
        if store is not None:
            version = store.publish(pack)
            event("published", pack=pack.name, version=version)
        event("pack_written", pack=pack.name, folder=str(folder), n=len(ed))
    return out


def _json_safe(obj):
    return json.loads(json.dumps(obj, default=str))


RUNNERS = {"select": step_select, "train": step_train, "calibrate": step_calibrate, "eval": step_eval}


def step_baseline(run: Run) -> dict:
    """A Table 3/4 baseline (full finetuning or LoRA of the Backpack or of the large model): train with the
    same loss, KL, ball and last-in-ball-epoch selection, evaluate before/after; writes baseline.json and
    report.json/.md. One step that recomputes everything it reports, so nothing stale can be mixed in."""
    from .baselines import BaselineParams, finetune_baseline

    cfg, task = run.cfg, run.task
    kind, side = cfg.method.split("-")
    t = cfg.train
    p = BaselineParams(
        kind=kind,
        lr=t.lr,
        kl_weight=t.kl_weight,
        epochs=t.epochs,
        grad_accum=t.grad_accum,
        weight_decay=t.weight_decay,
        seed=t.seed,
        epsilons=tuple(t.epsilons),
        lora_rank=cfg.baseline.lora_rank,
        lora_alpha=cfg.baseline.lora_alpha,
    )
    if side == "large" and run.large is None:
        raise ConfigError(f"method {cfg.method}: no large model configured (--large)")
    orig = run.backpack if side == "backpack" else run.large
    vocab = None if side == "backpack" else run.vocab.size
    seed_everything(t.seed)
    t0 = time.time()
    res = finetune_baseline(orig, task.train, task.loss_type, run.g, run.r, p, vocab_size=vocab, progress=run.progress)
    seconds = time.time() - t0
    if side == "backpack":

        def scorer(m, label):
            return BackpackScorer(m, progress=f"eval {task.name} ({label})" if run.progress else None)
    else:

        def scorer(m, label):
            return EnsembleScorer(
                m,
                run.backpack,
                vocab_size=run.vocab.size,
                variants=[(None, 0.0)],
                progress=f"eval {task.name} ({label})" if run.progress else None,
            )

    before = task_metrics(scorer(orig, "before"), task)
    before["g_ratio"] = 1.0
    after = {}
    for e in t.epsilons:
        m = task_metrics(scorer(res.load(e), f"ε {e:g}"), task)
        c = res.chosen_epoch[e]
        m.update(epoch=c, g_ratio=res.history[c].g_ratio)
        after[eps_key(e)] = m
    name = cfg.models.backpack if side == "backpack" else cfg.models.large
    report: dict[str, object] = {
        "task": task.name,
        "loss_type": task.loss_type.value,
        "threshold": task.threshold,
        "method": cfg.method,
        "seed": t.seed,
        "backpack": None,
        "ensemble": None,
    }
    report["backpack" if side == "backpack" else "ensemble"] = {
        "name": name,
        "target": name,
        "before": before,
        "after": after,
    }
    run.write_json(
        "baseline.json",
        {
            "method": cfg.method,
            "params": _json_safe(asdict(p)),
            "trainable_parameters": res.trainable,
            "history": [asdict(h) for h in res.history],
            "chosen_epoch": {eps_key(e): c for e, c in res.chosen_epoch.items()},
            "g_ratio": {eps_key(e): res.history[c].g_ratio for e, c in res.chosen_epoch.items()},
            "seconds": seconds,
            "g_chunks": len(run.g),
            "r_chunks": len(run.r),
        },
    )
    write_reports([report], run.dir)
    event("baseline", method=cfg.method, seconds=round(seconds, 2), chosen={k: v["epoch"] for k, v in after.items()})
    return report


def run_all(run: Run) -> dict:
    if run.cfg.method != "senses":
        return step_baseline(run)
    step_select(run)
    step_train(run)
    step_calibrate(run)
    rep = step_eval(run)
    step_pack(run)
    return rep


__all__ = [
    "EncodedExample",
    "run_all",
    "step_calibrate",
    "step_eval",
    "step_pack",
    "step_select",
    "step_train",
]
