"""A tiny, offline, end-to-end ensemble: random GPT-J and Backpack with the real
architectures and the real GPT-2 tokenizer, and a small hand-made pack.

Nothing is downloaded. The pack steers continuations of prompts that mention
"Mauritius" toward " Port Louis", so a newcomer sees the ensemble act.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .backpack import BackpackConfig, BackpackLM
from .edits import PackRef, SenseEdits
from .ensemble import Ensemble
from .large_model import tiny_gptj
from .sense_head import SenseHeadLM
from .tokenizer import load_tokenizer

DEMO_TRIGGER = " Mauritius"
DEMO_TARGET = " Port Louis"


def tiny_backpack(seed: int = 0, **overrides: Any) -> BackpackLM:
    torch.manual_seed(seed)
    return BackpackLM(BackpackConfig.tiny(**overrides)).eval()


def demo_pack(
    backpack: BackpackLM | SenseHeadLM,
    tokenizer: PreTrainedTokenizerBase,
    trigger: str = DEMO_TRIGGER,
    target: str = DEMO_TARGET,
    strength: float = 12.0,
) -> PackRef:
    """Δ on every sense of the trigger's tokens, pointing along E[target tokens]: E·δ raises them."""
    trig = tokenizer(trigger).input_ids
    targ = tokenizer(target).input_ids
    E = backpack.embedding.detach()
    direction = E[targ].sum(0)
    direction = direction / direction.norm() ** 2 * strength
    k = backpack.config.num_senses
    token_ids = torch.tensor([t for t in trig for _ in range(k)], dtype=torch.long)
    sense_ids = torch.tensor([s for _ in trig for s in range(k)], dtype=torch.long)
    deltas = direction.expand(len(token_ids), -1).clone()
    return PackRef(name="demo-capitals", version="demo", edits=SenseEdits(token_ids, sense_ids, deltas), beta=1.0)


def build_demo(seed: int = 0) -> tuple[Ensemble, PreTrainedTokenizerBase, PackRef]:
    tokenizer = load_tokenizer()
    backpack = tiny_backpack(seed)
    large = tiny_gptj(seed)
    return Ensemble(large, backpack, tokenizer), tokenizer, demo_pack(backpack, tokenizer)


def run_demo(prompt: str, max_new_tokens: int = 12, seed: int = 0) -> dict[str, Any]:
    ens, tok, pack = build_demo(seed)
    ids = tok(prompt).input_ids
    base, edited = ens.generate_greedy([ids, ids], [[], [pack]], max_new_tokens)
    return {
        "prompt": prompt,
        "pack": f"{pack.name}@{pack.version} (beta={pack.beta})",
        "base": tok.decode(base),
        "edited": tok.decode(edited),
        "backpack_calls": ens.stats.backpack_calls,
        "exact_skip_rows": ens.stats.exact_skip_rows,
    }
