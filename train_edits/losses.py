"""Training losses and evaluation scores on suffix NLLs.

Training (per-token **mean** NLL over each suffix, m = NLL_sum / n):

- ``good``:        m                   (raise p(suffix))
- ``bad``:         −m                  (lower p(suffix): minimise log p, as in the paper)
- ``balance``:     |m1 − m2|           (make both suffixes equally likely)
- ``good-v-bad``:  m1 − m2             (prefer suffix1 over suffix2)

Evaluation uses the **summed** NLL (see :func:`train_edits.tasks.example_score`).
"""

from __future__ import annotations

import torch

from .tasks import LossType


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log p(target) for logits (..., V) and integer targets (...)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    return -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def masked_nll_sums(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed NLL per row over the masked positions: (b, s, V), (b, s), (b, s) -> (b,)."""
    return (token_nll(logits, targets) * mask).sum(-1)


def training_loss(loss_type: LossType | str, sums: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """The per-example training loss from summed NLLs and suffix token counts."""
    lt = LossType(loss_type)
    means = [s / c for s, c in zip(sums, counts, strict=True)]
    if lt is LossType.GOOD:
        return means[0]
    if lt is LossType.BAD:
        return -means[0]
    if len(means) != 2:
        raise ValueError(f"loss type {lt.value} needs two suffixes")
    if lt is LossType.BALANCE:
        return (means[0] - means[1]).abs()
    return means[0] - means[1]
