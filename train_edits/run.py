"""A run: its directory, its validated config and the models and data its steps share, loaded once.

`Run` owns the loaded models (Backpack or sense head, large model, tokenizer, vocabulary), the encoded task,
the corpora G and R; the steps (`train_edits.pipeline`) read them from it. Protocol seeds, sweep trials and
reports share one run's loaded models and corpora through `Run.derive`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from sensepack_common.logs import setup_logging

from .config import RunConfig
from .corpora import check_corpus_tokenizer, read_chunks
from .evaluate import EncodedTask
from .tasks import TaskData

log = logging.getLogger("train_edits")
# upstream configs/hard_neg/make_hard_neg_config.py:15-16: these two score hard negatives as whole texts
HARD_NEG_TEXT_TASKS = ("verb_conjugation", "stereoset")


# --------------------------------------------------------------------------- logging


def log_to_run(run_dir: Path, verbose: bool = False) -> None:
    """Every train_edits record as a JSON line in run_dir/log.jsonl; warnings (everything with `verbose`) on the
    console."""
    setup_logging(
        "INFO", json_logs=False, logger="train_edits", file=run_dir / "log.jsonl",
        console_level="INFO" if verbose else "WARNING",
    )  # fmt: skip


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


def _checkpoint_fingerprint(spec: str, dtype: str | None) -> str | None:
    from ensemble import large_model as lm
    from ensemble import zoo

    if zoo.is_named(spec):
        if not zoo.is_cached(spec):
            return None
    elif not Path(spec).is_dir():
        return None
    try:
        return lm.large_model_info_from_checkpoint(spec, dtype=dtype).fingerprint
    except (ValueError, OSError):  # no safetensors (e.g. .bin only): compared by name and dtype only
        return None


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
        self._checkpoint_fp: tuple[str | None] | None = None  # (fingerprint or None,) once read

    def derive(self, run_dir: str | Path, cfg: RunConfig, recompute: bool = False, large: bool = False) -> Run:
        """A run in `run_dir` with `cfg` that shares this run's loaded models and corpora instead of loading its
        own (protocol seeds, sweep trials and reports change training settings, not the models or the data).
        The large model is shared if this run has loaded it, or loaded here first with `large`."""
        sub = Run(run_dir, cfg, self.progress, recompute=recompute)
        sub._backpack, sub._tok, sub._vocab = self.backpack, self.tokenizer, self.vocab
        sub._large = self.large if large else self._large
        sub._g, sub._r = self.g, self.r
        return sub

    @property
    def large_checkpoint_fingerprint(self) -> str | None:
        """The configured large model's fingerprint read from its local safetensors checkpoint without loading
        it (a folder, or a cached zoo name); None when there is none at hand (a hub id, `tiny-gptj`, .bin only).
        Read once per run: every step's provenance check asks for it."""
        spec = self.cfg.models.large
        if not spec or spec == "none":
            return None
        if self._checkpoint_fp is None:
            self._checkpoint_fp = (_checkpoint_fingerprint(spec, self.cfg.models.large_dtype),)
        return self._checkpoint_fp[0]

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
