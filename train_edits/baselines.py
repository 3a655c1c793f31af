"""Baselines of the paper's Tables 3 and 4: full finetuning and LoRA, of the Backpack or of the large model.

The same protocol as sense finetuning (``finetune.py``), only the trainable parameters differ:

- loss: the task's training loss on the suffix NLLs (per-token means, ``losses.training_loss``) plus
  ``kl_weight`` × KL(p_orig ‖ p_new) summed over every position of one random R chunk per example
  (upstream ``regularize.py``: the same KL regulariser for every method);
- AdamW (betas 0.9/0.995), cosine decay stepped once per epoch, ``grad_accum`` examples per step;
- the same ball and the same selection: after each epoch the model's G ratio (mean per-token NLL on G
  over the frozen original's, same batches) is measured, and per ε the weights of the **last** epoch
  with ratio < 1 + ε are kept (epoch 0, no change, always qualifies).

``full``: every parameter trains (upstream ``ft_experiment.py:42-49``). ``lora``: low-rank adapters
from the ``peft`` library (``sensepack[train]``) on the MLP projections of the transformer layers,
as upstream's sweeps (``configs/*/backpack_sweep/make_sweep.py``: ``.*\\.(layers)\\.mlp\\.(c_proj|c_fc)``);
the Backpack's GPT-2 ``Conv1D`` projections are swapped for the equivalent ``nn.Linear`` first (peft
adapts ``nn.Linear``). Upstream draws the layer range and a rank in 1..256 per sweep trial; here rank
and α are options and every layer is adapted.

For the large model the logits are taken over the tokenizer's U only, as everywhere in train_edits.
Snapshots of the trainable tensors are kept on CPU per ε (full finetuning of a large model keeps up to
one copy of its weights per ε: fine for SmolLM2-135M, not for GPT-J on a small host).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .compute import chunk_batches, next_token_nll
from .encoding import EncodedExample, pad_batch
from .finetune import EpochRecord, in_ball
from .losses import masked_nll_sums, training_loss
from .tasks import LossType

log = logging.getLogger("train_edits.baselines")

# upstream's LoRA targets: the MLP projections of the numbered transformer layers (not the sense network)
LORA_TARGETS = r".*\.(h|layers)\.\d+\.mlp\.(c_fc|c_proj|fc_in|fc_out|gate_proj|up_proj|down_proj)"


@dataclass
class BaselineParams:
    kind: str = "full"  # "full" | "lora"
    lr: float = 1e-5
    kl_weight: float = 0.3
    epochs: int = 10
    grad_accum: int = 5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.995)
    seed: int = 0
    epsilons: tuple[float, ...] = (1e-3, 1e-4, 1e-5)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = LORA_TARGETS


@dataclass
class BaselineResult:
    model: torch.nn.Module  # the trained copy (its weights: the last epoch's; see `load`)
    history: list[EpochRecord]
    chosen_epoch: dict[float, int]
    snapshots: dict[float, dict[str, torch.Tensor]] = field(repr=False, default_factory=dict)
    trainable: int = 0

    def load(self, eps: float) -> torch.nn.Module:
        """The model with the weights kept for ε (the last in-ball epoch)."""
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for k, v in self.snapshots[eps].items():
                params[k].copy_(v.to(params[k].device, params[k].dtype))
        return self.model


class Conv1DLinear(torch.nn.Linear):
    """GPT-2's Conv1D (weight [in, out]) as the equivalent nn.Linear (weight [out, in]), so peft can adapt it."""

    @classmethod
    def of(cls, conv) -> Conv1DLinear:
        w = conv.weight  # (in, out)
        lin = cls(w.shape[0], w.shape[1], bias=conv.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w.t())
            if conv.bias is not None:
                lin.bias.copy_(conv.bias)
        return lin


def _swap_conv1d(model: torch.nn.Module, pattern: str) -> int:
    n = 0
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ == "Conv1D" and re.fullmatch(pattern, name):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, Conv1DLinear.of(mod))
            n += 1
    return n


def prepare(model: torch.nn.Module, p: BaselineParams) -> torch.nn.Module:
    """A trainable copy of `model`: every weight (full) or LoRA adapters only (lora)."""
    new = copy.deepcopy(model)
    new.eval()  # no dropout: the ball is measured on the same function that is trained
    for prm in new.parameters():
        prm.requires_grad_(p.kind == "full")
    if p.kind == "full":
        return new
    if p.kind != "lora":
        raise ValueError(f"baseline kind: unknown '{p.kind}' (full, lora)")
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:
        raise RuntimeError("LoRA baselines need peft, which is not installed: pip install 'sensepack[train]'") from exc
    _swap_conv1d(new, p.lora_targets)
    targets = [n for n, m in new.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(p.lora_targets, n)]
    if not targets:
        raise ValueError(f"lora: no nn.Linear module matches {p.lora_targets!r}")
    # peft annotates lora_alpha as int but only divides by it (scaling = alpha / r): a float is fine
    cfg = LoraConfig(r=p.lora_rank, lora_alpha=p.lora_alpha, lora_dropout=0.0, target_modules=targets)  # type: ignore[arg-type]
    new = inject_adapter_in_model(cfg, new)
    for name, prm in new.named_parameters():
        prm.requires_grad_("lora_" in name)
    return new


def make_logits_fn(vocab_size: int | None):
    """Backpack: its logits as the core computes them (vocab_size None); a large model: logits over U."""
    if vocab_size is None:
        return lambda model, ids: model(ids).logits
    return lambda model, ids: model(input_ids=ids).logits[..., :vocab_size].float()


def _device(model) -> torch.device:
    return next(model.parameters()).device


class _GRatio:
    """Mean per-token NLL on G of a model over the frozen original's (same batches: 1.0 for no change)."""

    def __init__(self, orig, chunks: Sequence[torch.Tensor], logits_fn, batch_size: int = 8):
        self.chunks, self.logits_fn, self.batch_size = list(chunks), logits_fn, batch_size
        self.count = sum(len(c) - 1 for c in self.chunks)
        self.base = self._total(orig)

    @torch.no_grad()
    def _total(self, model) -> float:
        dev = _device(model)
        tot = 0.0
        for _, ids, mask in chunk_batches(self.chunks, self.batch_size):
            ids, mask = ids.to(dev), mask.to(dev)
            tot += float(next_token_nll(self.logits_fn(model, ids), ids, mask).sum())
        return tot

    def ratio(self, model) -> float:
        return self._total(model) / self.base


def finetune_baseline(
    orig: torch.nn.Module,
    train: Sequence[EncodedExample],
    loss_type: LossType,
    g_chunks: Sequence[torch.Tensor],
    r_chunks: Sequence[torch.Tensor],
    p: BaselineParams,
    vocab_size: int | None = None,
    progress: bool = True,
) -> BaselineResult:
    """Train a copy of `orig` (full or LoRA) with ball tracking; `orig` itself is never changed."""
    lt = LossType(loss_type)
    orig.eval()
    for prm in orig.parameters():
        prm.requires_grad_(False)
    rng = random.Random(p.seed)
    torch.manual_seed(p.seed)
    model = prepare(orig, p)
    logits_fn = make_logits_fn(vocab_size)
    dev = _device(orig)
    trainable = {n: prm for n, prm in model.named_parameters() if prm.requires_grad}
    opt = torch.optim.AdamW(list(trainable.values()), lr=p.lr, betas=p.adam_betas, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(p.epochs, 1))
    gr = _GRatio(orig, g_chunks, logits_fn)
    batches = [pad_batch(list(ex.seqs)) for ex in train]
    counts = [[s.n for s in ex.seqs] for ex in train]

    def example_loss(i: int) -> torch.Tensor:
        ids, tgt, mask = (t.to(dev) for t in batches[i])
        return training_loss(lt, list(masked_nll_sums(logits_fn(model, ids), tgt, mask)), counts[i])

    def kl_loss(j: int) -> torch.Tensor:
        ids = r_chunks[j][None].to(dev)
        with torch.no_grad():
            lp0 = torch.log_softmax(logits_fn(orig, ids).float(), -1)
        lp1 = torch.log_softmax(logits_fn(model, ids).float(), -1)
        return F.kl_div(lp1, lp0, log_target=True, reduction="sum")  # every position, the last one included

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: prm.detach().to("cpu", copy=True) for n, prm in trainable.items()}

    with torch.no_grad():
        loss0 = sum(float(example_loss(i)) for i in range(len(train))) / max(len(train), 1)
    history = [EpochRecord(0, loss0, gr.base / gr.count, 1.0, None)]
    chosen = {e: 0 for e in p.epsilons}
    first = snapshot()
    snaps = {e: first for e in p.epsilons}
    acc = max(1, p.grad_accum)
    for epoch in tqdm(range(1, p.epochs + 1), desc=f"{p.kind} epochs", disable=not progress):
        order = list(range(len(train)))
        rng.shuffle(order)
        opt.zero_grad(set_to_none=True)
        loss_sum, pending = 0.0, 0
        for n_seen, i in enumerate(order, start=1):
            loss = example_loss(i)
            total = loss
            if r_chunks and p.kl_weight:
                total = total + p.kl_weight * kl_loss(rng.randrange(len(r_chunks)))
            (total / acc).backward()
            loss_sum += float(loss.detach())
            pending += 1
            if pending == acc or n_seen == len(order):
                if pending < acc:  # the epoch's remainder: the mean of what was accumulated
                    for prm in trainable.values():
                        if prm.grad is not None:
                            prm.grad.mul_(acc / pending)
                opt.step()
                opt.zero_grad(set_to_none=True)
                pending = 0
        lr = float(sched.get_last_lr()[0])
        sched.step()
        ratio = gr.ratio(model)
        rec = EpochRecord(epoch, loss_sum / max(len(order), 1), gr.base / gr.count * ratio, ratio, lr)
        history.append(rec)
        snap = None
        for e in p.epsilons:
            if in_ball(ratio, e):
                snap = snap or snapshot()
                chosen[e], snaps[e] = epoch, snap
        log.info("baseline_epoch", extra={"fields": {"kind": p.kind, **rec.__dict__}})
    return BaselineResult(model, history, chosen, snaps, sum(t.numel() for t in trainable.values()))


def g_ratio_naive(orig, model, chunks: Sequence[torch.Tensor], vocab_size: int | None = None) -> float:
    """The G ratio by a plain loop, one chunk at a time (for tests and checks)."""
    f = make_logits_fn(vocab_size)
    tot0 = tot1 = 0.0
    with torch.no_grad():
        for c in chunks:
            ids = c[None].to(_device(orig))
            for m, acc in ((orig, 0), (model, 1)):
                lp = torch.log_softmax(f(m, ids)[0, :-1].float(), -1)
                nll = -float(lp.gather(-1, ids[0, 1:, None]).double().sum())
                if acc:
                    tot1 += nll
                else:
                    tot0 += nll
    return tot1 / tot0 if tot0 else math.nan
