"""An attached sense head: a Backpack whose α comes from a frozen large model's hidden states.

    C(x)_ℓ    = sense network(E_in[x])                                   token-only, as the Backpack's
    h_t       = the large model's final hidden state at t (its LM head's input), frozen
    α[ℓ,t,j]  = softmax_{j≤t}( q_ℓ(h_t)·k_ℓ(h_j) / sqrt(d_qk) + b_ℓ[min(t−j, D−1)] )
    o_t       = Σ_ℓ Σ_{j≤t} α[ℓ,t,j] C(x_j)_ℓ,      logits_t = E_out o_t

E_in / E_out are the large model's input embedding and LM head (tied for SmolLM2); neither is stored
with the head. The structure is the Backpack's exactly (α never depends on the senses), so sense
finetuning, the cached-α delta δ_t = Σ α Δ and the exact skip apply unchanged; what changes is where
the contextualization comes from: the large model's own context instead of a small stack learnt from
a few hundred thousand tokens. The head is trained by distillation to the large model's next-token
distribution (train_edits.sense_head_trainer), and E_out·δ lives in the large model's logit geometry.

The head answers the Backpack's interface (`contextualize`, `sense_vectors`, `embedding`, `forward`,
`config.n_positions / num_senses / n_embd / vocab_size`, `fingerprint`), so the full-sequence paths of
train_edits and the scorer take it as they take a BackpackLM. Its context comes from `context_hidden`,
which runs the attached large model; a caller that already has the hidden states passes them
(`contextualize(..., hidden=h)`) and nothing runs twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .backpack import BackpackConfig, BackpackOutput, SenseNetwork, add_sense_edits, causal_allowed
from .edits import SenseEdits
from .incremental import BackpackCache

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ARCHITECTURE = "SenseHeadLM"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class SenseHeadConfig:
    vocab_size: int  # rows of the large model's LM head
    n_embd: int  # the large model's hidden size (= the width of E)
    context_model: str  # the large model (name, folder or hub id) whose hidden states drive α
    context_fingerprint: str = ""  # ensemble.large_model.model_fingerprint of it ("" : not checked)
    num_senses: int = 16
    qk_dim: int = 0  # per-sense query/key width; 0: n_embd // num_senses
    sense_intermediate_scale: int = 1
    max_distance: int = 256  # relative-position bias buckets; distances past it share the last one
    n_positions: int = 1024  # the window of sources α sees (a sliding window past it, as the Backpack's)
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_embd", "num_senses", "max_distance", "n_positions", "sense_intermediate_scale"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.num_senses:
            raise ValueError(f"config: n_embd {self.n_embd} is not divisible by num_senses {self.num_senses}")
        if self.qk_dim < 0:
            raise ValueError(f"config: qk_dim must be >= 0, got {self.qk_dim}")
        if not self.context_model:
            raise ValueError("config: context_model is empty")

    @property
    def head_dim(self) -> int:
        return self.qk_dim or self.n_embd // self.num_senses

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SenseHeadConfig:
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("vocab_size", "n_embd", "context_model") if k not in d]
        if missing:
            raise ValueError(f"config: missing key(s) {missing}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return {"architectures": [ARCHITECTURE], **asdict(self)}

    def sense_config(self) -> BackpackConfig:
        """The Backpack config its sense network is built from (the same module as the Backpack's)."""
        return BackpackConfig(
            vocab_size=self.vocab_size,
            n_embd=self.n_embd,
            n_head=1,
            n_layer=0,
            num_senses=self.num_senses,
            sense_intermediate_scale=self.sense_intermediate_scale,
            n_positions=self.n_positions,
            layer_norm_epsilon=self.layer_norm_epsilon,
            attn_pdrop=self.dropout,
            embd_pdrop=self.dropout,
            resid_pdrop=self.dropout,
        )


def is_sense_head(folder: str | os.PathLike[str]) -> bool:
    """Whether a model folder holds a sense head (its config.json names the architecture)."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return ARCHITECTURE in (json.loads(cfg.read_text()).get("architectures") or [])
    except (json.JSONDecodeError, AttributeError):
        return False


def _weight(module: object, what: str) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"sense head: the large model has no {what} weight ({type(module).__name__})")
    return weight


class HiddenWeightNetwork(nn.Module):
    """α from the large model's hidden states: per-sense query/key projections and a relative-position bias."""

    def __init__(self, config: SenseHeadConfig):
        super().__init__()
        self.num_senses = config.num_senses
        self.head_dim = config.head_dim
        self.max_distance = config.max_distance
        self.c_attn = nn.Linear(config.n_embd, 2 * config.num_senses * config.head_dim)
        self.distance_bias = nn.Parameter(torch.zeros(config.num_senses, config.max_distance))
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def query_key(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (b, s, d) -> q, k each (b, k, s, d_qk)."""
        b, s, _ = h.shape
        qk = self.c_attn(h).view(b, s, 2, self.num_senses, self.head_dim)
        q, k = qk.unbind(dim=2)
        return q.transpose(1, 2), k.transpose(1, 2)

    def bias(self, distance: torch.Tensor) -> torch.Tensor:
        """distance (..., sq, sk) long, t − j -> (..., k, sq, sk) (negative distances clamp to 0: masked anyway)."""
        idx = distance.clamp(0, self.max_distance - 1)
        return self.distance_bias[:, idx].movedim(0, -3)

    def weights(self, q: torch.Tensor, k: torch.Tensor, distance: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """q (b,k,sq,hd), k (b,k,sk,hd), distance (b|1,sq,sk), allowed (b,1,sq,sk) -> α (b, k, sq, sk)."""
        scores = torch.matmul(q, (k * self.scale).transpose(-1, -2)) + self.bias(distance).to(q.dtype)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1)


class SenseHeadLM(nn.Module):
    """The head's own weights (sense network, weight network); the large model is attached, not owned."""

    def __init__(self, config: SenseHeadConfig, large: PreTrainedModel | None = None):
        super().__init__()
        self.config = config
        self.sense_network = SenseNetwork(config.sense_config())
        self.sense_weight_net = HiddenWeightNetwork(config)
        self.name_or_path = ""
        self._fingerprint: str | None = None
        self._large: list[PreTrainedModel] = []  # a list, so the large model is neither a submodule nor saved
        self.apply(self._init_weights)
        if large is not None:
            self.attach(large)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ the large model

    def attach(self, large: PreTrainedModel, check: bool = True) -> SenseHeadLM:
        """Use `large` (a transformers causal LM) for E and the hidden states; its fingerprint must be the one
        the head was trained on when the config records one."""
        emb = _weight(large.get_output_embeddings(), "LM head")
        if tuple(emb.shape) != (self.config.vocab_size, self.config.n_embd):
            raise ValueError(
                f"sense head: the large model's LM head is {tuple(emb.shape)}, the head was built for "
                f"({self.config.vocab_size}, {self.config.n_embd}) ({self.config.context_model})"
            )
        if check and self.config.context_fingerprint:
            from .large_model import model_fingerprint

            got = model_fingerprint(large)
            if got != self.config.context_fingerprint:
                raise ValueError(
                    f"sense head: context_fingerprint {self.config.context_fingerprint} (trained on "
                    f"{self.config.context_model}) but the attached large model is {got}"
                )
        self._large = [large]  # used under no_grad / detached: attaching never changes what the model trains
        self._fingerprint = None
        return self

    @property
    def large(self) -> PreTrainedModel:
        if not self._large:
            raise RuntimeError(f"sense head: no large model attached ({self.config.context_model}); call attach()")
        return self._large[0]

    @property
    def embedding(self) -> torch.Tensor:
        """E_out: the large model's LM head rows, (vocab, d); logits = E_out o."""
        return _weight(self.large.get_output_embeddings(), "LM head")

    @property
    def input_embedding(self) -> torch.Tensor:
        return _weight(self.large.get_input_embeddings(), "input embedding")

    @torch.no_grad()
    def context_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The large model's final hidden states (its LM head's input) for right-padded rows: (b, s, d)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.large.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
        return out.last_hidden_state

    # ------------------------------------------------------------------ the Backpack's interface

    def sense_vectors(self, input_ids: torch.Tensor) -> torch.Tensor:
        """C(x): (b, k, s, d) from the large model's (frozen) input embedding."""
        embeds = F.embedding(input_ids, self.input_embedding.detach())
        return self.sense_network(embeds.to(self.sense_weight_net.c_attn.weight.dtype))

    def alpha_from_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """α (b, k, s, s) from hidden states (b, s, d) of right-padded rows."""
        b, s, _ = hidden.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, s, dtype=torch.long, device=hidden.device)
        allowed = causal_allowed(attention_mask)
        pos = torch.arange(s, device=hidden.device)
        distance = (pos[:, None] - pos[None, :])[None]  # (1, s, s); right padding keeps real positions aligned
        q, k = self.sense_weight_net.query_key(hidden.to(self.sense_weight_net.c_attn.weight.dtype))
        return self.sense_weight_net.weights(q, k, distance, allowed)

    def contextualize(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """α (b, k, s, s); `hidden`: the large model's final hidden states for these rows, when the caller has them."""
        if hidden is None:
            hidden = self.context_hidden(input_ids, attention_mask)
        return self.alpha_from_hidden(hidden, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        sense_edits: SenseEdits | None = None,
        hidden: torch.Tensor | None = None,
    ) -> BackpackOutput:
        if input_ids.shape[1] > self.config.n_positions:
            raise ValueError(
                f"input_ids: length {input_ids.shape[1]} exceeds the sense head's n_positions "
                f"{self.config.n_positions}; use ensemble.incremental for a sliding window"
            )
        alpha = self.contextualize(input_ids, attention_mask, hidden)
        senses = self.sense_vectors(input_ids)
        if sense_edits is not None:
            senses = add_sense_edits(senses, input_ids, sense_edits)
        out = torch.matmul(alpha, senses).sum(dim=1)
        logits = F.linear(out, self.embedding.detach().to(out.dtype))
        return BackpackOutput(logits=logits, alpha=alpha, senses=senses, hidden=out)

    # ------------------------------------------------------------------ checkpoints

    def save_pretrained(self, folder: str | os.PathLike[str], dtype: torch.dtype | None = None) -> None:
        """config.json + model.safetensors (the head's weights only; `dtype` to store them narrower)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1))
        sd = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in self.state_dict().items()}
        save_file(sd, str(folder / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike[str],
        large: PreTrainedModel | None = None,
        dtype: torch.dtype | None = None,
        check: bool = True,
    ) -> SenseHeadLM:
        """Load a head folder and attach `large` (or load its context_model by name when not given)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config = SenseHeadConfig.from_dict(json.loads((folder / "config.json").read_text()))
        path = folder / WEIGHTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE}")
        raw = load_file(str(path))
        model = cls(config)
        expected = model.state_dict()
        unknown = sorted(set(raw) - set(expected))
        missing = sorted(set(expected) - set(raw))
        if unknown or missing:
            raise ValueError(f"{path}: unexpected key(s) {unknown}, missing key(s) {missing}")
        for key, tensor in raw.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"{path}: key {key!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
                )
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in raw.items()}, strict=True)
        if dtype is not None:
            model = model.to(dtype)
        if large is None:
            from .large_model import load_large_model

            large = load_large_model(config.context_model, dtype=dtype)
        model.attach(large, check=check)
        model.name_or_path = str(folder)
        return model.eval()

    def fingerprint(self) -> str:
        """sha256 of the config, every head weight's bytes and the attached large model's fingerprint."""
        if self._fingerprint is None:
            from .large_model import model_fingerprint

            h = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
            for key, tensor in sorted(self.state_dict().items()):
                h.update(key.encode())
                h.update(str(tensor.dtype).encode())
                h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
            h.update(model_fingerprint(self.large).encode())
            self._fingerprint = "sha256:" + h.hexdigest()
        return self._fingerprint


# ---------------------------------------------------------------------- incremental (the serving path)
#
# The cache is `ensemble.incremental.BackpackCache` with no GPT-2 layers: per row the weight keys
# k_ℓ(h_j) of the window's tokens, the tokens, the window length and α of the newest token. The
# hidden states come from the large model's own forward (the engine has them); nothing here runs it.


def _alpha_row(model: SenseHeadLM, q: torch.Tensor, weight_keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """α of each row's newest token (slot lengths−1) over its cached weight keys: (b, k, capacity)."""
    cap = weight_keys.shape[2]
    slots = torch.arange(cap, device=q.device)
    visible = slots[None, :] < lengths[:, None]  # (b, cap)
    distance = (lengths - 1)[:, None] - slots[None, :]  # (b, cap)
    wnet = model.sense_weight_net
    return wnet.weights(q, weight_keys, distance[:, None, :], visible[:, None, None, :]).squeeze(2)


@torch.no_grad()
def head_prefill(model: SenseHeadLM, rows: list[list[int]], hidden: list[torch.Tensor]) -> BackpackCache:
    """A fresh cache for rows of tokens with their large-model hidden states ((len, d) each, len ≤ n_positions)."""
    cap = model.config.n_positions
    if any(len(r) == 0 or len(r) > cap for r in rows):
        raise ValueError(f"head_prefill: every row needs 1..{cap} tokens, got lengths {[len(r) for r in rows]}")
    if [len(r) for r in rows] != [int(h.shape[0]) for h in hidden]:
        raise ValueError("head_prefill: each row needs one hidden state per token")
    wnet = model.sense_weight_net
    device, dtype = wnet.c_attn.weight.device, wnet.c_attn.weight.dtype
    b, s = len(rows), max(len(r) for r in rows)
    h = torch.zeros(b, s, model.config.n_embd, dtype=dtype, device=device)
    tokens = torch.zeros(b, cap, dtype=torch.long, device=device)
    for i, (r, hr) in enumerate(zip(rows, hidden, strict=True)):
        h[i, : len(r)] = hr.to(device, dtype)
        tokens[i, : len(r)] = torch.tensor(r, device=device)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)
    wq, wk = wnet.query_key(h)
    weight_keys = torch.zeros(b, model.config.num_senses, cap, wnet.head_dim, dtype=dtype, device=device)
    weight_keys[:, :, :s] = wk
    q_last = wq[torch.arange(b, device=device), :, lengths - 1].unsqueeze(2)
    return BackpackCache([], [], weight_keys, tokens, lengths, _alpha_row(model, q_last, weight_keys, lengths))


@torch.no_grad()
def head_decode_step(
    model: SenseHeadLM,
    cache: BackpackCache,
    next_tokens: torch.Tensor,
    hidden: torch.Tensor,
    advance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Append one token per row with its hidden state (b, d); α of it over the row's window, (b, k, capacity).
    Rows with advance=False keep their state. Rows must have room (`head_slide_windows` first)."""
    b = cache.batch_size
    device = cache.tokens.device
    if advance is None:
        advance = torch.ones(b, dtype=torch.bool, device=device)
    if bool((cache.lengths[advance] >= cache.capacity).any()):
        raise ValueError("head_decode_step: a row's window is full; call head_slide_windows first")
    pos = cache.lengths.clamp(max=cache.capacity - 1)
    rows = torch.arange(b, device=device)
    wq, wk = model.sense_weight_net.query_key(hidden.to(cache.weight_keys.dtype).to(device)[:, None, :])
    cache.weight_keys[rows[advance], :, pos[advance]] = wk[advance, :, 0]
    new_lengths = pos + 1
    alpha = _alpha_row(model, wq, cache.weight_keys, new_lengths)
    cache.tokens[rows[advance], pos[advance]] = next_tokens.to(device)[advance]
    cache.lengths = torch.where(advance, new_lengths, cache.lengths)
    cache.last_alpha = torch.where(advance[:, None, None], alpha, cache.last_alpha)
    return cache.last_alpha


def head_slide_windows(cache: BackpackCache, rows_needing_room: torch.Tensor, keep: int) -> int:
    """Keep the most recent `keep` tokens of every full row among `rows_needing_room` (their weight keys do not
    change: α depends on the hidden states and on distances within the window only). Returns the count."""
    full = rows_needing_room & (cache.lengths >= cache.capacity)
    idx = full.nonzero().flatten()
    if idx.numel() == 0:
        return 0
    cap = cache.capacity
    cache.weight_keys[idx, :, :keep] = cache.weight_keys[idx, :, cap - keep :].clone()
    cache.tokens[idx, :keep] = cache.tokens[idx, cap - keep :].clone()
    cache.lengths[idx] = keep
    return int(idx.numel())
