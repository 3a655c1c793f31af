"""Tiny, offline model set for the vLLM tests and benchmark (no downloads).

A random GPT-J with the real architecture (vocab 50400) and head_dim 32 (vLLM's CPU attention
supports head sizes 32, 64, 80, ...; the default tiny GPT-J has 16), saved with the real GPT-2
tokenizer into a folder vLLM loads; the tiny Backpack; and packs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ensemble.edits import PackRef, SenseEdits


def save_tiny_gptj(folder: str | Path, seed: int = 0, **overrides):
    """Save a tiny GPT-J (float32) + tokenizer to `folder`; returns the model (eval)."""
    from ensemble.large_model import tiny_gptj
    from ensemble.tokenizer import load_tokenizer

    cfg = dict(n_embd=64, n_head=2, rotary_dim=8, n_layer=2)
    cfg.update(overrides)
    model = tiny_gptj(seed, **cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    return model


def save_dummy_gptj(folder: str | Path, big: bool):
    """Write only config.json and the tokenizer for vLLM's dummy (random) weights (`load_format="dummy"`):
    GPT-J-6B's architecture when `big`, else the same code path at toy size (n_embd 128, 2 layers, head_dim
    64). Returns the GPTJConfig."""
    from transformers import GPTJConfig

    from ensemble.tokenizer import load_tokenizer

    cfg = GPTJConfig(
        n_embd=4096 if big else 128,
        n_layer=28 if big else 2,
        n_head=16 if big else 2,
        rotary_dim=64 if big else 16,
        n_positions=2048,
        vocab_size=50400,
        architectures=["GPTJForCausalLM"],
    )  # vLLM picks the model class from this
    cfg.save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    return cfg


def random_pack(
    backpack,
    token_ids: list[int],
    name: str = "random",
    version: str = "v1",
    beta: float = 1.0,
    scale: float = 4.0,
    seed: int = 1,
) -> PackRef:
    """Random Δ on every sense of the given tokens (strong enough to move greedy choices)."""
    g = torch.Generator().manual_seed(seed)
    k, d = backpack.config.num_senses, backpack.config.n_embd
    toks = sorted(set(token_ids))
    tok = torch.tensor([t for t in toks for _ in range(k)], dtype=torch.long)
    sen = torch.tensor([s for _ in toks for s in range(k)], dtype=torch.long)
    deltas = torch.randn(len(tok), d, generator=g) * scale
    return PackRef(name, version, SenseEdits(tok, sen, deltas), beta)
