"""Run directories as content-addressed step outputs: no step ever consumes a stale earlier step.

Every step (select, train, calibrate, eval) records in ``steps.json``

- ``inputs``: the fingerprints of what it read: the config keys it depends on (values as given),
  data and corpus files (sha256 of their bytes, with their limits), the tokenizer, the Backpack
  (sha256 of its weights) and, for calibrate/eval, the large model (its spec and, when loaded,
  ``ensemble.large_model.model_fingerprint``);
- ``earlier``: the fingerprints of the earlier steps it consumed;
- ``outputs``: the sha256 of each file it wrote. The step's own fingerprint is the hash of these.

Before a step consumes an earlier step's output it checks, recursively, that the earlier step's
recorded inputs equal the current ones, that its files are the ones it wrote, and that the steps
*it* consumed are still the ones on disk. A stale step is refused (:class:`StaleStepError`, naming
the step, the file and what changed, e.g. ``select.k: 8 -> 2``) unless ``--recompute`` is given, in
which case it is recomputed first. A pack records the fingerprints of exactly the steps it came from.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from sensepack_common.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .run import Run

STEPS_FILE = "steps.json"
# the earlier steps each step consumes: (step, required). A required one that is missing is computed
# (nothing stale can be mixed in); an optional one is used only if present.
DEPENDS = {
    "select": [],
    "train": [("select", True)],
    "calibrate": [("train", True)],
    "eval": [("train", True), ("calibrate", False)],
    "pack": [("train", True), ("calibrate", False), ("eval", False)],
}
MAIN_FILE = {
    "select": "selection.json",
    "train": "training.json",
    "calibrate": "calibration.json",
    "eval": "report.json",
}
# inputs compared only when this process computed them (a model it has loaded anyway)
OPTIONAL_INPUTS = {"models.large.fingerprint"}
# inputs added after steps were first recorded, with the value that computes what the steps did before them:
# a record without the key is fresh while the run keeps that value
ADDED_INPUTS = {
    "train.rest_kl_weight": 0.0,
    "train.rest_tokens": 32,
    "train.rest_scope": "after",
    "train.lr_by_epsilon": None,
}


class StaleStepError(ConfigError):
    """An earlier step's output no longer matches the run's inputs (usage error: exit code 2)."""


def _sha_bytes(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


_FILE_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha(path: str | Path) -> str:
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _FILE_CACHE:
        h = hashlib.sha256()
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _FILE_CACHE[key] = "sha256:" + h.hexdigest()
    return _FILE_CACHE[key]


def _file_input(path: str | None, limit: int | None = None) -> str | None:
    if path is None:
        return None
    if not Path(path).is_file():
        return f"missing file {path}"
    return file_sha(path) + (f" (first {limit})" if limit else "")


def current_inputs(run: Run, step: str, with_large: bool = False) -> dict:
    """The fingerprints of the inputs `step` reads, as the run is configured now."""
    cfg = run.cfg
    t = cfg.task
    loss_type = t.resolved().loss_type
    task = {
        "task.name": t.name,
        "task.loss_type": loss_type.value,
        "task.threshold": t.threshold,
        "task.train": _file_input(t.train),
        "task.max_train": t.max_train,
    }
    evald = {
        "task.eval": _file_input(t.eval),
        "task.hard_neg": _file_input(t.hard_neg),
        "task.unconditional": _file_input(t.unconditional),
        "task.max_eval": t.max_eval,
        "task.name": t.name,
        "task.loss_type": loss_type.value,
        "task.threshold": t.threshold,
    }
    models = {"tokenizer": run.vocab.fingerprint, "models.backpack": run.backpack.fingerprint()}
    g = {"corpora.g": _file_input(cfg.corpora.g, cfg.corpora.g_limit)}
    r = {"corpora.r": _file_input(cfg.corpora.r, cfg.corpora.r_limit)}
    out: dict = {}
    if step == "select":
        out = {**task, **models, **r, "select.k": cfg.select.k, "select.lam": cfg.select.lam}
    elif step == "train":
        out = {**task, **models, **g, **r, **{f"train.{k}": v for k, v in cfg.train.model_dump().items()}}
        if cfg.train.eval_every_epoch:
            out.update(evald)
    elif step in ("calibrate", "eval"):
        out = {**models, **g, "models.large": f"{cfg.models.large} ({cfg.models.large_dtype or 'default dtype'})"}
        if step == "calibrate":
            out["calibrate.grid"] = list(cfg.calibrate.grid)
        else:
            out.update(evald)
            out["eval.hard_neg_scoring"] = cfg.eval.hard_neg_scoring
            out["eval.fluency"] = [cfg.eval.fluency_prompts, cfg.eval.fluency_tokens]
        fingerprint = large_fingerprint(run, with_large)
        if fingerprint is not None:
            out["models.large.fingerprint"] = fingerprint
    return json.loads(json.dumps(out, default=str))


def large_fingerprint(run: Run, loaded: bool) -> str | None:
    """The large model's fingerprint: of the loaded model when this process loads it anyway (`loaded`),
    else read from its local safetensors checkpoint without loading it (a folder, or a cached zoo name;
    ensemble.large_model.large_model_info_from_checkpoint, the same value); None when neither is at hand
    (a hub id, an in-memory test model), and then the input is not compared."""
    cfg = run.cfg
    if not cfg.models.large or cfg.models.large == "none":
        return None
    from ensemble import large_model as lm

    if loaded:
        return lm.model_fingerprint(run.large)
    return run.large_checkpoint_fingerprint


def read_steps(run_dir: Path) -> dict:
    p = Path(run_dir) / STEPS_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def step_fingerprint(rec: dict) -> str:
    return _sha_bytes(json.dumps(rec["outputs"], sort_keys=True).encode())


def record(run: Run, step: str, outputs: list[Path], earlier: dict[str, str], with_large: bool = False) -> str:
    """Write `step`'s record (inputs now, earlier steps consumed, sha256 of its outputs); its fingerprint."""
    steps = read_steps(run.dir)
    rec = {
        "inputs": current_inputs(run, step, with_large),
        "earlier": earlier,
        "outputs": {str(Path(p).relative_to(run.dir)): file_sha(p) for p in outputs},
        "at": time.time(),
    }
    fingerprint = step_fingerprint(rec)
    rec["fingerprint"] = fingerprint
    steps[step] = rec
    (run.dir / STEPS_FILE).write_text(json.dumps(steps, indent=1))
    return fingerprint


def _short(v) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:28] + "…" + s[-28:]


def staleness(run: Run, step: str, with_large: bool = False) -> list[str]:
    """Why `step`'s recorded output cannot be used as is ([] when it is fresh). Earlier steps not checked."""
    rec = read_steps(run.dir).get(step)
    if rec is None:
        return [f"no record of how {MAIN_FILE[step]} was made (written before steps.json existed, or by hand)"]
    why = []
    for rel, sha in rec["outputs"].items():
        p = run.dir / rel
        if not p.is_file():
            why.append(f"{rel} is missing")
        elif file_sha(p) != sha:
            why.append(f"{rel} was changed after the step wrote it")
    now = current_inputs(run, step, with_large)
    for key in sorted(set(rec["inputs"]) | set(now)):
        if key in OPTIONAL_INPUTS and (key not in now or key not in rec["inputs"]):
            continue
        old, new = rec["inputs"].get(key), now.get(key)
        if key not in rec["inputs"] and key in ADDED_INPUTS and new == ADDED_INPUTS[key]:
            continue
        if old != new:
            why.append(f"{key}: {_short(old)} -> {_short(new)}")
    steps = read_steps(run.dir)
    for e, fp in rec.get("earlier", {}).items():
        cur = steps.get(e, {}).get("fingerprint")
        if cur != fp:
            why.append(f"it was computed from another `{e}` output ({MAIN_FILE.get(e, e)} changed since)")
    return why


def ensure_earlier(
    run: Run, step: str, runners: Mapping[str, Callable[[Run], object]], with_large: bool = False
) -> dict[str, str]:
    """Make sure every earlier step `step` consumes is fresh; return their fingerprints.

    Missing required steps are computed; stale ones are recomputed with ``run.recompute`` and refused
    otherwise. Checks recurse through the earlier steps' own dependencies.
    """
    used: dict[str, str] = {}
    for dep, required in DEPENDS[step]:
        if dep == "calibrate" and not run.cfg.models.large:
            continue  # no large model: the Backpack-only eval/pack do not read calibration.json
        exists = (run.dir / MAIN_FILE[dep]).is_file()
        if not exists:
            if not required:
                continue
            runners[dep](run)  # computes and records it (its own earlier steps checked inside)
        else:
            ensure_earlier(run, dep, runners, with_large=False)
            why = staleness(run, dep, with_large=with_large and dep in ("calibrate", "eval"))
            if why:
                if not run.recompute:
                    raise StaleStepError(
                        f"step `{step}` refuses the output of step `{dep}` ({run.dir / MAIN_FILE[dep]}): "
                        + "; ".join(why)
                        + f". Recompute it with `train_edits {dep} --run-dir {run.dir}` (same options), "
                        f"or add --recompute to recompute every stale step"
                    )
                runners[dep](run)
        used[dep] = read_steps(run.dir)[dep]["fingerprint"]
    return used
