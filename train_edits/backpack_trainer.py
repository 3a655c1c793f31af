"""Train a Backpack LM from scratch for any tokenizer.

    train_edits backpack train corpus.jsonl --tokenizer smollm2-135m-instruct --out runs/bp --max-steps 2000
    torchrun --nproc_per_node 2 -m train_edits backpack train corpus.jsonl ...   (DDP, same flags)

Python API: ``train_backpack(BackpackTrainConfig(...)) -> Path`` (the output folder).

Data. Documents (JSONL ``text`` field, ``.jsonl.gz``, ``.txt``, or a streamed Hugging Face
dataset) are shuffled with ``seed`` and split **by document** into train and held-out. Each
side's documents are tokenized without BOS, each preceded by the tokenizer's document
separator (``Vocabulary.from_tokenizer(tok).doc_sep_id``), concatenated in the shuffled order
and cut into consecutive blocks of ``block_len`` tokens (the last partial block is dropped).
Block order: epoch e visits the train blocks in ``randperm(n, seed + 7919·(e+1))`` order; the
global sample counter is the whole data position, so resume and world size change nothing.

Model. ``BackpackConfig`` from the options; vocab_size = |U| = len(tokenizer) rounded up to a
multiple of ``pad_vocab_multiple`` (rows ≥ |U| are padding: never input, never scored).

Loss, per scored position (b, t) — token x_{t+1} predicted from x_{≤t}; N positions, block
position 0 is never a target:

    p_θ        = softmax over U of the student's logits z[:, :|U|]
    CE         = (1/N) Σ −log p_θ(x_{t+1})
    q_{t,i}    = exp(ℓ_{t,i}) / Σ_{j≤k} exp(ℓ_{t,j})        ℓ: the teacher's top-k log_softmax_U values,
                                                             K_{t,i}: their ids (renormalised top-k)
    KD         = (1/N) Σ −Σ_i q_{t,i} log p_θ(K_{t,i})       (cross-entropy; = KL(q ‖ p_θ|K) + H(q))
    loss       = (1 − w)·CE + w·KD                          (w = distill_weight; w = 0 without a teacher)

Held-out NLL: the same CE over every held-out block (first token of each block not scored),
micro-averaged per token, in nats; ppl = exp(NLL).

Optimisation. AdamW; weight decay on the 2-D weights of the transformer and sense network
only (not on biases, LayerNorms or the embeddings, whose rows are also the tied LM head and
would shrink when rarely seen). Linear warmup over ``warmup_steps`` to ``lr``, then cosine
decay to ``min_lr_ratio·lr`` at ``decay_steps`` (default: the step budget; with only
``max_minutes`` the cosine follows elapsed time, which is not reproducible). Gradient
clipping on the global norm; ``grad_accum`` micro-steps per optimizer step; bf16 autocast on
CUDA only.

Distributed. Under torchrun (WORLD_SIZE > 1) the process group is gloo on CPU, nccl on CUDA,
and the model is wrapped in DDP. Each optimizer step's ``batch_size`` blocks (global) are cut
into ``grad_accum`` micro-batches and each micro-batch into ``world_size`` equal rank slices:
every rank's loss is its slice's mean, and DDP's gradient average makes the update the global
mean, the same as one process (up to summation order). Dropout (off by default) is seeded
per (step, micro-step, rank), so resume is exact with it too, but 1 vs N processes then
differ. Only rank 0 writes files, plots and progress bars.

Checkpoints (``out/checkpoints/step-N.pt``): model, optimizer, step, data position, RNG
states, elapsed seconds and history; world-size independent, so a run may resume on another
number of processes with the same global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ensemble.backpack import BackpackConfig, BackpackLM
from ensemble.vocab import DOC_SEPARATOR, Vocabulary
from sensepack_common.errors import ConfigError

from .corpora import read_documents
from .tasks import DataError

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


# ---------------------------------------------------------------------------------------------- data


def read_hf_corpus(
    name: str, split: str, text_field: str, config: str | None, limit: int | None
) -> Iterator[str]:  # pragma: no cover - needs network and `datasets`
    """Stream documents of a Hugging Face dataset (not runnable offline; kept minimal)."""
    try:
        import datasets  # type: ignore
    except ImportError as exc:
        raise RuntimeError("hf_dataset needs the 'datasets' package (pip install datasets)") from exc
    for i, rec in enumerate(datasets.load_dataset(name, config, split=split, streaming=True)):
        if limit is not None and i >= limit:
            break
        yield rec[text_field]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def tensor_sha256(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def pack_blocks(tokenizer, docs: list[str], sep_id: int, block_len: int) -> tuple[torch.Tensor, int]:
    """[sep, doc0..., sep, doc1..., ...] cut into (n, block_len) int32 blocks; also the stream length."""
    bodies = [d[len(DOC_SEPARATOR) :] if d.startswith(DOC_SEPARATOR) else d for d in docs]
    stream: list[int] = []
    for ids in tokenizer(bodies, add_special_tokens=False, verbose=False)["input_ids"] if bodies else []:
        stream.append(sep_id)
        stream.extend(ids)
    n = len(stream) // block_len
    return torch.tensor(stream[: n * block_len], dtype=torch.int32).view(n, block_len), len(stream)


@dataclass
class CorpusData:
    train: torch.Tensor  # (n_train, block_len) int32
    heldout: torch.Tensor  # (n_heldout, block_len) int32, all held-out blocks
    meta: dict  # sources, document/token counts, fingerprints

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]


def prepare_corpus(cfg: BackpackTrainConfig, tokenizer, vocab: Vocabulary) -> CorpusData:
    """Read, split by document, tokenize and pack (see the module docstring)."""
    if cfg.hf_dataset:
        docs = list(read_hf_corpus(cfg.hf_dataset, cfg.hf_split, cfg.text_field, cfg.hf_config, cfg.hf_limit))
        sources = [
            {"hf_dataset": cfg.hf_dataset, "config": cfg.hf_config, "split": cfg.hf_split, "limit": cfg.hf_limit}
        ]
    else:
        docs = read_documents(cfg.inputs, cfg.text_field)
        sources = [{"file": str(p), "sha256": file_sha256(p)} for p in cfg.inputs]
    where = cfg.hf_dataset or ", ".join(cfg.inputs)  # validated: one or the other
    if len(docs) < 2:
        raise DataError(
            where,
            None,
            None,
            f"{len(docs)} document(s): need at least two to split into train and held-out",
        )
    order = list(range(len(docs)))
    random.Random(cfg.seed).shuffle(order)
    n_held = min(max(1, round(len(docs) * cfg.heldout_fraction)), len(docs) - 1)
    heldout, n_held_tok = pack_blocks(tokenizer, [docs[i] for i in order[:n_held]], vocab.doc_sep_id, cfg.block)
    train, n_train_tok = pack_blocks(tokenizer, [docs[i] for i in order[n_held:]], vocab.doc_sep_id, cfg.block)
    if len(heldout) == 0:
        raise DataError(
            where,
            None,
            None,
            f"held-out split has {n_held_tok} tokens, fewer than one block of "
            f"{cfg.block}: raise heldout_fraction or lower block_len",
        )
    if len(train) == 0:
        raise DataError(where, None, None, f"train split has {n_train_tok} tokens, fewer than one block of {cfg.block}")
    meta = {
        "sources": sources,
        "documents": len(docs),
        "train_documents": len(docs) - n_held,
        "heldout_documents": n_held,
        "train_tokens": n_train_tok,
        "heldout_tokens": n_held_tok,
        "train_blocks": len(train),
        "heldout_blocks": len(heldout),
        "fingerprint": tensor_sha256(train, heldout),
    }
    return CorpusData(train, heldout, meta)


class BlockOrder:
    """Global sample g -> train block: epoch g // n visits the blocks in a seeded permutation."""

    def __init__(self, n_blocks: int, seed: int):
        self.n, self.seed = n_blocks, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            gen = torch.Generator().manual_seed(self.seed + 7919 * (epoch + 1))
            self._perms[epoch] = torch.randperm(self.n, generator=gen)
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        return torch.stack([self._perm(g // self.n)[g % self.n] for g in range(start, start + count)])


# ---------------------------------------------------------------------------------------------- loss


def lm_losses(
    logits: torch.Tensor,
    blocks: torch.Tensor,
    vocab_size: int,
    teacher_ids: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(CE, KD) means over the scored positions (formulas in the module docstring).

    logits (b, L, V ≥ |U|) for blocks (b, L); teacher_ids / teacher_logprobs (b, L−1, k) for
    positions 0..L−2 (the predictions of tokens 1..L−1). KD is None without a teacher.
    """
    logp = torch.log_softmax(logits[:, :-1, :vocab_size].float(), dim=-1)  # over U only
    targets = blocks[:, 1:].long()
    ce = -logp.gather(-1, targets.unsqueeze(-1)).mean()
    if teacher_ids is None:
        return ce, None
    if teacher_logprobs is None:
        raise ValueError("lm_losses: teacher_ids given without teacher_logprobs")
    q = torch.softmax(teacher_logprobs.float(), dim=-1)  # renormalised top-k
    kd = -(q * logp.gather(-1, teacher_ids.long())).sum(-1).mean()
    return ce, kd


@torch.no_grad()
def teacher_topk(
    teacher: nn.Module, blocks: torch.Tensor, vocab_size: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k (ids int32, log_softmax_U float32) for positions 0..L−2 of each block."""
    device = next(teacher.parameters()).device
    logits = teacher(input_ids=blocks.to(device).long()).logits[:, :-1, :vocab_size].float()
    lp, ids = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
    return ids.to(torch.int32), lp


# --------------------------------------------------------------------------------------- distributed


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device_type: str) -> DistEnv:
        """torchrun's WORLD_SIZE / RANK / LOCAL_RANK; init the process group if nobody has."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        env = cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device_type == "cuda" else "gloo")
            env.initialized_here = True
        return env

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def broadcast(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.broadcast(t, 0)
        return t.cpu().tolist()

    def close(self) -> None:
        if self.initialized_here:
            torch.distributed.destroy_process_group()


class _LogitsOnly(nn.Module):
    """What DDP wraps: the Backpack's forward, returning only the logits tensor."""

    def __init__(self, backpack: BackpackLM):
        super().__init__()
        self.backpack = backpack

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.backpack(input_ids).logits


# ------------------------------------------------------------------------------------------ training


def default_cache_dir() -> Path:
    root = os.environ.get("SENSEPACK_CACHE") or Path.home() / ".cache" / "sensepack"
    return Path(root) / "distill"


def lr_at(cfg: BackpackTrainConfig, step: int, decay_steps: int | None, time_fraction: float = 0.0) -> float:
    """Linear warmup to lr over warmup_steps, then cosine to min_lr_ratio·lr (by steps, or by time)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if decay_steps is None:
        frac = time_fraction
    else:
        frac = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    frac = min(max(frac, 0.0), 1.0)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + (cfg.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def param_groups(model: BackpackLM, weight_decay: float) -> list[dict]:
    """Decay the 2-D weights of Conv1D / Linear layers; not biases, LayerNorms or embeddings."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    embeddings = {id(model.gpt2_model.wte.weight), id(model.gpt2_model.wpe.weight)}
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def init_embeddings_from(model: BackpackLM, large_embedding: torch.Tensor, how: str, vocab_size: int) -> dict:
    """Overwrite rows [0, |U|) of E with the large model's input embedding (``large``: same width)
    or its PCA projection (``large-pca``: centred, top-n_embd principal directions, rescaled so
    the rows' overall std equals the random init's, initializer_range)."""
    d = model.config.n_embd
    src = large_embedding[:vocab_size].detach().float().cpu()
    if src.shape[0] < vocab_size:
        raise TrainConfigError(
            f"init_embeddings: the large model has {src.shape[0]} embedding rows, "
            f"fewer than the tokenizer's {vocab_size}"
        )
    if how == "large":
        if src.shape[1] != d:
            raise TrainConfigError(
                f"init_embeddings: 'large' needs the large model's width {src.shape[1]} to equal "
                f"n_embd {d}; use 'large-pca'"
            )
        rows = src
    else:
        if src.shape[1] < d:
            raise TrainConfigError(
                f"init_embeddings: PCA to n_embd {d} needs a large model at least that wide (it has {src.shape[1]})"
            )
        centred = src - src.mean(0, keepdim=True)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        rows = centred @ vh[:d].T
        rows = rows * (model.config.initializer_range / rows.std())
    with torch.no_grad():
        model.gpt2_model.wte.weight[:vocab_size] = rows.to(model.gpt2_model.wte.weight.dtype)
    return {"how": how, "source_shape": list(large_embedding.shape)}


def _check_teacher_tokenizer(spec: str, ours_fp: str, ours_size: int) -> str:
    """Refuse a large model whose tokenizer differs from ours; return its fingerprint."""
    from ensemble.tokenizer import load_tokenizer, tokenizer_fingerprint

    try:
        theirs = load_tokenizer(spec)
    except Exception as exc:  # noqa: BLE001 - any loader failure means: no tokenizer to compare
        raise TrainConfigError(
            f"large model {spec}: cannot load its tokenizer to compare with the Backpack's "
            f"({type(exc).__name__}: {exc})"
        ) from None
    fp = tokenizer_fingerprint(theirs)
    if fp != ours_fp:
        raise TrainConfigError(
            f"large model {spec}: its tokenizer ({len(theirs)} ids, {fp[:19]}…) differs from "
            f"the Backpack's ({ours_size} ids, {ours_fp[:19]}…); train with --tokenizer {spec}"
        )
    return fp


def _load_large(spec: str, cfg: BackpackTrainConfig, vocab: Vocabulary, device: torch.device):
    from ensemble.large_model import load_large_model

    _check_teacher_tokenizer(spec, vocab.fingerprint, vocab.size)
    model = load_large_model(spec, dtype=cfg.large_dtype, device=str(device))
    vocab.check_covers(spec, model.get_output_embeddings().weight.shape[0])
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def build_distill_cache(
    teacher, train: torch.Tensor, cfg: BackpackTrainConfig, vocab: Vocabulary, key: str, progress: bool
) -> Path:
    """Teacher top-k for every train block, computed once into cache_dir/distill-<key>.safetensors."""
    from tqdm.auto import tqdm

    path = Path(cfg.cache_dir or default_cache_dir()) / f"distill-{key}.safetensors"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    n, k = len(train), cfg.distill_topk
    ids = torch.empty(n, cfg.block - 1, k, dtype=torch.int32)
    lps = torch.empty(n, cfg.block - 1, k, dtype=torch.float32)
    batch = max(1, cfg.batch_size // cfg.grad_accum)
    device_type = next(teacher.parameters()).device.type
    for i in tqdm(range(0, n, batch), desc="teacher top-k", disable=not progress, unit="batch"):
        with _autocast(device_type, cfg.amp):
            ids[i : i + batch], lps[i : i + batch] = teacher_topk(teacher, train[i : i + batch], vocab.size, k)
    _save_safetensors(path, {"ids": ids, "logprobs": lps})
    return path


def _autocast(device_type: str, amp: bool):
    if device_type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def heldout_nll(
    model: BackpackLM, blocks: torch.Tensor, vocab_size: int, batch: int, env: DistEnv, device: torch.device, amp: bool
) -> tuple[float, int]:
    """Micro-averaged held-out NLL (nats/token) over all blocks, sharded across ranks; (nll, tokens)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    mine = blocks[env.rank :: env.world_size]
    for i in range(0, len(mine), batch):
        x = mine[i : i + batch].to(device)
        with _autocast(device.type, amp):
            logits = model(x.long()).logits
        logp = torch.log_softmax(logits[:, :-1, :vocab_size].float(), dim=-1)
        total += -logp.gather(-1, x[:, 1:].long().unsqueeze(-1)).double().sum().item()
        count += x[:, 1:].numel()
    model.train(was_training)
    total_all, count_all = env.all_sum([total, float(count)])
    return total_all / count_all, int(count_all)


def _rng_state() -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Options a resumed run must share with its checkpoint (the rest, e.g. the budget, may change).
_RESUME_FIXED = (
    "tokenizer",
    "seed",
    "n_embd",
    "n_layer",
    "n_head",
    "num_senses",
    "n_positions",
    "sense_intermediate_scale",
    "pad_vocab_multiple",
    "block_len",
    "batch_size",
    "heldout_fraction",
    "distill_from",
    "distill_topk",
    "init_embeddings",
)


def _resolve_device(cfg: BackpackTrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def train_backpack(cfg: BackpackTrainConfig, progress: bool = True) -> Path:
    """Train (or resume) a Backpack per `cfg`; return the output folder (see the module docstring)."""
    device = _resolve_device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    env = DistEnv.from_env(device.type)
    try:
        cfg.validate(env.world_size)
        return _Trainer(cfg, env, device, progress).run()
    finally:
        env.close()


class _Trainer:
    def __init__(self, cfg: BackpackTrainConfig, env: DistEnv, device: torch.device, progress: bool):
        from ensemble.tokenizer import load_tokenizer

        self.cfg, self.env, self.device = cfg, env, device
        self.progress = progress and env.is_main
        self.out = Path(cfg.out)
        self.t_start = time.perf_counter()
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.vocab = Vocabulary.from_tokenizer(self.tokenizer)
        self.data = self._load_data()
        rows = -(-self.vocab.size // cfg.pad_vocab_multiple) * cfg.pad_vocab_multiple
        bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.vocab.eos_id
        self.model_config = cfg.model_config(rows, bos, self.vocab.eos_id)
        self.tokens_per_step = cfg.batch_size * cfg.block
        budgets = [s for s in (cfg.max_steps, cfg.max_tokens and -(-cfg.max_tokens // self.tokens_per_step)) if s]
        self.max_steps = min(budgets) if budgets else None
        self.decay_steps = cfg.decay_steps or self.max_steps
        self.teacher = None
        self.teacher_info: dict | None = None
        self.cache: dict[str, torch.Tensor] | None = None
        self.init_info: dict = {"how": "random"}

    # -- setup

    def _load_data(self) -> CorpusData:
        """Rank 0 tokenizes into out/data/<key>.pt; the other ranks wait and read it."""
        cfg = self.cfg
        files = [(str(p), os.path.getsize(p), os.path.getmtime(p)) for p in cfg.inputs if Path(p).is_file()]
        if len(files) < len(cfg.inputs):
            missing = [p for p in cfg.inputs if not Path(p).is_file()]
            raise DataError(missing[0], None, None, "corpus file not found")
        key = hashlib.sha256(
            json.dumps(
                [
                    files,
                    cfg.hf_dataset,
                    cfg.hf_config,
                    cfg.hf_split,
                    cfg.hf_limit,
                    cfg.text_field,
                    cfg.heldout_fraction,
                    cfg.seed,
                    cfg.block,
                    self.vocab.fingerprint,
                ]
            ).encode()
        ).hexdigest()[:16]
        path = self.out / "data" / f"blocks-{key}.pt"

        def prepare() -> None:
            if path.is_file():
                return
            data = prepare_corpus(cfg, self.tokenizer, self.vocab)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"train": data.train, "heldout": data.heldout, "meta": data.meta}, str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)

        self._on_rank0(prepare, "prepare the corpus")
        saved = torch.load(path, weights_only=False)
        return CorpusData(saved["train"], saved["heldout"], saved["meta"])

    def _on_rank0(self, fn, what: str) -> None:
        """Run `fn` on rank 0 only; every rank learns whether it worked, so none waits forever on a failure."""
        error = None
        if self.env.is_main:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - re-raised after the barrier so no rank hangs
                error = exc
        ok = self.env.broadcast([0.0 if error else 1.0])[0]
        if error is not None:
            raise error
        if not ok:
            raise RuntimeError(f"rank 0 failed to {what} (see its error)")

    def _setup_teacher(self, init: bool) -> None:
        cfg = self.cfg
        spec = cfg.distill_from
        init_spec = cfg.init_from or cfg.distill_from
        large = None
        if spec:
            large = self.teacher = _load_large(spec, cfg, self.vocab, self.device)
            from ensemble.large_model import model_fingerprint

            self.teacher_info = {
                "name": spec,
                "fingerprint": model_fingerprint(large),
                "topk": cfg.distill_topk,
                "weight": cfg.distill_weight,
                "cache": cfg.distill_cache,
            }
        if init and cfg.init_embeddings != "random":
            if init_spec is None:  # BackpackTrainConfig.validate refuses this; say so if it was skipped
                raise ValueError(
                    f"init_embeddings: {cfg.init_embeddings!r} needs a large model (init_from or distill_from)"
                )
            if init_spec != spec or large is None:
                large = _load_large(init_spec, cfg, self.vocab, torch.device("cpu"))
            self.init_info = init_embeddings_from(
                self.model, large.get_input_embeddings().weight, cfg.init_embeddings, self.vocab.size
            )
            self.init_info["from"] = init_spec
            if large is not self.teacher:
                del large
        if spec and cfg.distill_cache == "on":
            assert self.teacher_info is not None  # set above whenever spec is
            key = hashlib.sha256(
                json.dumps(
                    [self.teacher_info["fingerprint"], self.data.fingerprint, cfg.block, cfg.distill_topk]
                ).encode()
            ).hexdigest()[:20]
            path = Path(cfg.cache_dir or default_cache_dir()) / f"distill-{key}.safetensors"
            self._on_rank0(
                lambda: build_distill_cache(self.teacher, self.data.train, cfg, self.vocab, key, self.progress),
                "build the distillation cache",
            )
            from safetensors.torch import load_file

            self.cache = load_file(str(path))
            self.teacher_info["cache_file"] = str(path)
            self.teacher = None  # the cache replaces it

    def _latest_checkpoint(self) -> Path | None:
        pointer = self.out / "checkpoints" / "latest"
        if not pointer.is_file():
            return None
        return self.out / "checkpoints" / pointer.read_text().strip()

    # -- the loop

    def run(self) -> Path:
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.seed)
        self.model = BackpackLM(self.model_config).to(self.device)
        state = None
        if cfg.resume:
            ckpt = self._latest_checkpoint()
            if ckpt is None:
                raise TrainConfigError(f"resume: no checkpoint in {self.out / 'checkpoints'}")
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            for name in _RESUME_FIXED:
                if state["config"].get(name) != getattr(cfg, name):
                    raise TrainConfigError(
                        f"resume: {name} is {getattr(cfg, name)!r} but the checkpoint "
                        f"{ckpt} was trained with {state['config'].get(name)!r}"
                    )
            if state["data_fingerprint"] != self.data.fingerprint:
                raise TrainConfigError(f"resume: the corpus differs from the checkpoint's ({ckpt})")
        if state is None or cfg.distill_from:
            self._setup_teacher(init=state is None)  # on resume the init is in the weights
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.init_info = state.get("init", self.init_info)
        self.model.train()
        ddp_model: nn.Module = _LogitsOnly(self.model)
        if env.active:
            ddp_model = DistributedDataParallel(
                ddp_model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        opt = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            fused=self.device.type == "cuda" or None,
        )
        step, samples, prior_seconds = 0, 0, 0.0
        history: dict[str, list] = {"train": [], "eval": []}
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            step, samples, prior_seconds = state["step"], state["samples"], state["elapsed"]
            history = state["history"]
            _set_rng_state(state["rng"])
        order = BlockOrder(len(self.data.train), cfg.seed)
        eval_blocks = self.data.heldout[: cfg.eval_max_blocks] if cfg.eval_max_blocks else self.data.heldout
        eval_batch = max(1, cfg.batch_size // (cfg.grad_accum * env.world_size))
        micro = cfg.batch_size // cfg.grad_accum
        per_rank = micro // env.world_size
        log = _JsonLog(self.out / "log.jsonl") if env.is_main else None

        def evaluate(at_step: int) -> float:
            nll, n = heldout_nll(self.model, eval_blocks, self.vocab.size, eval_batch, env, self.device, cfg.amp)
            rec = {
                "step": at_step,
                "tokens": at_step * self.tokens_per_step,
                "nll": nll,
                "ppl": math.exp(nll),
                "scored_tokens": n,
            }
            history["eval"].append(rec)
            if log:
                log.write({"event": "eval", **rec})
            return nll

        if log:
            log.write(
                {
                    "event": "resume" if state else "start",
                    "step": step,
                    "world_size": env.world_size,
                    "device": str(self.device),
                    "config": asdict(cfg),
                    "data": self.data.meta,
                }
            )
        if state is None:
            evaluate(0)
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.max_steps,
            initial=step,
            desc="backpack",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        t_session = time.perf_counter()
        session_steps = 0
        last_nll = history["eval"][-1]["nll"] if history["eval"] else float("nan")
        while True:
            elapsed = prior_seconds + time.perf_counter() - t_session
            frac = elapsed / (60 * cfg.max_minutes) if cfg.max_minutes else 0.0
            stop = (self.max_steps is not None and step >= self.max_steps) or frac >= 1.0
            if cfg.max_minutes:  # rank 0's clock decides, so all ranks stop and schedule together
                stop_all, frac = self.env.broadcast([float(stop), frac])
                stop = bool(stop_all)
            if stop:
                break
            lr = lr_at(cfg, step, self.decay_steps, frac)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            ce_sum, kd_sum, loss_sum = 0.0, 0.0, 0.0
            for m in range(cfg.grad_accum):
                # Dropout masks depend only on (seed, step, micro-step, rank): exact resume with dropout too.
                torch.manual_seed(((cfg.seed * 1_000_003 + step) * 1009 + m) * 131 + env.rank)
                start = samples + m * micro + env.rank * per_rank
                idx = order.indices(start, per_rank)
                x = self.data.train[idx].to(self.device)
                t_ids = t_lp = None
                if self.cache is not None:
                    t_ids, t_lp = self.cache["ids"][idx].to(self.device), self.cache["logprobs"][idx].to(self.device)
                elif self.teacher is not None:
                    with _autocast(self.device.type, cfg.amp):
                        t_ids, t_lp = teacher_topk(self.teacher, x, self.vocab.size, cfg.distill_topk)
                # ddp_model is a DistributedDataParallel exactly when env.active; the last micro-step syncs
                last = m == cfg.grad_accum - 1
                sync = (
                    ddp_model.no_sync()
                    if isinstance(ddp_model, DistributedDataParallel) and not last
                    else contextlib.nullcontext()
                )
                with sync:
                    with _autocast(self.device.type, cfg.amp):
                        logits = ddp_model(x.long())
                    ce, kd = lm_losses(logits, x, self.vocab.size, t_ids, t_lp)
                    loss = ce if kd is None else (1 - cfg.distill_weight) * ce + cfg.distill_weight * kd
                    (loss / cfg.grad_accum).backward()
                ce_sum += ce.item() / cfg.grad_accum
                kd_sum += (kd.item() if kd is not None else 0.0) / cfg.grad_accum
                loss_sum += loss.item() / cfg.grad_accum
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip).item()
                if cfg.grad_clip > 0
                else float("nan")
            )
            opt.step()
            step += 1
            session_steps += 1
            samples += cfg.batch_size
            loss_g, ce_g, kd_g = (v / env.world_size for v in env.all_sum([loss_sum, ce_sum, kd_sum]))
            rec = {
                "step": step,
                "loss": loss_g,
                "ce": ce_g,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": step * self.tokens_per_step,
            }
            if cfg.distill_from:
                rec["kd"] = kd_g
            history["train"].append(rec)
            if log:
                log.write({"event": "train", **rec})
            if cfg.eval_every and step % cfg.eval_every == 0:
                last_nll = evaluate(step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_g:.3f}", heldout=f"{last_nll:.3f}", lr=f"{lr:.2e}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                self._checkpoint(opt, step, samples, prior_seconds + time.perf_counter() - t_session, history)
        bar.close()
        session_seconds = time.perf_counter() - t_session
        total_seconds = prior_seconds + session_seconds
        if not history["eval"] or history["eval"][-1]["step"] != step:
            evaluate(step)
        if cfg.keep_checkpoints:
            self._checkpoint(opt, step, samples, total_seconds, history)
        if env.is_main:
            self._write_outputs(step, samples, total_seconds, session_steps, session_seconds, history)
            if not cfg.keep_checkpoints:
                shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
            if log:
                log.write({"event": "end", "step": step, "seconds": total_seconds})
        env.barrier()
        return self.out

    # -- files (rank 0)

    def _checkpoint(self, opt, step: int, samples: int, elapsed: float, history: dict) -> None:
        if not self.env.is_main:
            return
        folder = self.out / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}.pt"
        state = {
            "model": self.model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "samples": samples,
            "elapsed": elapsed,
            "history": history,
            "rng": _rng_state(),
            "config": asdict(self.cfg),
            "data_fingerprint": self.data.fingerprint,
            "init": self.init_info,
            "world_size": self.env.world_size,
            "torch": torch.__version__,
        }
        torch.save(state, folder / (name + ".tmp"))
        os.replace(folder / (name + ".tmp"), folder / name)
        (folder / "latest.tmp").write_text(name)
        os.replace(folder / "latest.tmp", folder / "latest")
        for old in sorted(folder.glob("step-*.pt"))[: -max(1, self.cfg.keep_checkpoints)]:
            old.unlink()

    def _write_outputs(self, step, samples, total_seconds, session_steps, session_seconds, history) -> None:
        from ensemble.tokenizer import tokenizer_fingerprint

        cfg = self.cfg
        self.model.save_pretrained(self.out, safe=True)
        self.tokenizer.save_pretrained(str(self.out))
        eval_blocks = self.data.heldout[: cfg.eval_max_blocks] if cfg.eval_max_blocks else self.data.heldout
        _save_safetensors(self.out / "heldout_blocks.safetensors", {"blocks": eval_blocks})
        final = history["eval"][-1]
        tokens = step * self.tokens_per_step
        recipe = {
            "config": asdict(cfg),
            "model_config": asdict(self.model_config),
            "tokenizer": {
                "spec": cfg.tokenizer,
                "fingerprint": tokenizer_fingerprint(self.tokenizer),
                "size": self.vocab.size,
                "doc_sep_id": self.vocab.doc_sep_id,
                "eos_id": self.vocab.eos_id,
                "vocab_rows": self.model_config.vocab_size,
            },
            "corpus": self.data.meta,
            "teacher": self.teacher_info,
            "init": self.init_info,
            "steps": step,
            "samples": samples,
            "tokens_seen": tokens,
            "tokens_per_step": self.tokens_per_step,
            "heldout": {
                "nll": final["nll"],
                "ppl": final["ppl"],
                "scored_tokens": final["scored_tokens"],
                "blocks": len(eval_blocks),
                "initial_nll": history["eval"][0]["nll"],
                "file": "heldout_blocks.safetensors",
            },
            "seconds": total_seconds,
            "tokens_per_second": session_steps * self.tokens_per_step / session_seconds if session_seconds else None,
            "world_size": self.env.world_size,
            "device": str(self.device),
            "torch": torch.__version__,
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }
        (self.out / "training.json").write_text(json.dumps(recipe, indent=1, default=str))
        plot_losses(history, self.out / "loss.png")


class _JsonLog:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = path.open("a", encoding="utf-8")

    def write(self, rec: dict[str, Any]) -> None:
        self.fh.write(json.dumps({"time": time.time(), **rec}, default=str) + "\n")
        self.fh.flush()


def plot_losses(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tr = history["train"]
    if tr:
        steps = [r["step"] for r in tr]
        ax.plot(steps, [r["loss"] for r in tr], lw=0.6, alpha=0.4, color="C0", label="train loss")
        ema, out = 0.0, []
        for i, r in enumerate(tr, start=1):
            ema = 0.95 * ema + 0.05 * r["loss"]
            out.append(ema / (1 - 0.95**i))  # bias-corrected, so the curve does not start at 0
        ax.plot(steps, out, color="C0", label="train loss (EMA 0.95)")
    ev = history["eval"]
    ax.plot([r["step"] for r in ev], [r["nll"] for r in ev], marker="o", color="C1", label="held-out NLL")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats / token")
    ax.set_title("Backpack training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
