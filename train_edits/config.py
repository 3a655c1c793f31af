"""Run configuration, validated at the boundary (pydantic).

A config file (YAML or JSON) has the sections below; command-line options
override single keys. The resolved config is saved as ``config.json`` in the
run directory so later steps (``calibrate``, ``eval``, ...) reuse it.

.. code-block:: yaml

    name: country
    task: {builtin: country_capital, data_dir: ../shared/data/canonical-examples, split: val}
    # or a custom task: {name: mine, train: my.jsonl, eval: my_eval.jsonl, loss_type: good, threshold: 1.6}
    models: {backpack: stanfordnlp/backpack-gpt2, large: EleutherAI/gpt-j-6b}  # tokenizer: the Backpack folder's
    corpora: {g: runs/corpora/G.jsonl, r: runs/corpora/R.jsonl}
    select: {k: 8, lam: 1000}
    train: {lr: 0.001, kl_weight: 0.3, epochs: 10, grad_accum: 5, epsilons: [0.001, 0.0001, 0.00001]}
    calibrate: {grid: [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]}
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sensepack_common.errors import ConfigError, describe_validation_error

from .calibrate import DEFAULT_GRID
from .tasks import MAX_EXAMPLE_CHARS, TASKS, LossType

DEFAULT_DATA_DIR = os.environ.get("SENSEPACK_CANONICAL_DATA", "../shared/data/canonical-examples")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every number finite (--lr inf: refused)


class ResolvedTask(NamedTuple):
    """The task fields a validated TaskConfig always has (``builtin`` fills them; a custom task must give them)."""

    name: str
    loss_type: LossType
    threshold: float
    train: str


class TaskConfig(_Strict):
    builtin: str | None = None
    name: str | None = None
    data_dir: str = DEFAULT_DATA_DIR
    split: str = "val"
    train: str | None = None
    eval: str | None = None
    hard_neg: str | None = None
    unconditional: str | None = None
    loss_type: LossType | None = None
    threshold: float | None = None
    max_eval: int | None = Field(default=None, ge=1)
    max_train: int | None = Field(default=None, ge=1)
    # a longer record is refused (file, line, limit) while streaming, before it is parsed or tokenised
    max_record_chars: int = Field(default=MAX_EXAMPLE_CHARS, ge=1)

    @model_validator(mode="after")
    def _complete(self) -> TaskConfig:
        if self.builtin is not None:
            if self.builtin not in TASKS:
                raise ValueError(f"builtin: unknown task '{self.builtin}' (known: {', '.join(TASKS)})")
            spec = TASKS[self.builtin]
            self.name = self.name or spec.name
            self.loss_type = self.loss_type or spec.loss_type
            if self.threshold is None:
                self.threshold = spec.threshold
            for key, path in spec.paths(self.data_dir, self.split).items():
                if getattr(self, key) is None and path is not None:
                    setattr(self, key, str(path))
        else:
            missing = [k for k in ("train", "loss_type", "threshold") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"a custom task needs {', '.join(missing)} (or builtin: one of {', '.join(TASKS)})")
            assert self.train is not None  # checked just above
            self.name = self.name or Path(self.train).stem
        return self

    def resolved(self) -> ResolvedTask:
        if self.name is None or self.loss_type is None or self.threshold is None or self.train is None:
            unset = [k for k in ("name", "loss_type", "threshold", "train") if getattr(self, k) is None]
            raise ConfigError(f"task: {', '.join(unset)} not set (the task config was not validated)")
        return ResolvedTask(self.name, self.loss_type, self.threshold, self.train)


class ModelsConfig(_Strict):
    backpack: str = "stanfordnlp/backpack-gpt2"
    large: str | None = None  # e.g. EleutherAI/gpt-j-6b, tiny-gptj, tiny-gptj:SEED; None: no ensemble steps
    # The pairing's tokenizer (folder, hub id or registry name); None: the one saved in the Backpack's
    # folder if it has one, else the packaged GPT-2 BPE. Both models must cover its ids.
    tokenizer: str | None = None
    large_dtype: str | None = None
    device: str = "cpu"


class CorporaConfig(_Strict):
    g: str | None = None
    r: str | None = None
    g_limit: int | None = Field(default=None, ge=1)
    r_limit: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=8, ge=1)


class SelectConfig(_Strict):
    k: int = Field(default=8, ge=1)
    lam: float = Field(default=1000.0, ge=0)


class TrainConfig(_Strict):
    lr: float = Field(default=1e-3, gt=0)
    kl_weight: float = Field(default=0.3, ge=0)
    epochs: int = Field(default=10, ge=0)
    grad_accum: int = Field(default=5, ge=1)
    weight_decay: float = Field(default=0.0, ge=0)
    optimizer: Literal["adamw", "adam8bit"] = "adamw"
    upstream_grad_bug: bool = False
    seed: int = 0
    epsilons: list[float] = Field(default_factory=lambda: [1e-3, 1e-4, 1e-5])
    eval_every_epoch: bool = True
    epoch_cap: dict[str, int] | None = None
    # KL weight on every position of each canonical example but its answer's, the example followed by R text:
    # the edit changes the answer and leaves the rest as it was (0: off, as upstream)
    rest_kl_weight: float = Field(default=0.0, ge=0)
    rest_tokens: int = Field(default=32, ge=1)
    # which positions: "after" the answer only (from its last token on), or "around" it (the example's positions
    # before the answer too, from its first edited token)
    rest_scope: Literal["after", "around"] = "after"
    # per-ε learning rates ({"1e-05": 0.003}; ε not listed use lr): each distinct lr trains its own trajectory
    lr_by_epsilon: dict[str, float] | None = None

    @field_validator("lr_by_epsilon")
    @classmethod
    def _lr_by_eps(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        for k, lr in v.items():
            try:
                eps = float(k)
            except ValueError:
                raise ValueError(f"key {k!r} is not a number (an ε)") from None
            if not eps > 0 or not (lr > 0 and math.isfinite(lr)):
                raise ValueError(f"{k}: ε and its lr must be > 0 and finite, got {lr!r}")
        return v

    @field_validator("epsilons")
    @classmethod
    def _eps(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("at least one ε")
        if any(not (e > 0) for e in v):
            raise ValueError("every ε must be > 0")
        return sorted(set(float(e) for e in v), reverse=True)


class CalibrateConfig(_Strict):
    grid: list[float] = Field(default_factory=lambda: list(DEFAULT_GRID))

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        if not v or any(not (b >= 0) for b in v):
            raise ValueError("grid: non-empty list of β >= 0")
        return sorted(set(float(b) for b in v), reverse=True)


class EvalConfig(_Strict):
    # Hard negatives: "suffix-sum" (mean over records of the summed suffix NLL; upstream's test configs,
    # configs/test/make_test.py:10-17, for all six tasks) or "hard-neg-config" (upstream's
    # configs/hard_neg/make_hard_neg_config.py:10-17: verb_conjugation and stereoset as whole texts
    # prefix+suffix, per-token mean NLL; the other four as suffix sums).
    hard_neg_scoring: Literal["suffix-sum", "hard-neg-config"] = "suffix-sum"
    # Fluency: greedy continuations of the first N eval prompts (0: off), base and each ε's pack side by side,
    # with their repeated-n-gram rates (an edit must say the fact and stop steering)
    fluency_prompts: int = Field(default=50, ge=0)
    fluency_tokens: int = Field(default=24, ge=1)


class BaselineConfig(_Strict):
    # LoRA baselines (method lora-backpack / lora-large): rank and α of the adapters (peft)
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16.0, gt=0)


METHODS = ("senses", "full-backpack", "lora-backpack", "full-large", "lora-large")


class RunConfig(_Strict):
    name: str | None = None
    # senses (the paper's method, packs) or a baseline of Tables 3/4: full finetuning or LoRA of the
    # Backpack or of the large model (train_edits.baselines), same loss, ball and epoch selection
    method: Literal["senses", "full-backpack", "lora-backpack", "full-large", "lora-large"] = "senses"
    task: TaskConfig
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    corpora: CorporaConfig = Field(default_factory=CorporaConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    store: str | None = None

    @property
    def pack_name(self) -> str:
        return (self.name or self.task.name or "pack").replace("_", "-")


def load_config_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:  # json / yaml syntax (JSONDecodeError is a ValueError)
        raise ConfigError(f"{p}: cannot parse: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def set_path(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"{dotted}: '{k}' is not a section")
    cur[keys[-1]] = value


def validate(data: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, "(the options and --config)")) from None
