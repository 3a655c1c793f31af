"""Distil an attached sense head (ensemble.sense_head) from its large model.

    train_edits sense-head train --large smollm2-135m-instruct --out runs/sense-head --max-steps 300

Data. The documents are split into G and R exactly as `prepare-corpora` splits them (by document,
seeded shuffle, `g_fraction`), so the head trains on R's documents only and the G the edits are
measured on stays held out; each side is cut into blocks of `block_len` tokens with the document
separator between documents (`train_edits.corpora.split_corpora`). Held-out: the first
`heldout_blocks` blocks of G.

Teacher pass (the slow part on CPU). For every block the frozen large model gives its final hidden
states h (the LM head's input; α's input) and the top-k of its next-token log-probs over U. They are
written once, in shards of `shard_blocks` blocks, under `cache_dir/<key>/` (key: the large model's
fingerprint, the data's, the block length and k), each shard atomically: an interrupted pass resumes
at the first missing shard, and a second run with the same key computes nothing.

Loss, per scored position (token x_{t+1} from x_{≤t}; block position 0 is never a target):

    p_θ   = softmax_U( E_out · Σ_ℓ Σ_{j≤t} α[ℓ,t,j] C(x_j)_ℓ )
    loss  = (1 − w)·CE(p_θ, x_{t+1}) + w·KD(q_top-k, p_θ)      (train_edits.backpack_trainer.distill.lm_losses)

Optimisation: AdamW on the head's weights only (the large model is frozen and not stored), linear
warmup then cosine to `min_lr_ratio·lr` over `max_steps`. Checkpoints (`out/checkpoints/step-N.pt`:
weights, optimizer, step, RNG) every `checkpoint_every` steps; a run resumes from the latest one.
The output folder loads with `SenseHeadLM.from_pretrained` (weights stored in `save_dtype`) and holds
the tokenizer and `training.json` (data, teacher, history, timings).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ensemble.sense_head import SenseHeadConfig, SenseHeadLM

from .backpack_trainer.config import TrainConfigError
from .backpack_trainer.data import tensor_sha256
from .backpack_trainer.distill import lm_losses

DEFAULT_CORPUS = str(Path(__file__).resolve().parent / "data" / "owt-val100.jsonl.gz")
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SenseHeadTrainConfig:
    out: str = "runs/sense-head"
    large: str = "smollm2-135m-instruct"  # the context model and teacher (frozen)
    tokenizer: str | None = None  # None: the large model's own (its folder or registry name)
    inputs: list[str] = field(default_factory=lambda: [DEFAULT_CORPUS])
    g_fraction: float = 0.5  # as prepare-corpora: the head trains on the R documents
    split_seed: int = 0  # as prepare-corpora's --seed
    block_len: int = 256
    max_train_blocks: int | None = None  # the first N R blocks (None: all)
    heldout_blocks: int = 16  # the first N G blocks, for the held-out NLL
    # the head
    num_senses: int = 16
    sense_intermediate_scale: int = 1
    max_distance: int = 256
    n_positions: int = 1024
    # the teacher
    topk: int = 32
    distill_weight: float = 0.9  # w: KD share of the loss, CE gets 1 − w
    shard_blocks: int = 32
    cache_dir: str | None = None  # None: $SENSEPACK_CACHE/teacher
    # optimisation
    batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_steps: int = 300
    eval_every: int = 50
    checkpoint_every: int = 50
    seed: int = 0
    save_dtype: str = "float32"
    keep_checkpoints: bool = True  # False: out/checkpoints/ is removed once the model is written
    threads: int | None = None
    device: str = "cpu"  # the large model, the teacher pass and the head's training (e.g. cuda on a GPU host)
    large_dtype: str = "float32"  # the large model's dtype (bfloat16 on a GPU host for a 6B model)

    def validate(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise TrainConfigError(f"{name}: {msg}")

        for name in ("block_len", "heldout_blocks", "num_senses", "topk", "shard_blocks", "batch_size", "max_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                bad(name, f"must be a positive integer, got {v!r}")
        for name in ("eval_every", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                bad(name, f"must be a non-negative integer, got {v!r}")
        if not 0.0 < self.g_fraction < 1.0:
            bad("g_fraction", f"must be in (0, 1), got {self.g_fraction}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            bad("lr", f"must be a positive finite number, got {self.lr}")
        if not 0.0 <= self.distill_weight <= 1.0:
            bad("distill_weight", f"must be in [0, 1], got {self.distill_weight}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            bad("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.save_dtype not in SAVE_DTYPES:
            bad("save_dtype", f"must be one of {sorted(SAVE_DTYPES)}, got {self.save_dtype!r}")
        if self.block_len > self.n_positions:
            bad("block_len", f"{self.block_len} exceeds n_positions {self.n_positions}")
        if not self.inputs:
            bad("inputs", "no corpus file given")


@dataclass
class HeadData:
    train: torch.Tensor  # (n, L) int32, R side
    heldout: torch.Tensor  # (m, L) int32, G side
    meta: dict[str, Any]


def prepare_data(cfg: SenseHeadTrainConfig, tokenizer) -> HeadData:  # type: ignore[no-untyped-def]
    from .corpora import read_documents, split_corpora

    docs = read_documents(cfg.inputs)
    sp = split_corpora(tokenizer, docs, cfg.block_len, cfg.g_fraction, cfg.split_seed)
    train = torch.tensor(sp.r, dtype=torch.int32).view(-1, cfg.block_len)
    if cfg.max_train_blocks is not None:
        train = train[: cfg.max_train_blocks]
    heldout = torch.tensor(sp.g[: cfg.heldout_blocks], dtype=torch.int32).view(-1, cfg.block_len)
    if len(train) == 0 or len(heldout) == 0:
        raise TrainConfigError(
            f"inputs: {len(train)} train / {len(heldout)} held-out blocks of {cfg.block_len} tokens; need both"
        )
    meta = {
        "inputs": [str(p) for p in cfg.inputs],
        "documents": len(docs),
        "r_documents": sp.r_docs,
        "g_documents": sp.g_docs,
        "train_blocks": len(train),
        "train_tokens": int(train.numel()),
        "heldout_blocks": len(heldout),
        "fingerprint": tensor_sha256(train, heldout),
    }
    return HeadData(train, heldout, meta)


# ---------------------------------------------------------------------------------------- teacher pass


class TeacherCache:
    """The teacher's hidden states and top-k for a block tensor, in atomically written shards."""

    def __init__(self, root: Path, large, blocks: torch.Tensor, vocab_size: int, topk: int, shard_blocks: int):  # type: ignore[no-untyped-def]
        self.root, self.large, self.blocks = root, large, blocks
        self.vocab_size, self.topk, self.shard_blocks = vocab_size, topk, shard_blocks
        self.n_shards = -(-len(blocks) // shard_blocks)

    def shard_path(self, i: int) -> Path:
        return self.root / f"shard-{i:05d}.safetensors"

    def missing(self) -> list[int]:
        return [i for i in range(self.n_shards) if not self.shard_path(i).is_file()]

    @torch.no_grad()
    def build(self, progress: bool = True, desc: str = "teacher pass") -> None:
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        todo = self.missing()
        if not todo:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        device = next(self.large.parameters()).device
        lm_head = self.large.get_output_embeddings()
        bar = tqdm(
            total=len(todo) * self.shard_blocks * self.blocks.shape[1], desc=desc, unit="tok", disable=not progress
        )
        for i in todo:
            rows = self.blocks[i * self.shard_blocks : (i + 1) * self.shard_blocks]
            hs, ids, lps = [], [], []
            for j in range(0, len(rows), 4):
                x = rows[j : j + 4].long().to(device)
                h = self.large.base_model(input_ids=x).last_hidden_state
                logp = torch.log_softmax(lm_head(h)[:, :-1, : self.vocab_size].float(), dim=-1)
                h = h.float()
                lp, top = logp.topk(self.topk, dim=-1)
                if not torch.isfinite(h).all() or h.abs().max() > 6e4:
                    raise ValueError(f"teacher pass: hidden states of shard {i} do not fit float16")
                hs.append(h.half().cpu())
                ids.append(top.to(torch.int32).cpu())
                lps.append(lp.half().cpu())
                bar.update(x.numel())
            tmp = self.shard_path(i).with_suffix(".tmp")
            save_file({"hidden": torch.cat(hs), "ids": torch.cat(ids), "logprobs": torch.cat(lps)}, str(tmp))
            os.replace(tmp, self.shard_path(i))
        bar.close()

    def load(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        parts = [load_file(str(self.shard_path(i))) for i in range(self.n_shards)]
        return {k: torch.cat([p[k] for p in parts]) for k in ("hidden", "ids", "logprobs")}


def cache_root(cfg: SenseHeadTrainConfig, large_fingerprint: str, data_fingerprint: str, what: str) -> Path:
    key = hashlib.sha256(json.dumps([large_fingerprint, data_fingerprint, cfg.block_len, cfg.topk, what]).encode())
    base = Path(cfg.cache_dir) if cfg.cache_dir else _default_cache()
    return base / f"{what}-{key.hexdigest()[:20]}"


def _default_cache() -> Path:
    root = os.environ.get("SENSEPACK_CACHE") or Path.home() / ".cache" / "sensepack"
    return Path(root) / "teacher"


# ---------------------------------------------------------------------------------------- training


def lr_at(cfg: SenseHeadTrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    low = cfg.lr * cfg.min_lr_ratio
    return low + (cfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * frac))


def batch_loss(
    head: SenseHeadLM, blocks: torch.Tensor, teacher: dict[str, torch.Tensor], vocab_size: int, w: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, CE, KD) of the head on blocks (b, L) with the teacher's cached hidden states and top-k."""
    dev = head.sense_weight_net.c_attn.weight.device
    hidden = teacher["hidden"].to(dev).float()
    ids = blocks.to(dev).long()
    out = head(ids, hidden=hidden)
    ce, kd = lm_losses(out.logits, ids, vocab_size, teacher["ids"].to(dev), teacher["logprobs"].to(dev))
    assert kd is not None
    return (1.0 - w) * ce + w * kd, ce, kd


@torch.no_grad()
def heldout_nll(head: SenseHeadLM, blocks: torch.Tensor, hidden: torch.Tensor, vocab_size: int) -> tuple[float, float]:
    """(head NLL, large-model NLL) in nats/token over the held-out blocks (position 0 never scored)."""
    was = head.training
    head.eval()
    tot_h = tot_l = 0.0
    n = 0
    E = head.embedding.detach().float()
    dev = E.device
    for i in range(0, len(blocks), 4):
        x = blocks[i : i + 4].to(dev).long()
        h = hidden[i : i + 4].to(dev).float()
        tgt = x[:, 1:].unsqueeze(-1)
        logp = torch.log_softmax(head(x, hidden=h).logits[:, :-1, :vocab_size].float(), -1)
        tot_h -= logp.gather(-1, tgt).double().sum().item()
        logp_l = torch.log_softmax((h @ E.T)[:, :-1, :vocab_size].float(), -1)
        tot_l -= logp_l.gather(-1, tgt).double().sum().item()
        n += tgt.numel()
    head.train(was)
    return tot_h / n, tot_l / n


def train_sense_head(cfg: SenseHeadTrainConfig, progress: bool = True) -> Path:
    from tqdm.auto import tqdm

    from ensemble.large_model import load_large_model, model_fingerprint
    from ensemble.tokenizer import load_tokenizer
    from ensemble.vocab import Vocabulary

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    tok = load_tokenizer(cfg.tokenizer or cfg.large)
    vocab = Vocabulary.from_tokenizer(tok)
    large = load_large_model(cfg.large, dtype=cfg.large_dtype, device=cfg.device)
    for p in large.parameters():
        p.requires_grad_(False)
    large_fp = model_fingerprint(large)
    data = prepare_data(cfg, tok)
    t0 = time.time()
    train_cache = TeacherCache(
        cache_root(cfg, large_fp, data.meta["fingerprint"], "train"),
        large,
        data.train,
        vocab.size,
        cfg.topk,
        cfg.shard_blocks,
    )
    held_cache = TeacherCache(
        cache_root(cfg, large_fp, data.meta["fingerprint"], "heldout"),
        large,
        data.heldout,
        vocab.size,
        cfg.topk,
        cfg.shard_blocks,
    )
    held_cache.build(progress, "teacher pass (held-out)")
    train_cache.build(progress, "teacher pass (train)")
    teacher_seconds = time.time() - t0
    teacher = train_cache.load()
    held = held_cache.load()

    emb = large.get_output_embeddings().weight
    head_cfg = SenseHeadConfig(
        vocab_size=int(emb.shape[0]),
        n_embd=int(emb.shape[1]),
        context_model=cfg.large,
        context_fingerprint=large_fp,
        num_senses=cfg.num_senses,
        sense_intermediate_scale=cfg.sense_intermediate_scale,
        max_distance=cfg.max_distance,
        n_positions=cfg.n_positions,
    )
    torch.manual_seed(cfg.seed)
    head = SenseHeadLM(head_cfg).to(cfg.device).attach(large, check=False)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    history: dict[str, list] = {"step": [], "loss": [], "ce": [], "kd": [], "eval_step": [], "heldout_nll": []}
    step, session_t0 = 0, time.time()
    ckpt_dir = out / "checkpoints"
    latest = ckpt_dir / "latest"
    if latest.is_file():
        state = torch.load(ckpt_dir / latest.read_text().strip(), map_location=cfg.device, weights_only=False)
        head.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        torch.set_rng_state(state["rng"].cpu())
        random.setstate(state["py_rng"])
    else:
        random.seed(cfg.seed)

    n = len(data.train)
    large_nll = None

    def evaluate() -> float:
        nonlocal large_nll
        nll, large_nll = heldout_nll(head, data.heldout, held["hidden"], vocab.size)
        history["eval_step"].append(step)
        history["heldout_nll"].append(nll)
        return nll

    head.train()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="sense head", unit="step", disable=not progress)
    while step < cfg.max_steps:
        epoch, pos = divmod(step * cfg.batch_size, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 7919 * (epoch + 1)))
        idx = perm[pos : pos + cfg.batch_size]
        batch = {k: v[idx] for k, v in teacher.items()}
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        loss, ce, kd = batch_loss(head, data.train[idx], batch, vocab.size, cfg.distill_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        history["step"].append(step)
        history["loss"].append(loss.item())
        history["ce"].append(ce.item())
        history["kd"].append(kd.item())
        bar.update(1)
        bar.set_postfix(ce=f"{history['ce'][-1]:.3f}", kd=f"{history['kd'][-1]:.3f}")
        if cfg.eval_every and step % cfg.eval_every == 0:
            bar.write(json.dumps({"step": step, "heldout_nll": round(evaluate(), 4)}))
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.max_steps):
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            name = f"step-{step}.pt"
            state = {
                "model": head.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "history": history,
                "rng": torch.get_rng_state(),
                "py_rng": random.getstate(),
            }
            torch.save(state, ckpt_dir / (name + ".tmp"))
            os.replace(ckpt_dir / (name + ".tmp"), ckpt_dir / name)
            latest.write_text(name)
            for old in ckpt_dir.glob("step-*.pt"):
                if old.name != name:
                    old.unlink()
    bar.close()
    final_nll = (
        evaluate() if not history["eval_step"] or history["eval_step"][-1] != step else history["heldout_nll"][-1]
    )
    if large_nll is None:
        _, large_nll = heldout_nll(head, data.heldout[:1], held["hidden"][:1], vocab.size)
    head.eval()
    if not cfg.keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    head.save_pretrained(out, dtype=SAVE_DTYPES[cfg.save_dtype])
    tok.save_pretrained(out)
    n_params = sum(p.numel() for p in head.parameters())
    (out / "training.json").write_text(
        json.dumps(
            {
                "config": asdict(cfg),
                "data": data.meta,
                "teacher": {"name": cfg.large, "fingerprint": large_fp, "topk": cfg.topk, "seconds": teacher_seconds},
                "parameters": n_params,
                "steps": step,
                "heldout_nll": final_nll,
                "large_heldout_nll": large_nll,
                "session_seconds": round(time.time() - session_t0, 1),
                "total_seconds": round(time.time() - t_start, 1),
                "history": history,
            },
            indent=1,
        )
    )
    return out
