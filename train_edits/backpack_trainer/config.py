"""The Backpack trainer's options, validated at the boundary (each error names the option)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ensemble.backpack import BackpackConfig
from sensepack_common.errors import ConfigError

INIT_CHOICES = ("random", "large", "large-pca")


class TrainConfigError(ConfigError):
    """A bad training option (a usage error, exit code 2); the message names the field."""


@dataclass
class BackpackTrainConfig:
    out: str = "runs/backpack"  # output folder (from_pretrained-loadable) + checkpoints/ + data/
    inputs: list[str] = field(default_factory=list)  # .jsonl/.jsonl.gz (text field) or .txt/.txt.gz files
    tokenizer: str | None = None  # ensemble.tokenizer.load_tokenizer spec; None: packaged GPT-2
    text_field: str = "text"
    hf_dataset: str | None = None  # instead of files: a Hugging Face dataset, streamed (needs network)
    hf_config: str | None = None
    hf_split: str = "train"
    hf_limit: int | None = None  # read only the first N documents
    heldout_fraction: float = 0.05  # fraction of documents held out (at least one)
    eval_max_blocks: int | None = 64  # held-out blocks scored (the first N; None: all)
    seed: int = 0
    # model
    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 4
    num_senses: int = 16
    n_positions: int = 512
    sense_intermediate_scale: int = 4
    attn_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    pad_vocab_multiple: int = 64  # vocab rows rounded up to a multiple of this (1: exactly |U|)
    block_len: int | None = None  # tokens per training block; None: n_positions
    # optimisation
    batch_size: int = 8  # blocks per optimizer step, over all processes and micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    decay_steps: int | None = None  # cosine length in steps; None: the step budget
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm (0: off)
    max_steps: int | None = None
    max_tokens: int | None = None
    max_minutes: float | None = None
    # initialisation and distillation
    init_embeddings: str = "random"  # random | large (copy E_large) | large-pca (PCA of E_large to n_embd)
    init_from: str | None = None  # large model for init_embeddings; None: distill_from
    distill_from: str | None = None  # teacher (ensemble.large_model.load_large_model spec); None: LM loss only
    distill_weight: float = 0.5
    distill_topk: int = 32
    distill_cache: str = "on"  # on: teacher top-k computed once, cached on disk; off: on the fly
    cache_dir: str | None = None  # None: $SENSEPACK_CACHE/distill or ~/.cache/sensepack/distill
    large_dtype: str | None = None  # dtype of the teacher / init model (float32, bfloat16, ...)
    # runtime
    device: str = "auto"  # auto: cuda:LOCAL_RANK when available, else cpu
    amp: bool = True  # bf16 autocast (CUDA only)
    eval_every: int = 200  # steps between held-out evaluations (0: start and end only)
    checkpoint_every: int = 500  # steps between checkpoints (0: end only)
    keep_checkpoints: int = 2  # 0: keep them only while training (deleted after a successful end)
    resume: bool = False  # continue from out/checkpoints/latest

    @classmethod
    def from_dict(cls, d: dict) -> BackpackTrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainConfigError(f"config: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @property
    def block(self) -> int:
        return self.block_len or self.n_positions

    def validate(self, world_size: int = 1) -> None:
        """Check every option that needs no file or model; raise TrainConfigError naming the field."""

        def bad(name, msg):
            raise TrainConfigError(f"{name}: {msg}")

        if not self.inputs and not self.hf_dataset:
            bad("inputs", "give corpus files or hf_dataset")
        if self.inputs and self.hf_dataset:
            bad("inputs", "give corpus files or hf_dataset, not both")
        if not 2 <= self.block <= self.n_positions:
            bad("block_len", f"{self.block} must be in [2, n_positions={self.n_positions}]")
        if not 0.0 < self.heldout_fraction < 1.0:
            bad("heldout_fraction", f"{self.heldout_fraction} must be in (0, 1)")
        for name in ("batch_size", "grad_accum", "pad_vocab_multiple", "n_layer", "n_embd", "n_head", "num_senses"):
            if getattr(self, name) < 1:
                bad(name, f"{getattr(self, name)} must be >= 1")
        if self.batch_size % (self.grad_accum * world_size):
            bad(
                "batch_size",
                f"{self.batch_size} is not divisible by grad_accum {self.grad_accum} × world size {world_size}",
            )
        if self.max_steps is None and self.max_tokens is None and self.max_minutes is None:
            bad("max_steps", "give a budget: max_steps, max_tokens and/or max_minutes")
        for name in ("max_steps", "max_tokens", "decay_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                bad(name, f"{v} must be >= 1")
        if self.max_minutes is not None and self.max_minutes <= 0:
            bad("max_minutes", f"{self.max_minutes} must be > 0")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            bad("lr", f"lr {self.lr} must be > 0 and min_lr_ratio {self.min_lr_ratio} in [0, 1]")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                bad(name, f"{getattr(self, name)} must be >= 0")
        if self.keep_checkpoints < 0:
            bad("keep_checkpoints", f"{self.keep_checkpoints} must be >= 0")
        if self.init_embeddings not in INIT_CHOICES:
            bad("init_embeddings", f"{self.init_embeddings!r} is not one of {list(INIT_CHOICES)}")
        if self.init_embeddings != "random" and not (self.init_from or self.distill_from):
            bad("init_embeddings", f"{self.init_embeddings!r} needs a large model (init_from or distill_from)")
        if not 0.0 <= self.distill_weight <= 1.0:
            bad("distill_weight", f"{self.distill_weight} must be in [0, 1]")
        if self.distill_topk < 1:
            bad("distill_topk", f"{self.distill_topk} must be >= 1")
        if self.distill_cache not in ("on", "off"):
            bad("distill_cache", f"{self.distill_cache!r} must be 'on' or 'off'")
        for name in ("attn_pdrop", "embd_pdrop", "resid_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, f"{getattr(self, name)} must be in [0, 1)")
        if self.eval_max_blocks is not None and self.eval_max_blocks < 1:
            bad("eval_max_blocks", f"{self.eval_max_blocks} must be >= 1 (or None for all)")
        try:
            self.model_config(vocab_size=2, bos=0, eos=0)
        except ValueError as exc:
            raise TrainConfigError(str(exc)) from None

    def model_config(self, vocab_size: int, bos: int, eos: int) -> BackpackConfig:
        return BackpackConfig(
            vocab_size=vocab_size,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_positions=self.n_positions,
            num_senses=self.num_senses,
            sense_intermediate_scale=self.sense_intermediate_scale,
            attn_pdrop=self.attn_pdrop,
            embd_pdrop=self.embd_pdrop,
            resid_pdrop=self.resid_pdrop,
            bos_token_id=bos,
            eos_token_id=eos,
        )
