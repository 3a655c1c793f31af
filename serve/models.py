"""Building what the server serves: the ensemble (by profile), the pack
store, and the compatibility expectations packs are checked against."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass

import torch

log = logging.getLogger("sensepack.models")


@dataclass
class Served:
    ensemble: object
    tokenizer: object
    large_name: str
    backpack_name: str
    demo_pack: object = None       # ensemble.edits.PackRef of the demo profile
    dtype: str = "float32"
    device: str = "cpu"


def build_served(model_cfg) -> Served:
    from ensemble.ensemble import Ensemble
    from ensemble.tokenizer import load_tokenizer

    if model_cfg.profile == "demo":
        from ensemble.demo import build_demo

        ens, tok, pack = build_demo(model_cfg.demo_seed)
        return Served(ens, tok, f"tiny-gptj-demo(seed={model_cfg.demo_seed})",
                      f"tiny-backpack-demo(seed={model_cfg.demo_seed})", pack)
    from ensemble.backpack import BackpackLM
    from ensemble.large_model import load_large_model, parse_dtype

    tok = load_tokenizer(model_cfg.tokenizer)
    large = load_large_model(model_cfg.large_model, dtype=model_cfg.dtype, device=model_cfg.device)
    bp = BackpackLM.from_pretrained(model_cfg.backpack, dtype=parse_dtype(model_cfg.dtype)).to(model_cfg.device).eval()
    return Served(Ensemble(large, bp, tok), tok, model_cfg.large_model, model_cfg.backpack,
                  dtype=model_cfg.dtype, device=model_cfg.device)


def expectations(served: Served):
    from edits_store.format import Expectations
    from ensemble.tokenizer import tokenizer_fingerprint

    bp = served.ensemble.backpack
    return Expectations(backpack_fingerprint=bp.fingerprint(),
                        tokenizer_fingerprint=tokenizer_fingerprint(served.tokenizer),
                        vocab_size=bp.config.vocab_size, num_senses=bp.config.num_senses,
                        d_model=bp.config.n_embd, target_fingerprint=served.ensemble.large_fingerprint())


def pack_from_edits(name: str, edits, served: Served, beta: float, epsilon: float,
                    ball_ratio: float = 1.0, g_fingerprint: str = "builtin-gate-corpus", g_tokens: int = 0,
                    training: dict | None = None):
    """An edits_store pack for the served models, calibrated (β, ε) for the served large model."""
    from edits_store.format import CalibrationEntry, build_pack
    from ensemble.tokenizer import tokenizer_fingerprint

    bp = served.ensemble.backpack
    cal = CalibrationEntry(target_model=served.large_name, target_fingerprint=served.ensemble.large_fingerprint(),
                           beta=float(beta), ball_ratio=float(ball_ratio), g_fingerprint=g_fingerprint,
                           g_tokens=int(g_tokens), epsilon=float(epsilon))
    return build_pack(name, edits.token_ids, edits.sense_ids, edits.deltas.float(), backpack_name=served.backpack_name,
                      backpack_fingerprint=bp.fingerprint(), tokenizer_fingerprint=tokenizer_fingerprint(served.tokenizer),
                      vocab_size=bp.config.vocab_size, num_senses=bp.config.num_senses, epsilon=float(epsilon),
                      calibration=[cal], training=training or {"source": "sensepack serve demo"})


def open_pack_store(store_cfg, served: Served, demo_epsilon: float = 0.05):
    """(store, uri, temporary): the configured store; without one, a temporary store (removed at shutdown)
    holding the demo pack (alias prod)."""
    from edits_store.store import open_store

    uri = store_cfg.uri
    temporary = uri is None
    if temporary:
        uri = tempfile.mkdtemp(prefix="sensepack-demo-store-")
        log.info("demo store", extra={"event": "demo_store", "uri": uri})
    store = open_store(uri)
    if served.demo_pack is not None:
        p = served.demo_pack
        pack = pack_from_edits(p.name, p.edits, served, p.beta, demo_epsilon)
        version = store.publish(pack)
        if "prod" not in store.aliases(p.name):
            store.set_alias(p.name, "prod", version)
    return store, uri, temporary


def torch_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
