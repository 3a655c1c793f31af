"""Canonical-example records, loss types, success thresholds and the six tasks.

Record shapes (one JSON object per line, extra fields ignored):

- single:        {"prefix": str, "suffix": str}
- pair:          {"prefix": str, "suffix1": str, "suffix2": str}
- unconditional: {"text": str}

Per-example *scores* are computed on summed suffix NLLs (nats) and an example
**fails** when ``score > threshold`` (strict):

=============  ===================================  =========================
loss type      score                                 paper threshold
=============  ===================================  =========================
``good``       NLL(suffix)                           −ln 0.2 or −ln 0.05
``bad``        log p(suffix) = −NLL(suffix)          ln 0.001
``balance``    |NLL(suffix1) − NLL(suffix2)|         ln 1.5
``good-v-bad`` NLL(suffix1) − NLL(suffix2)           ln(1/16)
=============  ===================================  =========================

Training losses use the per-token *mean* NLL over each suffix instead of the
sum (see :mod:`train_edits.losses`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal, TypedDict

from ensemble.jsonl import DataError, iter_jsonl  # DataError: re-exported for train_edits' callers


class LossType(str, Enum):
    GOOD = "good"
    BAD = "bad"
    BALANCE = "balance"
    GOOD_V_BAD = "good-v-bad"

    @property
    def is_pair(self) -> bool:
        return self in (LossType.BALANCE, LossType.GOOD_V_BAD)

    @property
    def shape(self) -> Shape:
        return "pair" if self.is_pair else "single"


@dataclass(frozen=True)
class SingleExample:
    prefix: str
    suffix: str
    line: int = 0


@dataclass(frozen=True)
class PairExample:
    prefix: str
    suffix1: str
    suffix2: str
    line: int = 0


@dataclass(frozen=True)
class TextExample:
    text: str
    line: int = 0


Example = SingleExample | PairExample | TextExample
Shape = Literal["single", "pair", "text"]

_FIELDS: dict[str, tuple[str, ...]] = {
    "single": ("prefix", "suffix"),
    "pair": ("prefix", "suffix1", "suffix2"),
    "text": ("text",),
}


def _detect_shape(rec: dict) -> Shape | None:
    if "suffix1" in rec or "suffix2" in rec:
        return "pair"
    if "suffix" in rec:
        return "single"
    if "text" in rec and "prefix" not in rec:
        return "text"
    return None


# A canonical example is a sentence or a paragraph (the paper's longest val record: 6,473 characters); a
# longer record is refused while streaming, before it is parsed or tokenised (TaskConfig.max_record_chars).
MAX_EXAMPLE_CHARS = 100_000


def read_examples(path: str | Path, shape: Shape | None = None, max_chars: int = MAX_EXAMPLE_CHARS) -> list[Example]:
    """Read a JSONL file of records of one shape (auto-detected when ``shape`` is None).

    Blank lines are skipped. Raises :class:`DataError` naming the line and the
    field for malformed JSON, non-UTF-8 bytes, records over `max_chars` characters,
    missing/non-string fields and mixed shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    out: list[Example] = []
    for lineno, rec in iter_jsonl(path, max_chars):  # one reader for every JSONL file
        rec_shape = shape or _detect_shape(rec)
        if rec_shape is None:
            raise DataError(path, lineno, "suffix", "record has none of 'suffix', 'suffix1'/'suffix2' or 'text'")
        if shape is None and out:
            first = _shape_of(out[0])
            if rec_shape != first:
                raise DataError(
                    path, lineno, None, f"record shape '{rec_shape}' differs from the file's first record ('{first}')"
                )
        for field in _FIELDS[rec_shape]:
            if field not in rec:
                raise DataError(
                    path, lineno, field, f"missing (a {rec_shape} record needs {', '.join(_FIELDS[rec_shape])})"
                )
            if not isinstance(rec[field], str):
                raise DataError(path, lineno, field, f"expected a string, got {type(rec[field]).__name__}")
        if rec_shape == "single":
            if not rec["suffix"]:
                raise DataError(path, lineno, "suffix", "empty suffix")
            out.append(SingleExample(rec["prefix"], rec["suffix"], lineno))
        elif rec_shape == "pair":
            for field in ("suffix1", "suffix2"):
                if not rec[field]:
                    raise DataError(path, lineno, field, "empty suffix")
            out.append(PairExample(rec["prefix"], rec["suffix1"], rec["suffix2"], lineno))
        else:
            out.append(TextExample(rec["text"], lineno))
    if not out:
        raise DataError(path, None, None, "no records")
    return out


def _shape_of(ex: Example) -> Shape:
    if isinstance(ex, SingleExample):
        return "single"
    if isinstance(ex, PairExample):
        return "pair"
    return "text"


def shape_of(examples: Iterable[Example]) -> Shape:
    for ex in examples:
        return _shape_of(ex)
    raise ValueError("no examples")


_SPLIT_SUBJECT = re.compile(r"^ (?P<subject>[^.]+?) is (?P<object>\S.*)$")


def repair_split_subjects(examples: list[Example]) -> tuple[list[Example], int]:
    """Move a subject that sits in the suffix back into the prefix.

    Five rows of the upstream country_capital "fixed" statements read prefix "The capital of",
    suffix " Algeria is Alger" (likewise Gibraltar, Macao, Singapore, Vatican City): trained as
    is, they teach "The capital of" → the country's name, not the capital. A single example
    whose prefix ends with "capital of" and whose suffix is " <subject> is <object>" becomes
    prefix "... capital of <subject> is", suffix " <object>" (the statement is unchanged). The Macao
    row also carries a stray `statement = "` before its prefix, which is dropped.
    """
    out, n = [], 0
    for ex in examples:
        if isinstance(ex, SingleExample) and ex.prefix.rstrip().lower().endswith("capital of"):
            m = _SPLIT_SUBJECT.match(ex.suffix)
            if m:
                prefix = ex.prefix.rstrip().removeprefix('statement = "')
                ex = SingleExample(f"{prefix} {m['subject']} is", f" {m['object']}", ex.line)
                n += 1
        out.append(ex)
    return out, n


# ---------------------------------------------------------------------------
# Scores and failure


def example_score(loss_type: LossType, nll: float, nll2: float | None = None) -> float:
    """The per-example evaluation score from summed suffix NLLs (nats)."""
    lt = LossType(loss_type)
    if lt is LossType.GOOD:
        return nll
    if lt is LossType.BAD:
        return -nll
    if nll2 is None:
        raise ValueError(f"loss type {lt.value} needs two suffix NLLs")
    if lt is LossType.BALANCE:
        return abs(nll - nll2)
    return nll - nll2


def is_failure(score: float, threshold: float) -> bool:
    """Failure is a strict ``score > threshold``."""
    return score > threshold


# ---------------------------------------------------------------------------
# The six tasks of the paper


class TaskPaths(TypedDict):
    train: Path
    eval: Path
    hard_neg: Path | None
    unconditional: Path | None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    loss_type: LossType
    threshold: float
    train: str  # path templates relative to the data dir; {split} is val/test
    eval: str
    hard_neg: str | None
    unconditional: str | None

    def paths(self, data_dir: str | Path, split: str = "val") -> TaskPaths:
        root = Path(data_dir)

        def p(t: str) -> Path:
            return root / t.format(split=split)

        return {
            "train": p(self.train),
            "eval": p(self.eval),
            "hard_neg": None if self.hard_neg is None else p(self.hard_neg),
            "unconditional": None if self.unconditional is None else p(self.unconditional),
        }


def _t(name, lt, thr, folder, train, ev, hn, unc) -> TaskSpec:
    f = lambda s: f"{folder}/split/{s}-{{split}}.jsonl"  # noqa: E731
    return TaskSpec(name, LossType(lt), thr, f(train), f(ev), f(hn), f(unc))


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        _t(
            "country_capital",
            "good",
            -math.log(0.2),
            "country_capital",
            "country_capital_fixed",
            "country_capital_clear_eval",
            "country_capital_hard_neg",
            "country_capital_unconditional",
        ),
        _t(
            "company_ceo",
            "good",
            -math.log(0.05),
            "company_ceo",
            "company_ceo_train",
            "company_ceo_eval_clear",
            "company_ceo_hard_neg_eval_clear",
            "company_ceo_unconditional",
        ),
        _t(
            "stereoset",
            "bad",
            math.log(0.001),
            "stereoset",
            "stereoset_train",
            "stereoset_eval_clear",
            "stereoset_hard_neg",
            "stereoset_unconditional",
        ),
        _t(
            "pronoun_gender_bias",
            "balance",
            math.log(1.5),
            "pronoun_gender_bias",
            "pronoun_gender_bias_train",
            "pronoun_gender_bias_eval",
            "pronoun_gender_bias_hard_neg_eval",
            "pronoun_gender_bias_unconditional",
        ),
        _t(
            "temporal",
            "good",
            -math.log(0.05),
            "temporal",
            "temporal_train",
            "temporal_eval_clear",
            "temporal_hard_neg_eval_clear",
            "temporal_unconditional",
        ),
        _t(
            "verb_conjugation",
            "good-v-bad",
            math.log(1 / 16),
            "verb_conjugation",
            "verb_conjugation_train",
            "verb_conjugation_eval",
            "verb_conjugation_hard_neg_eval",
            "verb_conjugation_eval_unconditional",
        ),
    )
}

# Short names used in the paper's tables.
TABLE_NAMES = {
    "country_capital": "Country",
    "company_ceo": "Company",
    "stereoset": "Stereoset",
    "pronoun_gender_bias": "Gender",
    "temporal": "Temporal",
    "verb_conjugation": "Verb",
}


@dataclass
class TaskData:
    """Loaded examples of one task (custom tasks may lack hard negatives / unconditional)."""

    name: str
    loss_type: LossType
    threshold: float
    train: list[Example]
    eval: list[Example]
    hard_neg: list[Example]
    unconditional: list[Example]
    repaired: int = 0  # canonical examples whose subject was moved from the suffix to the prefix

    @classmethod
    def load(
        cls,
        name: str,
        loss_type: LossType | str,
        threshold: float,
        train: str | Path,
        eval: str | Path | None = None,
        hard_neg: str | Path | None = None,
        unconditional: str | Path | None = None,
        max_chars: int = MAX_EXAMPLE_CHARS,
    ) -> TaskData:
        lt = LossType(loss_type)
        tr, repaired = repair_split_subjects(read_examples(train, lt.shape, max_chars))
        ev = read_examples(eval, lt.shape, max_chars) if eval else list(tr)
        hn = read_examples(hard_neg, "single", max_chars) if hard_neg else []
        un = read_examples(unconditional, "text", max_chars) if unconditional else []
        return cls(name, lt, float(threshold), tr, ev, hn, un, repaired)

    @classmethod
    def builtin(
        cls, name: str, data_dir: str | Path, split: str = "val", max_chars: int = MAX_EXAMPLE_CHARS
    ) -> TaskData:
        if name not in TASKS:
            raise KeyError(f"unknown task '{name}' (known: {', '.join(TASKS)})")
        spec = TASKS[name]
        p = spec.paths(data_dir, split)
        return cls.load(
            name, spec.loss_type, spec.threshold, p["train"], p["eval"], p["hard_neg"], p["unconditional"], max_chars
        )
