"""Building what the server serves: the ensemble (by profile), the pack
store, and the compatibility expectations packs are checked against."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass


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

    @property
    def vocab(self):
        """The pairing's shared vocabulary (ensemble.vocab.Vocabulary): ids, top_k and EOS come from it."""
        return self.ensemble.vocab


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

    from ensemble.tokenizer import tokenizer_beside

    # The pairing's tokenizer: the configured one, else the one saved beside the Backpack, else GPT-2's.
    tok = load_tokenizer(model_cfg.tokenizer or tokenizer_beside(model_cfg.backpack))
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

    from ensemble.zoo import resolve_path

    uri = None if store_cfg.uri is None else str(resolve_path(store_cfg.uri))  # a registry name: its cached store
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


# ---------------------------------------------------------------------------------------- profiles, no server


class ProfileError(RuntimeError):
    """A profile or its pack could not be used; the message names the profile, file or pack."""


def profile_config(profile: str | None, config_path: str | None = None):
    """The validated server config of a shipped profile (serve/configs/NAME.yaml) or of a config file."""
    from serve.config import CONFIG_DIR, load_config

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
    from edits_store.errors import PackError
    from ensemble.edits import PackRef, SenseEdits

    ref = pack_ref or (cfg.packs.preload[0] if cfg.packs.preload else None)
    if ref is None:
        raise ProfileError("no pack: give --pack NAME[@ALIAS|@VERSION] or set packs.preload in the config")
    served = build_served(cfg.model)
    store, _, _ = open_pack_store(cfg.store, served)
    try:
        contents = store.load(ref, expectations(served))
    except (PackError, KeyError, FileNotFoundError) as e:
        raise ProfileError(f"pack {ref}: {e}") from None
    try:
        entry = contents.manifest.beta_for(served.ensemble.large_fingerprint())
    except PackError as e:
        raise ProfileError(f"pack {ref}: {e}") from None
    edits = SenseEdits(contents.token_ids, contents.sense_ids, contents.deltas)
    pack = PackRef(contents.manifest.name, contents.manifest.version, edits, float(entry.beta))
    tok = served.tokenizer
    ids = tok(prompt, add_special_tokens=False).input_ids
    base, edited = served.ensemble.generate_greedy([ids, ids], [[], [pack]], max_new_tokens)
    return {"prompt": prompt, "pack": f"{pack.name}@{pack.version}", "beta": pack.beta,
            "epsilon": float(entry.epsilon), "base": tok.decode(base), "edited": tok.decode(edited)}
