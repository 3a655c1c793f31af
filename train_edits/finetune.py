"""Sense finetuning with ball tracking (paper §6–7, appendix C).

Only the selected (token, sense) deltas train: an ``nn.Parameter`` of shape
(n, d), zero-initialised. Each step: the example's training loss plus
``kl_weight`` × KL(p_orig ‖ p_new) summed over the positions of one random R
chunk. AdamW (or bitsandbytes 8-bit Adam), cosine LR decay stepped once per
epoch. After each epoch the Backpack's G ratio is measured; for each ε the
deltas of the **last** epoch with ratio strictly below 1+ε are kept (epoch 0,
no edit, ratio exactly 1, is always valid).

Gradient accumulation: gradients of ``grad_accum`` consecutive examples are
summed (each loss divided by ``grad_accum``, so the step sees their mean)
before one optimizer step; a short remainder at the end of an epoch is
stepped too. **Upstream bug** (``trainer.py`` of the paper's release): it
calls ``optimizer.zero_grad()`` before *every* example but steps only every
``grad_acc_steps`` examples, so only every fifth example (with the default 5)
ever reaches the optimizer and the epoch's last ``len % 5`` examples are lost.
``upstream_grad_bug=True`` reproduces that for comparison.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .compute import CachedSeq, EditIndex, GLoss, KLRegularizer, cache_sequences
from .corpora import corpus_fingerprint
from .encoding import EncodedExample
from .losses import training_loss
from .tasks import LossType, example_score, is_failure

log = logging.getLogger("train_edits.finetune")


def in_ball(ratio: float, eps: float) -> bool:
    """The ball test used everywhere in train_edits: strictly below 1+ε."""
    return ratio < 1.0 + eps


@dataclass
class FinetuneParams:
    lr: float = 1e-3
    kl_weight: float = 0.3
    epochs: int = 10
    grad_accum: int = 5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.995)
    optimizer: str = "adamw"  # or "adam8bit"
    upstream_grad_bug: bool = False
    seed: int = 0
    epsilons: tuple[float, ...] = (1e-3, 1e-4, 1e-5)
    eval_every_epoch: bool = True
    epoch_cap: dict[float, int] | None = None  # sweeps: per ε, the last epoch allowed
    # Only the answer changes: KL(p_orig ‖ p_new) over every position of each canonical example except those
    # predicting its scored span, in `rest` sequences (the example, then unrelated text), weighted by this.
    rest_kl_weight: float = 0.0
    # Per-ε learning rates ({ε: lr}; ε not listed use `lr`): the ε sharing an lr share one training trajectory,
    # each distinct lr trains its own from zero (same seed), and each ε keeps the last in-ball epoch of its own.
    lr_by_epsilon: dict[float, float] | None = None

    def groups(self) -> list[FinetuneParams]:
        """One parameter set per distinct lr, the one holding the largest ε first."""
        by_lr: dict[float, list[float]] = {}
        for eps in sorted(self.epsilons, reverse=True):
            by_lr.setdefault((self.lr_by_epsilon or {}).get(eps, self.lr), []).append(eps)
        return [replace(self, lr=lr, epsilons=tuple(eps), lr_by_epsilon=None) for lr, eps in by_lr.items()]


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float | None
    g_loss: float
    g_ratio: float
    lr: float | None
    success: float | None = None


@dataclass
class FinetuneResult:
    pairs: list[tuple[int, int]]
    history: list[EpochRecord]
    chosen_epoch: dict[float, int]
    deltas: dict[float, torch.Tensor]  # per ε: (n, d) of the chosen epoch
    optimizer_steps: int = 0
    examples_counted: int = 0
    # per ε, the history of the trajectory its deltas come from (`history` is the largest ε's)
    history_of: dict[float, list[EpochRecord]] = field(default_factory=dict)


class _EvalCache:
    """Eval examples with α cached at scored rows: success rate for any deltas, cheaply."""

    def __init__(
        self, model, examples: Sequence[EncodedExample], index: EditIndex, loss_type: LossType, threshold: float
    ):
        self.loss_type = LossType(loss_type)
        self.threshold = threshold
        flat = [s for ex in examples for s in ex.seqs]
        cached = cache_sequences(model, flat, index)
        self.groups: list[list[CachedSeq]] = []
        i = 0
        for ex in examples:
            self.groups.append(cached[i : i + len(ex.seqs)])
            i += len(ex.seqs)

    @torch.no_grad()
    def success(self, embedding: torch.Tensor, deltas: torch.Tensor) -> float:
        flat = [c for g in self.groups for c in g]
        if not flat:
            return 0.0
        hidden = torch.cat([c.edited_hidden(deltas) for c in flat])
        targets = torch.cat([c.targets for c in flat])
        nll = F.cross_entropy(F.linear(hidden, embedding).float(), targets, reduction="none")
        sums = torch.split(nll, [len(c.targets) for c in flat])
        ok, i = 0, 0
        for g in self.groups:
            nlls = [float(sums[i + j].double().sum()) for j in range(len(g))]
            i += len(g)
            ok += not is_failure(example_score(self.loss_type, *nlls), self.threshold)
        return ok / len(self.groups)


@dataclass
class _Checkpoint:
    """One trajectory's state after an epoch, in `path`; `identity` digests everything the trajectory depends on
    (its parameters and `_inputs_digest`), so a checkpoint of other inputs is never continued."""

    path: Path
    identity: str

    @classmethod
    def of(cls, folder: Path | None, params: FinetuneParams, inputs: str) -> _Checkpoint | None:
        """The checkpoint of the trajectory at params.lr over `inputs` (`_inputs_digest`), kept in `folder`."""
        if folder is None:
            return None
        h = hashlib.sha256(inputs.encode())
        h.update(json.dumps(asdict(params), sort_keys=True, default=str).encode())
        return cls(Path(folder) / f"trajectory-lr{params.lr:g}.pt", h.hexdigest())

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, weights_only=True)
        if state.get("identity") != self.identity:
            log.info("checkpoint_ignored", extra={"fields": {"path": str(self.path), "why": "other inputs"}})
            return None
        log.info("resumed", extra={"fields": {"path": str(self.path), "epoch": state["epoch"]}})
        return state

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({**state, "identity": self.identity}, tmp)
        os.replace(tmp, self.path)  # a stop mid-write leaves the previous epoch's checkpoint


def _inputs_digest(model, index: EditIndex, train, g_chunks, r_chunks) -> str:
    """What every trajectory of one finetune call depends on besides its parameters: the sense model (its own
    fingerprint, the one packs carry), the selected pairs, the examples, G and R."""
    h = hashlib.sha256(model.fingerprint().encode())
    h.update(json.dumps(list(index.pairs)).encode())
    for ex in train:
        for s in ex.seqs:
            h.update(json.dumps([list(map(int, s.ids)), s.start, s.n]).encode())
    h.update(corpus_fingerprint(g_chunks).encode())
    h.update(corpus_fingerprint(r_chunks).encode())
    return h.hexdigest()


def _as_tuple(x):
    """random.Random.setstate wants the tuples torch.save stored (lists after a round trip in some versions)."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def _make_optimizer(params: list[torch.nn.Parameter], p: FinetuneParams) -> torch.optim.Optimizer:
    if p.optimizer == "adam8bit":
        try:
            import bitsandbytes as bnb  # type: ignore
        except ImportError as exc:
            raise RuntimeError(
                "train.optimizer 'adam8bit' needs bitsandbytes, which is not installed: "
                "pip install 'sensepack[adam8bit]' (or use --optimizer adamw)"
            ) from exc
        return bnb.optim.Adam(params, lr=p.lr, betas=p.adam_betas, optim_bits=8)
    if p.optimizer != "adamw":
        raise ValueError(f"optimizer: unknown '{p.optimizer}' (adamw, adam8bit)")
    return torch.optim.AdamW(params, lr=p.lr, betas=p.adam_betas, weight_decay=p.weight_decay)


def finetune(
    model,
    train: Sequence[EncodedExample],
    loss_type: LossType,
    pairs: Sequence[tuple[int, int]],
    g_chunks: Sequence[torch.Tensor],
    r_chunks: Sequence[torch.Tensor],
    params: FinetuneParams,
    eval_examples: Sequence[EncodedExample] | None = None,
    threshold: float | None = None,
    progress: bool = True,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    rest: Sequence[Sequence[tuple[torch.Tensor, int, int]]] | None = None,
    checkpoint_dir: Path | None = None,
) -> FinetuneResult:
    """`rest`: per training example, (ids, lo, hi) sequences for the rest-of-example KL (params.rest_kl_weight): the
    example's own tokens, then text that does not depend on the edit; every position outside [lo, hi) (those
    predicting the answer) is kept as before.

    `checkpoint_dir`: each trajectory's state is written there after every epoch and a later call with the same
    inputs continues from it, with the same result as an uninterrupted run (the caller removes the folder when it
    has what it needs)."""
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    lt = LossType(loss_type)
    index = EditIndex(pairs, model.config.num_senses)
    d = model.config.n_embd
    E = model.embedding.detach()

    train_cache = [cache_sequences(model, list(ex.seqs), index) for ex in train]
    gl = GLoss(model, g_chunks, index)
    kl = KLRegularizer(model, r_chunks, index)
    rest_kl: KLRegularizer | None = None
    rest_of: list[list[int]] = [[] for _ in train]
    if rest and params.rest_kl_weight > 0:
        if len(rest) != len(train):
            raise ValueError(f"rest: {len(rest)} sequence groups for {len(train)} training examples")
        owner = [i for i, group in enumerate(rest) for _ in group]
        flat = [seq for group in rest for seq in group]
        rest_kl = KLRegularizer(model, [ids for ids, _, _ in flat], index, exclude=[(lo, hi) for _, lo, hi in flat])
        rest_of = [[j for j, o in enumerate(owner) if o == i] for i in range(len(train))]
    ev = (
        _EvalCache(model, eval_examples, index, lt, threshold)
        if (eval_examples and params.eval_every_epoch and threshold is not None)
        else None
    )

    inputs = _inputs_digest(model, index, train, g_chunks, r_chunks) if checkpoint_dir is not None else ""
    results = [  # one trajectory per distinct lr, over the same cached α
        _train(
            p,
            index,
            d,
            E,
            lt,
            train_cache,
            gl,
            kl,
            r_chunks,
            rest_kl,
            rest_of,
            ev,
            progress,
            on_epoch,
            _Checkpoint.of(checkpoint_dir, p, inputs),
        )
        for p in params.groups()
    ]
    main = results[0]
    for res in results[1:]:
        main.chosen_epoch.update(res.chosen_epoch)
        main.deltas.update(res.deltas)
        main.history_of.update(res.history_of)
        main.optimizer_steps += res.optimizer_steps
        main.examples_counted += res.examples_counted
    return main


def _train(
    params: FinetuneParams,
    index: EditIndex,
    d: int,
    E: torch.Tensor,
    lt: LossType,
    train_cache: list[list[CachedSeq]],
    gl: GLoss,
    kl: KLRegularizer,
    r_chunks: Sequence[torch.Tensor],
    rest_kl: KLRegularizer | None,
    rest_of: list[list[int]],
    ev: _EvalCache | None,
    progress: bool,
    on_epoch: Callable[[EpochRecord], None] | None,
    checkpoint: _Checkpoint | None = None,
) -> FinetuneResult:
    """One training trajectory from zero deltas at params.lr, for params.epsilons (or from `checkpoint`'s epoch)."""
    rng = random.Random(params.seed)
    torch.manual_seed(params.seed)
    deltas = torch.nn.Parameter(torch.zeros(len(index), d, device=E.device))
    opt = _make_optimizer([deltas], params) if len(index) else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(params.epochs, 1)) if opt else None
    caps = params.epoch_cap or {}
    state = checkpoint.load() if checkpoint else None
    if state is None:
        with torch.no_grad():
            loss0 = sum(
                float(training_loss(lt, [c.nll_sum(E, deltas) for c in seqs], [c.scored.n for c in seqs]))
                for seqs in train_cache
            ) / max(len(train_cache), 1)
        history = [EpochRecord(0, loss0, gl.base_mean, 1.0, None, ev.success(E, deltas.detach()) if ev else None)]
        chosen = {eps: 0 for eps in params.epsilons}
        kept = {eps: deltas.detach().float().cpu().clone() for eps in params.epsilons}
        steps = counted = start = 0
    else:
        start, steps, counted = state["epoch"], state["steps"], state["counted"]
        history = [EpochRecord(**h) for h in state["history"]]
        chosen = {float(e): c for e, c in state["chosen"].items()}
        kept = {float(e): t for e, t in state["kept"].items()}
        with torch.no_grad():
            deltas.copy_(state["deltas"])
        if opt is not None and sched is not None:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        rng.setstate(_as_tuple(state["rng"]))
        torch.set_rng_state(state["torch_rng"])
    if on_epoch:
        for rec in history:
            on_epoch(rec)
    acc = max(1, params.grad_accum)
    # with a cap for every ε (sweep reports) training stops at the largest cap; the cosine
    # schedule keeps its full length so the capped epochs match the selection run's
    last_epoch = params.epochs
    if caps and all(eps in caps for eps in params.epsilons):
        last_epoch = min(params.epochs, max(caps[eps] for eps in params.epsilons))
    bar = tqdm(
        range(start + 1, last_epoch + 1),
        desc="epochs",
        initial=start,
        total=last_epoch,
        disable=not progress or not len(index),
    )
    for epoch in bar:
        if opt is None or sched is None:  # no selected senses: nothing to train
            break
        order = list(range(len(train_cache)))
        rng.shuffle(order)
        loss_sum = 0.0
        pending = 0
        opt.zero_grad(set_to_none=True)
        for n_seen, i in enumerate(order, start=1):
            if params.upstream_grad_bug:
                opt.zero_grad(set_to_none=True)
            seqs = train_cache[i]
            sums = [c.nll_sum(E, deltas) for c in seqs]
            loss = training_loss(lt, sums, [c.scored.n for c in seqs])
            total = loss
            if r_chunks and params.kl_weight:
                reg = kl.loss(rng.randrange(len(r_chunks)), E, deltas)
                if reg is not None:
                    total = total + params.kl_weight * reg
            if rest_kl is not None:
                for j in rest_of[i]:
                    reg = rest_kl.loss(j, E, deltas)
                    if reg is not None:
                        total = total + params.rest_kl_weight * reg
            scale = 1.0 if params.upstream_grad_bug else 1.0 / acc
            if total.requires_grad:  # an example none of whose sources carries a selected sense: no gradient
                (total * scale).backward()
            loss_sum += float(loss.detach())
            pending += 1
            last = n_seen == len(order)
            if pending == acc or (last and not params.upstream_grad_bug):
                if params.upstream_grad_bug:
                    counted += 1
                else:
                    counted += pending
                    if pending < acc and deltas.grad is not None:  # remainder: the mean of what was accumulated
                        deltas.grad.mul_(acc / pending)
                if deltas.grad is not None:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
                pending = 0
        lr = float(sched.get_last_lr()[0])
        sched.step()
        ratio = gl.ratio(deltas.detach())
        rec = EpochRecord(
            epoch,
            loss_sum / max(len(order), 1),
            gl.base_mean * ratio,
            ratio,
            lr,
            ev.success(E, deltas.detach()) if ev else None,
        )
        history.append(rec)
        for eps in params.epsilons:
            if in_ball(ratio, eps) and epoch <= caps.get(eps, math.inf):
                chosen[eps] = epoch
                kept[eps] = deltas.detach().float().cpu().clone()
        log.info("epoch", extra={"fields": {k: v for k, v in rec.__dict__.items()}})
        bar.set_postfix(loss=f"{rec.train_loss:.4f}", g_ratio=f"{ratio:.6f}")
        if checkpoint:
            checkpoint.save(
                {
                    "epoch": epoch,
                    "steps": steps,
                    "counted": counted,
                    "history": [asdict(h) for h in history],
                    "chosen": {str(e): c for e, c in chosen.items()},
                    "kept": {str(e): t for e, t in kept.items()},
                    "deltas": deltas.detach().clone(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(),
                }
            )
        if on_epoch:
            on_epoch(rec)
    return FinetuneResult(
        list(index.pairs), history, chosen, kept, steps, counted, {eps: history for eps in params.epsilons}
    )
