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
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from .calibrate import calibrate
from .compute import chunk_batches
from .config import ConfigError, RunConfig
from .corpora import check_corpus_tokenizer, corpus_fingerprint, read_chunks
from .encoding import EncodedExample
from .evaluate import BackpackScorer, EncodedTask, EnsembleScorer, task_metrics, task_metrics_all
from .finetune import FinetuneParams, finetune
from .provenance import ensure_earlier, record
from .report import eps_key, write_reports
from .selection import background_table, select_senses
from .tasks import TaskData

if TYPE_CHECKING:  # pragma: no cover
    from ensemble.edits import SenseEdits

log = logging.getLogger("train_edits")
# upstream configs/hard_neg/make_hard_neg_config.py:15-16: these two score hard negatives as whole texts
HARD_NEG_TEXT_TASKS = ("verb_conjugation", "stereoset")


# --------------------------------------------------------------------------- logging


class JsonLines(logging.Handler):
    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        obj = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        obj.update(getattr(record, "fields", {}) or {})
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(obj, default=str) + "\n")


class _Console(logging.StreamHandler):
    """Ours, as JsonLines: a second setup_logging call replaces them instead of adding more."""


def setup_logging(run_dir: Path | None, verbose: bool = False) -> None:
    root = logging.getLogger("train_edits")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if isinstance(h, (JsonLines, _Console)):
            root.removeHandler(h)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        root.addHandler(JsonLines(run_dir / "log.jsonl"))
    sh = _Console()
    sh.setLevel(logging.INFO if verbose else logging.WARNING)
    sh.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(sh)
    root.propagate = False


def event(name: str, **fields) -> None:
    log.info(name, extra={"fields": fields})


# --------------------------------------------------------------------------- models


def load_backpack(spec: str, device: str = "cpu", large=None):
    """The sense model: a Backpack, or a sense head attached to `large` when it is the head's context model
    (same fingerprint; otherwise the head loads its own)."""
    from ensemble.backpack import BackpackConfig, BackpackLM

    if spec == "tiny" or spec.startswith("tiny:"):
        seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        torch.manual_seed(seed)
        tiny = BackpackLM(BackpackConfig.tiny())
        tiny.name_or_path = spec
        return tiny.to(device).eval()
    from ensemble.large_model import model_fingerprint
    from ensemble.sense_head import SenseHeadConfig, is_sense_head
    from ensemble.sense_model import load_sense_model, sense_model_folder

    folder = sense_model_folder(spec)
    shared = None
    if large is not None and is_sense_head(folder):
        head_cfg = SenseHeadConfig.from_dict(json.loads((folder / "config.json").read_text()))
        if head_cfg.context_fingerprint == model_fingerprint(large):
            shared = large
    model = load_sense_model(spec, large=shared)
    model.name_or_path = spec
    return model.to(device).eval()


def default_tokenizer_spec(backpack_spec: str) -> str | None:
    """The tokenizer saved beside the Backpack, if any; None: the packaged GPT-2 BPE (tiny test Backpacks)."""
    if backpack_spec == "tiny" or backpack_spec.startswith("tiny:"):
        return None
    from ensemble.tokenizer import tokenizer_beside

    return tokenizer_beside(backpack_spec)


def load_large(spec: str | None, dtype: str | None = None, device: str = "cpu"):
    if spec is None or spec == "none":
        return None
    from ensemble import large_model as lm

    if spec == "tiny-gptj" or spec.startswith("tiny-gptj:"):
        seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        # transformers types PreTrainedModel.to through a decorator that mypy reads as taking the model
        return lm.tiny_gptj(seed=seed).to(device)  # type: ignore[arg-type]
    return lm.load_large_model(spec, dtype=dtype, device=device)


class Run:
    """A run directory with its config, lazily loaded models, data and corpora."""

    def __init__(self, run_dir: str | Path, cfg: RunConfig, progress: bool = True, recompute: bool = False):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.progress = progress
        self.recompute = recompute  # recompute stale earlier steps instead of refusing them (provenance.py)
        (self.dir / "config.json").write_text(cfg.model_dump_json(indent=1))
        self._backpack = self._large = self._tok = self._vocab = None
        self._task: EncodedTask | None = None
        self._g: list[torch.Tensor] | None = None
        self._r: list[torch.Tensor] | None = None
        # (fingerprint or None,) once provenance read the large checkpoint's (every step's check asks for it)
        self.large_checkpoint_fingerprint: tuple[str | None] | None = None

    @property
    def backpack(self):
        if self._backpack is None:
            bp = load_backpack(self.cfg.models.backpack, self.cfg.models.device, large=self._head_context())
            self.vocab.check_covers(f"backpack {self.cfg.models.backpack}", bp.config.vocab_size)
            self._backpack = bp
        return self._backpack

    def _head_context(self):
        """The run's large model when the sense model is a sense head (it shares it), else None (not loaded)."""
        from ensemble.sense_head import is_sense_head
        from ensemble.sense_model import sense_model_folder

        spec = self.cfg.models.backpack
        if spec == "tiny" or spec.startswith("tiny:") or not is_sense_head(sense_model_folder(spec)):
            return None
        return self.large

    @property
    def large(self):
        if self._large is None and self.cfg.models.large:
            large = load_large(self.cfg.models.large, self.cfg.models.large_dtype, self.cfg.models.device)
            self.vocab.check_covers(
                f"large model {self.cfg.models.large}", large.get_output_embeddings().weight.shape[0]
            )
            self._large = large
        return self._large

    @property
    def tokenizer(self):
        if self._tok is None:
            from ensemble.tokenizer import load_tokenizer

            spec = self.cfg.models.tokenizer or default_tokenizer_spec(self.cfg.models.backpack)
            self._tok = load_tokenizer(spec)
        return self._tok

    @property
    def vocab(self):
        """The shared vocabulary U of the run's tokenizer (ensemble.vocab.Vocabulary)."""
        if self._vocab is None:
            from ensemble.vocab import Vocabulary

            self._vocab = Vocabulary.from_tokenizer(self.tokenizer)
        return self._vocab

    @property
    def max_len(self) -> int:
        return int(self.backpack.config.n_positions)

    @property
    def task(self) -> EncodedTask:
        if self._task is None:
            t = self.cfg.task
            name, loss_type, threshold, train = t.resolved()
            data = TaskData.load(
                name, loss_type, threshold, train, t.eval, t.hard_neg, t.unconditional, t.max_record_chars
            )
            hard_neg_text = self.cfg.eval.hard_neg_scoring == "hard-neg-config" and t.builtin in HARD_NEG_TEXT_TASKS
            self._task = EncodedTask.encode(
                self.tokenizer, data, self.max_len, t.max_eval, t.max_train, hard_neg_text=hard_neg_text
            )
            if self._task.truncated:
                event("truncated", count=self._task.truncated, max_len=self.max_len)
            if data.repaired:
                event(
                    "repaired_examples",
                    count=data.repaired,
                    why="subject moved from the suffix to the prefix (tasks.repair_split_subjects)",
                )
        return self._task

    def _corpus(self, which: str) -> list[torch.Tensor]:
        path = getattr(self.cfg.corpora, which)
        if path is None:
            raise FileNotFoundError(
                f"corpora.{which}: no {which.upper()} corpus configured (--{which} FILE); "
                f"build one with `train_edits prepare-corpora`"
            )
        check_corpus_tokenizer(path, self.vocab.fingerprint)
        return read_chunks(
            path, self.tokenizer, getattr(self.cfg.corpora, f"{which}_limit"), self.max_len, vocab_size=self.vocab.size
        )

    @property
    def g(self) -> list[torch.Tensor]:
        if self._g is None:
            self._g = self._corpus("g")
        return self._g

    @property
    def r(self) -> list[torch.Tensor]:
        if self._r is None:
            self._r = self._corpus("r")
        return self._r

    def read_json(self, name: str) -> dict:
        p = self.dir / name
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; run the earlier step first")
        return json.loads(p.read_text())

    def write_json(self, name: str, obj) -> Path:
        p = self.dir / name
        p.write_text(json.dumps(obj, indent=1, default=str))
        return p


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
    "Run",
    "load_backpack",
    "load_large",
    "run_all",
    "setup_logging",
    "step_calibrate",
    "step_eval",
    "step_pack",
    "step_select",
    "step_train",
]
