"""The training loop: init, resume, step, evaluate, checkpoint, outputs (see the package docstring)."""

from __future__ import annotations

import contextlib
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
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ensemble.backpack import BackpackLM
from ensemble.vocab import Vocabulary

from ..tasks import DataError
from .config import BackpackTrainConfig, TrainConfigError
from .data import BlockOrder, CorpusData, prepare_corpus, save_safetensors
from .distill import build_distill_cache, default_cache_dir, init_embeddings_from, lm_losses, load_large, teacher_topk
from .distributed import DistEnv, LogitsOnly, autocast, resolve_device

# ------------------------------------------------------------------------------------------ training


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
        with autocast(device.type, amp):
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


def train_backpack(cfg: BackpackTrainConfig, progress: bool = True) -> Path:
    """Train (or resume) a Backpack per `cfg`; return the output folder (see the module docstring)."""
    device = resolve_device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    env = DistEnv.from_env(device.type)
    try:
        cfg.validate(env.world_size)
        return _Trainer(cfg, env, device, progress).run()
    finally:
        env.close()


@dataclass
class _Loop:
    """What the loop carries from step to step; a checkpoint holds all of it but the clocks."""

    opt: torch.optim.Optimizer
    forward: nn.Module  # the Backpack's logits, wrapped in DistributedDataParallel under torchrun
    order: BlockOrder
    history: dict[str, list] = field(default_factory=lambda: {"train": [], "eval": []})
    step: int = 0
    samples: int = 0  # the global data position
    prior_seconds: float = 0.0  # training time of earlier sessions
    t_session: float = field(default_factory=time.perf_counter)
    session_steps: int = 0
    last_loss: float = float("nan")
    last_nll: float = float("nan")
    lr: float = float("nan")

    def elapsed(self) -> float:
        return self.prior_seconds + time.perf_counter() - self.t_session


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
        self.eval_blocks = self.data.heldout[: cfg.eval_max_blocks] if cfg.eval_max_blocks else self.data.heldout
        self.eval_batch = max(1, cfg.batch_size // (cfg.grad_accum * env.world_size))
        self.log = _JsonLog(self.out / "log.jsonl") if env.is_main else None

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
            large = self.teacher = load_large(spec, cfg, self.vocab, self.device)
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
                large = load_large(init_spec, cfg, self.vocab, torch.device("cpu"))
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

    # -- the loop: init, resume, step, evaluate, checkpoint

    def run(self) -> Path:
        state = self._resume_state()
        self._init_model(state)
        loop = self._init_loop(state)
        self._log(
            "resume" if state else "start",
            step=loop.step,
            world_size=self.env.world_size,
            device=str(self.device),
            config=asdict(self.cfg),
            data=self.data.meta,
        )
        if state is None:
            self._evaluate(loop)
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.max_steps,
            initial=loop.step,
            desc="backpack",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        loop.t_session = time.perf_counter()
        while True:
            stop, frac = self._stop_and_time_fraction(loop)
            if stop:
                break
            self._step(loop, lr_at(self.cfg, loop.step, self.decay_steps, frac))
            bar.update(1)
            bar.set_postfix(loss=f"{loop.last_loss:.3f}", heldout=f"{loop.last_nll:.3f}", lr=f"{loop.lr:.2e}")
        bar.close()
        self._finish(loop)
        return self.out

    def _resume_state(self) -> dict | None:
        """The latest checkpoint's state with `resume`, after checking it was trained with this run's options."""
        cfg = self.cfg
        if not cfg.resume:
            return None
        ckpt = self._latest_checkpoint()
        if ckpt is None:
            raise TrainConfigError(f"resume: no checkpoint in {self.out / 'checkpoints'}")
        state: dict = torch.load(ckpt, map_location="cpu", weights_only=False)
        for name in _RESUME_FIXED:
            if state["config"].get(name) != getattr(cfg, name):
                raise TrainConfigError(
                    f"resume: {name} is {getattr(cfg, name)!r} but the checkpoint "
                    f"{ckpt} was trained with {state['config'].get(name)!r}"
                )
        if state["data_fingerprint"] != self.data.fingerprint:
            raise TrainConfigError(f"resume: the corpus differs from the checkpoint's ({ckpt})")
        return state

    def _init_model(self, state: dict | None) -> None:
        torch.manual_seed(self.cfg.seed)
        self.model = BackpackLM(self.model_config).to(self.device)
        if state is None or self.cfg.distill_from:
            self._setup_teacher(init=state is None)  # on resume the init is in the weights
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.init_info = state.get("init", self.init_info)
        self.model.train()

    def _init_loop(self, state: dict | None) -> _Loop:
        cfg = self.cfg
        forward: nn.Module = LogitsOnly(self.model)
        if self.env.active:
            forward = DistributedDataParallel(
                forward, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        opt = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            fused=self.device.type == "cuda" or None,
        )
        loop = _Loop(opt, forward, BlockOrder(len(self.data.train), cfg.seed))
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            loop.step, loop.samples, loop.prior_seconds = state["step"], state["samples"], state["elapsed"]
            loop.history = state["history"]
            _set_rng_state(state["rng"])
            if loop.history["eval"]:
                loop.last_nll = loop.history["eval"][-1]["nll"]
        return loop

    def _stop_and_time_fraction(self, loop: _Loop) -> tuple[bool, float]:
        """Whether the budget (steps or minutes) is spent, and the fraction of `max_minutes` gone."""
        cfg = self.cfg
        frac = loop.elapsed() / (60 * cfg.max_minutes) if cfg.max_minutes else 0.0
        stop = (self.max_steps is not None and loop.step >= self.max_steps) or frac >= 1.0
        if cfg.max_minutes:  # rank 0's clock decides, so all ranks stop and schedule together
            stop_all, frac = self.env.broadcast([float(stop), frac])
            stop = bool(stop_all)
        return stop, frac

    def _step(self, loop: _Loop, lr: float) -> None:
        """One optimizer step over `batch_size` blocks in `grad_accum` micro-steps; record, evaluate, checkpoint."""
        cfg, env = self.cfg, self.env
        for g in loop.opt.param_groups:
            g["lr"] = lr
        loop.opt.zero_grad(set_to_none=True)
        loss_sum, ce_sum, kd_sum = 0.0, 0.0, 0.0
        for m in range(cfg.grad_accum):
            loss, ce, kd = self._micro_step(loop, m)
            ce_sum += ce / cfg.grad_accum
            kd_sum += kd / cfg.grad_accum
            loss_sum += loss / cfg.grad_accum
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip).item()
            if cfg.grad_clip > 0
            else float("nan")
        )
        loop.opt.step()
        loop.step += 1
        loop.session_steps += 1
        loop.samples += cfg.batch_size
        loss_g, ce_g, kd_g = (v / env.world_size for v in env.all_sum([loss_sum, ce_sum, kd_sum]))
        rec = {
            "step": loop.step,
            "loss": loss_g,
            "ce": ce_g,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": loop.step * self.tokens_per_step,
        }
        if cfg.distill_from:
            rec["kd"] = kd_g
        loop.history["train"].append(rec)
        loop.last_loss, loop.lr = loss_g, lr
        self._log("train", **rec)
        if cfg.eval_every and loop.step % cfg.eval_every == 0:
            self._evaluate(loop)
        if cfg.checkpoint_every and loop.step % cfg.checkpoint_every == 0:
            self._checkpoint(loop, loop.elapsed())

    def _micro_step(self, loop: _Loop, m: int) -> tuple[float, float, float]:
        """Forward and backward over this rank's slice of micro-batch m; its (loss, CE, KD) means."""
        cfg, env = self.cfg, self.env
        per_rank = cfg.batch_size // cfg.grad_accum // env.world_size
        # Dropout masks depend only on (seed, step, micro-step, rank): exact resume with dropout too.
        torch.manual_seed(((cfg.seed * 1_000_003 + loop.step) * 1009 + m) * 131 + env.rank)
        start = loop.samples + m * (cfg.batch_size // cfg.grad_accum) + env.rank * per_rank
        idx = loop.order.indices(start, per_rank)
        x = self.data.train[idx].to(self.device)
        t_ids = t_lp = None
        if self.cache is not None:
            t_ids, t_lp = self.cache["ids"][idx].to(self.device), self.cache["logprobs"][idx].to(self.device)
        elif self.teacher is not None:
            with autocast(self.device.type, cfg.amp):
                t_ids, t_lp = teacher_topk(self.teacher, x, self.vocab.size, cfg.distill_topk)
        # loop.forward is a DistributedDataParallel exactly when env.active; the last micro-step syncs
        last = m == cfg.grad_accum - 1
        sync = (
            loop.forward.no_sync()
            if isinstance(loop.forward, DistributedDataParallel) and not last
            else contextlib.nullcontext()
        )
        with sync:
            with autocast(self.device.type, cfg.amp):
                logits = loop.forward(x.long())
            ce, kd = lm_losses(logits, x, self.vocab.size, t_ids, t_lp)
            loss = ce if kd is None else (1 - cfg.distill_weight) * ce + cfg.distill_weight * kd
            (loss / cfg.grad_accum).backward()
        return loss.item(), ce.item(), kd.item() if kd is not None else 0.0

    def _evaluate(self, loop: _Loop) -> None:
        nll, n = heldout_nll(
            self.model, self.eval_blocks, self.vocab.size, self.eval_batch, self.env, self.device, self.cfg.amp
        )
        rec = {
            "step": loop.step,
            "tokens": loop.step * self.tokens_per_step,
            "nll": nll,
            "ppl": math.exp(nll),
            "scored_tokens": n,
        }
        loop.history["eval"].append(rec)
        loop.last_nll = nll
        self._log("eval", **rec)

    def _finish(self, loop: _Loop) -> None:
        """The last evaluation and checkpoint; the outputs (rank 0); every rank leaves together."""
        session_seconds = time.perf_counter() - loop.t_session
        total_seconds = loop.prior_seconds + session_seconds
        if not loop.history["eval"] or loop.history["eval"][-1]["step"] != loop.step:
            self._evaluate(loop)
        if self.cfg.keep_checkpoints:
            self._checkpoint(loop, total_seconds)
        if self.env.is_main:
            self._write_outputs(loop, total_seconds, session_seconds)
            if not self.cfg.keep_checkpoints:
                shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
            self._log("end", step=loop.step, seconds=total_seconds)
        self.env.barrier()

    def _log(self, event: str, **fields: Any) -> None:
        if self.log is not None:
            self.log.write({"event": event, **fields})

    # -- files (rank 0)

    def _checkpoint(self, loop: _Loop, elapsed: float) -> None:
        if not self.env.is_main:
            return
        folder = self.out / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"step-{loop.step:08d}.pt"
        state = {
            "model": self.model.state_dict(),
            "optimizer": loop.opt.state_dict(),
            "step": loop.step,
            "samples": loop.samples,
            "elapsed": elapsed,
            "history": loop.history,
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

    def _write_outputs(self, loop: _Loop, total_seconds: float, session_seconds: float) -> None:
        from ensemble.tokenizer import tokenizer_fingerprint

        cfg = self.cfg
        self.model.save_pretrained(self.out, safe=True)
        self.tokenizer.save_pretrained(str(self.out))
        save_safetensors(self.out / "heldout_blocks.safetensors", {"blocks": self.eval_blocks})
        history = loop.history
        final = history["eval"][-1]
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
            "steps": loop.step,
            "samples": loop.samples,
            "tokens_seen": loop.step * self.tokens_per_step,
            "tokens_per_step": self.tokens_per_step,
            "heldout": {
                "nll": final["nll"],
                "ppl": final["ppl"],
                "scored_tokens": final["scored_tokens"],
                "blocks": len(self.eval_blocks),
                "initial_nll": history["eval"][0]["nll"],
                "file": "heldout_blocks.safetensors",
            },
            "seconds": total_seconds,
            "tokens_per_second": loop.session_steps * self.tokens_per_step / session_seconds
            if session_seconds
            else None,
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
