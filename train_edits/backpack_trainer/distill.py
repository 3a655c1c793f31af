"""The loss (CE and top-k KD) and the teacher: loaded under the same tokenizer, its top-k computed per batch
or once into a cache on disk, its embedding as the Backpack's initial E (see the package docstring, "Loss")."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ensemble.backpack import BackpackLM
from ensemble.vocab import Vocabulary

from .config import BackpackTrainConfig, TrainConfigError
from .data import save_safetensors
from .distributed import autocast

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


def default_cache_dir() -> Path:
    root = os.environ.get("SENSEPACK_CACHE") or Path.home() / ".cache" / "sensepack"
    return Path(root) / "distill"


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


def load_large(spec: str, cfg: BackpackTrainConfig, vocab: Vocabulary, device: torch.device):
    from ensemble.large_model import load_large_model

    _check_teacher_tokenizer(spec, vocab.fingerprint, vocab.size)
    model = load_large_model(spec, dtype=cfg.large_dtype, device=str(device))
    vocab.check_covers(spec, model.get_output_embeddings().weight.shape[0])
    for p in model.parameters():
        p.requires_grad_(False)
    return model


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
        with autocast(device_type, cfg.amp):
            ids[i : i + batch], lps[i : i + batch] = teacher_topk(teacher, train[i : i + batch], vocab.size, k)
    save_safetensors(path, {"ids": ids, "logprobs": lps})
    return path
