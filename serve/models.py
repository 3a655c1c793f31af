"""Building what the server serves: the ensemble (by profile), the pack
store, and the compatibility expectations packs are checked against.

With `engine: vllm` the large model runs inside vLLM only: `build_served(..., large_from_checkpoint=PATH)`
loads the tokenizer and the Backpack, and describes the large model from its checkpoint
(`ensemble.large_model.large_model_info_from_checkpoint`: the same fingerprint packs are
calibrated against, read without loading the weights), so the server holds one copy of it."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edits_store.errors import PackError
from edits_store.format import CalibrationEntry, Expectations, build_pack
from edits_store.store import open_store
from ensemble.backpack import BackpackLM
from ensemble.demo import build_demo
from ensemble.edits import PackRef
from ensemble.ensemble import Ensemble
from ensemble.large_model import (
    LargeModelInfo,
    large_model_info,
    large_model_info_from_checkpoint,
    load_large_model,
    parse_dtype,
)
from ensemble.sense_head import is_sense_head
from ensemble.sense_model import SenseModel, load_sense_model, sense_model_folder
from ensemble.tokenizer import load_tokenizer, tokenizer_beside, tokenizer_fingerprint
from ensemble.vocab import Vocabulary
from ensemble.zoo import resolve_path
from sensepack_common.errors import ConfigError
from serve.config import CONFIG_DIR, load_config
from serve.pack_cache import served_edits

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("sensepack.models")


@dataclass
class Served:
    """The pairing a server serves. `ensemble` is None when the large model runs elsewhere (vLLM): then
    `backpack` and `large` (its info, read from the checkpoint) are given, and the vocabulary comes
    from the tokenizer, checked against both models' rows."""

    ensemble: Ensemble | None
    tokenizer: PreTrainedTokenizerBase
    large_name: str
    backpack_name: str
    demo_pack: PackRef | None = None  # the demo profile's pack
    dtype: str = "float32"
    device: str = "cpu"
    backpack: SenseModel = None  # type: ignore[assignment]  # filled from the ensemble when not given
    large: LargeModelInfo = None  # type: ignore[assignment]
    vocab: Vocabulary = None  # type: ignore[assignment]  # the shared vocabulary: ids, top_k and EOS

    def __post_init__(self) -> None:
        if self.ensemble is not None:
            self.backpack = self.backpack or self.ensemble.backpack
            self.large = self.large or large_model_info(self.ensemble.large, self.large_name)
            self.vocab = self.ensemble.vocab
            return
        if self.backpack is None or self.large is None:
            raise ValueError("Served: without an ensemble, give the backpack and the large model's info")
        self.vocab = Vocabulary.from_tokenizer(self.tokenizer)
        self.vocab.check_covers(f"large model {self.large.name}", self.large.vocab_rows)
        self.vocab.check_covers("backpack", self.backpack.config.vocab_size)


def build_served(model_cfg, large_from_checkpoint: str | None = None) -> Served:
    """The configured pairing. `large_from_checkpoint` (engine: vllm, the folder or hub id vLLM loads):
    the large model is not loaded here, only described from that checkpoint."""
    if model_cfg.profile == "demo":
        ens, tok, pack = build_demo(model_cfg.demo_seed)
        return Served(
            ens,
            tok,
            f"tiny-gptj-demo(seed={model_cfg.demo_seed})",
            f"tiny-backpack-demo(seed={model_cfg.demo_seed})",
            pack,
        )
    # The pairing's tokenizer: the configured one, else the one saved beside the Backpack, else GPT-2's.
    tok = load_tokenizer(model_cfg.tokenizer or tokenizer_beside(model_cfg.backpack))
    head = is_sense_head(sense_model_folder(model_cfg.backpack))
    if large_from_checkpoint is not None and head:
        raise ConfigError(
            f"model.backpack: {model_cfg.backpack} is a sense head, whose α reads the large model's hidden states; "
            "the vLLM engine gives its logits processors the logits only. Serve it with engine: embedded, or give "
            "a stand-alone Backpack (e.g. backpack-smollm2) for engine: vllm"
        )
    if head:  # attached to the served large model: one copy, and its hidden states come from the same forward
        large = load_large_model(model_cfg.large_model, dtype=model_cfg.dtype, device=model_cfg.device)
        head_model = load_sense_model(model_cfg.backpack, large=large, dtype=parse_dtype(model_cfg.dtype))
        return Served(
            Ensemble(large, head_model.to(model_cfg.device).eval(), tok),
            tok,
            model_cfg.large_model,
            model_cfg.backpack,
            dtype=model_cfg.dtype,
            device=model_cfg.device,
        )
    bp = BackpackLM.from_pretrained(model_cfg.backpack, dtype=parse_dtype(model_cfg.dtype)).to(model_cfg.device).eval()
    if large_from_checkpoint is not None:
        return Served(
            None,
            tok,
            str(large_from_checkpoint),
            model_cfg.backpack,
            dtype=model_cfg.dtype,
            device=model_cfg.device,
            backpack=bp,
            large=large_model_info_from_checkpoint(large_from_checkpoint, dtype=model_cfg.dtype, download=True),
        )
    large = load_large_model(model_cfg.large_model, dtype=model_cfg.dtype, device=model_cfg.device)
    return Served(
        Ensemble(large, bp, tok),
        tok,
        model_cfg.large_model,
        model_cfg.backpack,
        dtype=model_cfg.dtype,
        device=model_cfg.device,
    )


def expectations(served: Served):
    bp = served.backpack
    return Expectations(
        backpack_fingerprint=bp.fingerprint(),
        tokenizer_fingerprint=tokenizer_fingerprint(served.tokenizer),
        vocab_size=bp.config.vocab_size,
        num_senses=bp.config.num_senses,
        d_model=bp.config.n_embd,
        target_fingerprint=served.large.fingerprint,
    )


def pack_from_edits(
    name: str,
    edits,
    served: Served,
    beta: float,
    epsilon: float,
    ball_ratio: float = 1.0,
    g_fingerprint: str = "builtin-gate-corpus",
    g_tokens: int = 0,
    training: dict | None = None,
):
    """An edits_store pack for the served models, calibrated (β, ε) for the served large model."""
    bp = served.backpack
    cal = CalibrationEntry(
        target_model=served.large_name,
        target_fingerprint=served.large.fingerprint,
        beta=float(beta),
        ball_ratio=float(ball_ratio),
        g_fingerprint=g_fingerprint,
        g_tokens=int(g_tokens),
        epsilon=float(epsilon),
    )
    return build_pack(
        name,
        edits.token_ids,
        edits.sense_ids,
        edits.deltas.float(),
        backpack_name=served.backpack_name,
        backpack_fingerprint=bp.fingerprint(),
        tokenizer_fingerprint=tokenizer_fingerprint(served.tokenizer),
        vocab_size=bp.config.vocab_size,
        num_senses=bp.config.num_senses,
        epsilon=float(epsilon),
        calibration=[cal],
        training=training or {"source": "sensepack serve demo"},
    )


def open_pack_store(store_cfg, served: Served, demo_epsilon: float = 0.05):
    """(store, uri, temporary): the configured store; without one, a temporary store (removed at shutdown)
    holding the demo pack (alias prod)."""
    temporary = store_cfg.uri is None
    if store_cfg.uri is None:
        uri = tempfile.mkdtemp(prefix="sensepack-demo-store-")
        log.info("demo store", extra={"event": "demo_store", "uri": uri})
    else:
        uri = str(resolve_path(store_cfg.uri))  # a registry name: its cached store
    store = open_store(uri)
    if served.demo_pack is not None:
        p = served.demo_pack
        pack = pack_from_edits(p.name, p.edits, served, p.beta, demo_epsilon)
        version = store.publish(pack)
        if "prod" not in store.aliases(p.name):
            store.set_alias(p.name, "prod", version)
    return store, uri, temporary


# ---------------------------------------------------------------------------------------- profiles, no server


class ProfileError(RuntimeError):
    """A profile or its pack could not be used; the message names the profile, file or pack."""


def profile_config(profile: str | None, config_path: str | None = None):
    """The validated server config of a shipped profile (serve/configs/NAME.yaml) or of a config file."""
    if config_path is not None:
        return load_config(config_path)
    path = CONFIG_DIR / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "example")
        raise ProfileError(f"profile {profile!r}: no such profile (known: {', '.join(known)})")
    return load_config(path)


def generate_side_by_side(cfg, prompt: str, max_new_tokens: int, pack_ref: str | None = None) -> dict:
    """Greedy base and edited continuations of `prompt` under the config's models and its first preloaded pack,
    with the pack's β calibrated for the served large model (what the server would apply)."""
    ref = pack_ref or (cfg.packs.preload[0] if cfg.packs.preload else None)
    if ref is None:
        raise ProfileError("no pack: give --pack NAME[@ALIAS|@VERSION] or set packs.preload in the config")
    served = build_served(cfg.model)
    assert served.ensemble is not None  # built with the large model loaded
    store, _, _ = open_pack_store(cfg.store, served)
    try:
        contents = store.load(ref, expectations(served))
    except (PackError, KeyError, FileNotFoundError) as e:
        raise ProfileError(f"pack {ref}: {e}") from None
    try:
        edits, entry = served_edits(contents, served.ensemble.large_fingerprint())  # as the server applies it
    except PackError as e:
        raise ProfileError(f"pack {ref}: {e}") from None
    pack = PackRef(contents.manifest.name, contents.manifest.version, edits, float(entry.beta))
    tok = served.tokenizer
    ids = tok(prompt, add_special_tokens=False).input_ids
    base, edited = served.ensemble.generate_greedy([ids, ids], [[], [pack]], max_new_tokens)
    return {
        "prompt": prompt,
        "pack": f"{pack.name}@{pack.version}",
        "beta": pack.beta,
        "epsilon": float(entry.epsilon),
        "base": tok.decode(base),
        "edited": tok.decode(edited),
    }
