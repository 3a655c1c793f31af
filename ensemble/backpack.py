"""The Backpack language model (Hewitt et al., 2023), `stanfordnlp/backpack-gpt2`.

A clean reimplementation, nanoGPT style: one config dataclass, small modules,
and a `from_pretrained` that maps the upstream checkpoint's 191 keys
explicitly and checks every shape.

    senses   C(x)_ℓ   = sense network(E[x])                  (token-only)
    h                 = GPT-2 stack over the tokens            (contextualization)
    α[ℓ,t,j]          = softmax_j≤t(q_ℓ(h_t)·k_ℓ(h_j)/sqrt(d/k))
    o_t               = Σ_ℓ Σ_j α[ℓ,t,j] C(x_j)_ℓ,   logits_t = E o_t

The incremental (one token at a time) path lives in `ensemble.incremental`;
it uses the same modules as the full forward below.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .edits import SenseEdits

CHECKPOINT_PREFIX = "backpack."


@dataclass
class BackpackConfig:
    vocab_size: int = 50264
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_positions: int = 512
    num_senses: int = 16
    sense_intermediate_scale: int = 4
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = True
    reorder_and_upcast_attn: bool = False
    attn_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    initializer_range: float = 0.02
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"config: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_embd % self.num_senses:
            raise ValueError(f"config: n_embd {self.n_embd} is not divisible by num_senses {self.num_senses}")
        if self.activation_function not in ("gelu_new", "gelu"):
            raise ValueError(f"config: activation_function {self.activation_function!r} is not supported")
        if self.reorder_and_upcast_attn:
            raise ValueError("config: reorder_and_upcast_attn=True is not supported")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackpackConfig:
        """Parse an upstream config.json; keys that do not shape the model are ignored."""
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "num_senses") if k not in d]
        if missing:
            raise ValueError(f"config: missing key(s) {missing}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def tiny(cls, **overrides: Any) -> BackpackConfig:
        """The real architecture at test size, with the real vocabulary rows."""
        base: dict[str, Any] = dict(
            n_embd=64, n_layer=2, n_head=4, n_positions=128, num_senses=4, sense_intermediate_scale=2
        )
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(architectures=["BackpackGPT2LMHeadModel"], model_type="gpt2", num_senses=self.num_senses)
        return d


@dataclass
class BackpackOutput:
    logits: torch.Tensor  # (b, s, vocab)
    alpha: torch.Tensor  # (b, senses, s, s) [batch, sense, target, source]
    senses: torch.Tensor  # (b, senses, s, d)
    hidden: torch.Tensor  # (b, s, d) = Σ α·C


class Conv1D(nn.Module):
    """GPT-2's Conv1D: a linear layer whose weight is stored [in, out]."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


def _act(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return (lambda x: F.gelu(x, approximate="tanh")) if name == "gelu_new" else F.gelu


class MLP(nn.Module):
    def __init__(self, n_in: int, n_hidden: int, n_out: int, config: BackpackConfig):
        super().__init__()
        self.c_fc = Conv1D(n_in, n_hidden)
        self.c_proj = Conv1D(n_hidden, n_out)
        self.act = _act(config.activation_function)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Attention(nn.Module):
    """GPT-2 causal self-attention; `attend` is shared by the full and the incremental path."""

    def __init__(self, config: BackpackConfig, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        scale = 1.0
        if config.scale_attn_weights:
            scale /= math.sqrt(self.head_dim)
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = scale

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s, _ = x.shape
        q, k, v = self.c_attn(x).split(self.n_head * self.head_dim, dim=2)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.n_head, self.head_dim).transpose(1, 2)

        return heads(q), heads(k), heads(v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """q (b,h,sq,hd), k/v (b,h,sk,hd), allowed (b,1,sq,sk) bool -> (b, sq, d) after c_proj."""
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = self.attn_dropout(torch.softmax(scores, dim=-1))
        out = torch.matmul(weights, v)
        b, h, sq, hd = out.shape
        return self.resid_dropout(self.c_proj(out.transpose(1, 2).reshape(b, sq, h * hd)))


class Block(nn.Module):
    def __init__(self, config: BackpackConfig, layer_idx: int):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config.n_embd, inner, config.n_embd, config)


class GPT2Stack(nn.Module):
    """The contextualization network: GPT-2 without its LM head. Keys match upstream `gpt2_model.*`."""

    def __init__(self, config: BackpackConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    @property
    def blocks(self) -> Sequence[Block]:
        """`h` as what it holds (a ModuleList is typed as holding any Module)."""
        return cast("Sequence[Block]", self.h)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        for block in self.blocks:
            q, k, v = block.attn.qkv(block.ln_1(x))
            x = x + block.attn.attend(q, k, v, allowed)
            x = x + block.mlp(block.ln_2(x))
        return self.ln_f(x)


class SenseBlock(nn.Module):
    """Upstream `BackpackNoMixBlock`: an MLP-only residual block (no token mixing)."""

    def __init__(self, config: BackpackConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config.n_embd, 4 * config.n_embd, config.n_embd, config)
        self.resid_dropout1 = nn.Dropout(config.resid_pdrop)
        self.resid_dropout2 = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        residual = self.resid_dropout1(hidden) + residual
        hidden = self.ln_1(residual)
        residual = self.resid_dropout2(self.mlp(hidden)) + residual
        return self.ln_2(residual)


class SenseNetwork(nn.Module):
    """C(x): k sense vectors per token type, from its embedding alone."""

    def __init__(self, config: BackpackConfig):
        super().__init__()
        self.num_senses = config.num_senses
        self.n_embd = config.n_embd
        self.dropout = nn.Dropout(config.embd_pdrop)
        self.block = SenseBlock(config)
        self.ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.final_mlp = MLP(
            config.n_embd, config.sense_intermediate_scale * config.n_embd, config.n_embd * config.num_senses, config
        )

    def forward(self, input_embeds: torch.Tensor) -> torch.Tensor:
        residual = self.dropout(input_embeds)
        hidden = self.block(self.ln(residual), residual)
        senses = self.final_mlp(hidden)
        b, s, _ = senses.shape
        return senses.view(b, s, self.num_senses, self.n_embd).transpose(1, 2)  # (b, k, s, d)


class WeightNetwork(nn.Module):
    """α: one causal attention distribution per sense, from the contextualization h."""

    def __init__(self, config: BackpackConfig):
        super().__init__()
        self.num_senses = config.num_senses
        self.head_dim = config.n_embd // config.num_senses
        self.c_attn = nn.Linear(config.n_embd, 2 * config.n_embd)  # [out, in], as upstream
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def query_key(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (b, s, d) -> q, k each (b, k, s, d/k)."""
        b, s, _ = h.shape
        qk = self.c_attn(h).view(b, s, 2, self.num_senses, self.head_dim)
        q, k = qk.unbind(dim=2)
        return q.transpose(1, 2), k.transpose(1, 2)

    def weights(self, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """q (b,k,sq,hd), k (b,k,sk,hd), allowed (b,1,sq,sk) -> α (b, k, sq, sk)."""
        scores = torch.matmul(q, (k * self.scale).transpose(-1, -2))
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1)


def causal_allowed(attention_mask: torch.Tensor) -> torch.Tensor:
    """(b, s) 0/1 padding mask -> (b, 1, s, s) bool: key j visible to query t iff j <= t and j is real."""
    s = attention_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).tril()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-row positions counting real tokens only (works for left and right padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def add_sense_edits(senses: torch.Tensor, input_ids: torch.Tensor, edits: SenseEdits) -> torch.Tensor:
    """senses (b, k, s, d) + Δ(x_j, ℓ) wherever (x_j, ℓ) is edited; differentiable in edits.deltas."""
    if len(edits) == 0:
        return senses
    match = (input_ids.unsqueeze(-1) == edits.token_ids.to(input_ids.device)).to(senses.dtype)  # (b, s, n)
    onehot = F.one_hot(edits.sense_ids.to(input_ids.device), senses.shape[1]).to(senses.dtype)  # (n, k)
    added = torch.einsum("bsn,nk,nd->bksd", match, onehot, edits.deltas.to(senses.dtype))
    return senses + added


class BackpackLM(nn.Module):
    def __init__(self, config: BackpackConfig):
        super().__init__()
        self.config = config
        self.gpt2_model = GPT2Stack(config)
        self.sense_network = SenseNetwork(config)
        self.sense_weight_net = WeightNetwork(config)
        self._fingerprint: str | None = None
        self.name_or_path = ""  # where it was loaded from (from_pretrained); "" for a model built in memory
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def embedding(self) -> torch.Tensor:
        """E: the word embeddings, tied to the LM head, (vocab, d)."""
        return self.gpt2_model.wte.weight

    def sense_vectors(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.sense_network(self.gpt2_model.wte(input_ids))

    def contextualize(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """α (b, k, s, s) without running the sense network."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        allowed = causal_allowed(attention_mask)
        h = self.gpt2_model(input_ids, positions_from_mask(attention_mask), allowed)
        q, k = self.sense_weight_net.query_key(h)
        return self.sense_weight_net.weights(q, k, allowed)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        sense_edits: SenseEdits | None = None,
    ) -> BackpackOutput:
        if input_ids.shape[1] > self.config.n_positions:
            raise ValueError(
                f"input_ids: length {input_ids.shape[1]} exceeds the Backpack's n_positions "
                f"{self.config.n_positions}; use ensemble.incremental for a sliding window"
            )
        alpha = self.contextualize(input_ids, attention_mask)
        senses = self.sense_vectors(input_ids)
        if sense_edits is not None:
            senses = add_sense_edits(senses, input_ids, sense_edits)
        hidden = torch.matmul(alpha, senses).sum(dim=1)  # Σ_ℓ α_ℓ C_ℓ: (b, s, d)
        logits = F.linear(hidden, self.embedding)
        return BackpackOutput(logits=logits, alpha=alpha, senses=senses, hidden=hidden)

    # ------------------------------------------------------------------ checkpoints

    def upstream_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under the upstream 191-entry key layout (buffers and aliases included)."""
        out: dict[str, torch.Tensor] = {}
        for key, tensor in self.state_dict().items():
            out[CHECKPOINT_PREFIX + key] = tensor
        n = self.config.n_positions
        for i in range(self.config.n_layer):
            out[f"{CHECKPOINT_PREFIX}gpt2_model.h.{i}.attn.bias"] = torch.ones(n, n, dtype=torch.bool).tril()[
                None, None
            ]
            out[f"{CHECKPOINT_PREFIX}gpt2_model.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        for alias, target in ALIASES.items():
            out[alias] = out[target]
        return out

    def save_pretrained(self, folder: str | os.PathLike[str], safe: bool = False) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1))
        sd = self.upstream_state_dict()
        if safe:
            from safetensors.torch import save_file

            # safetensors refuses shared storage: aliases are left out and re-derived on load.
            save_file({k: v.contiguous() for k, v in sd.items() if k not in ALIASES}, folder / "model.safetensors")
        else:
            torch.save(sd, folder / "pytorch_model.bin")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], dtype: torch.dtype | None = None) -> BackpackLM:
        """Load a local folder or a hub id holding config.json + pytorch_model.bin or model.safetensors."""
        folder = resolve_checkpoint_folder(str(name_or_path))
        config = BackpackConfig.from_dict(json.loads((folder / "config.json").read_text()))
        if (folder / "model.safetensors").exists():
            from safetensors.torch import load_file

            raw = load_file(folder / "model.safetensors")
            source = folder / "model.safetensors"
        elif (folder / "pytorch_model.bin").exists():
            raw = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
            source = folder / "pytorch_model.bin"
        else:
            raise FileNotFoundError(f"{folder}: neither model.safetensors nor pytorch_model.bin found")
        model = cls(config)
        model.load_state_dict(map_checkpoint(raw, model, source=str(source)), strict=True)
        if dtype is not None:
            model = model.to(dtype)
        model.name_or_path = str(name_or_path)
        return model.eval()

    def fingerprint(self) -> str:
        """sha256 of the config and every weight's bytes: what a pack was trained against."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
            for key, tensor in sorted(self.state_dict().items()):
                h.update(key.encode())
                h.update(str(tensor.dtype).encode())
                h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
            self._fingerprint = "sha256:" + h.hexdigest()
        return self._fingerprint


# Upstream keys that share storage with another key (the tied embeddings and the LM head).
ALIASES = {
    "backpack.word_embeddings.weight": "backpack.gpt2_model.wte.weight",
    "backpack.position_embeddings.weight": "backpack.gpt2_model.wpe.weight",
    "lm_head.weight": "backpack.gpt2_model.wte.weight",
}
# GPT-2's causal-mask buffers: dropped by exact suffix (a loose "attn.bias" filter would drop c_attn.bias).
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def map_checkpoint(
    raw: dict[str, torch.Tensor], model: BackpackLM, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Map the upstream layout onto our module keys, refusing any unknown, missing or mis-shaped key."""
    expected = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        if key.endswith(BUFFER_SUFFIXES):
            continue
        if key in ALIASES:
            target = ALIASES[key]
            if target in raw and not torch.equal(raw[target], tensor):
                raise ValueError(f"{source}: alias {key!r} differs from {target!r}, which it must equal")
            if target in raw:
                continue
            key = target  # an alias alone stands for its target
        if not key.startswith(CHECKPOINT_PREFIX):
            raise ValueError(f"{source}: unexpected key {key!r}")
        ours = key[len(CHECKPOINT_PREFIX) :]
        if ours not in expected:
            raise ValueError(f"{source}: unexpected key {key!r}")
        if tuple(tensor.shape) != tuple(expected[ours].shape):
            raise ValueError(
                f"{source}: key {key!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[ours].shape)}"
            )
        mapped[ours] = tensor
    missing = [CHECKPOINT_PREFIX + k for k in expected if k not in mapped]
    if missing:
        raise ValueError(f"{source}: missing key(s) {missing}")
    return mapped


def resolve_checkpoint_folder(name_or_path: str) -> Path:
    from .zoo import is_named, resolve

    if is_named(name_or_path):  # e.g. "backpack-smollm2": built by its recipe on first use, then cached
        return resolve(name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{name_or_path}: expected a folder or a hub id, got a file")
    from huggingface_hub import snapshot_download

    # Same code path as a local folder once the snapshot is on disk.
    return Path(snapshot_download(name_or_path, allow_patterns=["config.json", "*.safetensors", "pytorch_model.bin"]))
