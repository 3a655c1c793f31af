"""Where the processor (which may live in vLLM's engine-core / worker process) finds the
Backpack and the pinned packs' edits.

* **In-process** (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the uni executor): the server fills
  ``REGISTRY`` before the engine starts: the Backpack object and a pack source, normally
  ``PackManagerSource(pack_manager)`` (the manager's resident versions keyed by (name, version)).
  A request pins its versions at admission, so they stay resident while its row lives.
* **Multi-process / multi-node** (mp executor, tensor parallelism): every worker loads the
  Backpack folder and reads ``name@version`` from the same edits store, both named in
  ``LLM(additional_config={"sensepack": {"backpack": PATH, "store": URL, "dtype": "float32",
  "vocab_size": N}})`` or the env vars ``SENSEPACK_VLLM_BACKPACK`` / ``SENSEPACK_VLLM_STORE`` /
  ``SENSEPACK_VLLM_DTYPE`` / ``SENSEPACK_VLLM_VOCAB_SIZE``. ``vocab_size`` is |U|, the tokenizer's
  size (ids at or above it are masked); without it the processor loads vLLM's tokenizer to count it.
  Pack versions are immutable (content-hashed), so a worker reading the store sees exactly
  what the server pinned.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol

import torch

from ensemble.edits import SenseEdits

if TYPE_CHECKING:
    from ensemble.backpack import BackpackLM


class EditsSource(Protocol):
    def edits(self, name: str, version: str) -> SenseEdits: ...


class PackUnavailable(KeyError):
    pass


class DictSource:
    """A plain {(name, version): SenseEdits} table (tests, scripts)."""

    def __init__(self, table: dict | None = None):
        self.table = dict(table or {})

    def put(self, name: str, version: str, edits: SenseEdits) -> None:
        self.table[(name, version)] = edits

    def edits(self, name: str, version: str) -> SenseEdits:
        try:
            return self.table[(name, version)]
        except KeyError:
            raise PackUnavailable(f"pack {name}@{version} is not in the registry") from None


class PackManagerSource:
    """Resident versions by (name, version) from anything with `residents()`: the pack manager's
    serve.pack_cache.ResidentTable (what the server passes, built before the manager) or the manager itself.
    A version being scored before it is resident (the activation gate) is `stage`d for that time
    (serve.vllm.scoring), counted per user."""

    def __init__(self, manager):
        self.manager = manager
        self._staged: dict[tuple[str, str], list] = {}  # (name, version) -> [edits, users]
        self._lock = threading.Lock()

    def stage(self, name: str, version: str, edits: SenseEdits) -> None:
        with self._lock:
            self._staged.setdefault((name, version), [edits, 0])[1] += 1

    def unstage(self, name: str, version: str) -> None:
        with self._lock:
            entry = self._staged.get((name, version))
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._staged[(name, version)]

    def edits(self, name: str, version: str) -> SenseEdits:
        for r in self.manager.residents():
            if r.name == name and r.version == version and r.state != "freed":
                return r.edits
        with self._lock:
            entry = self._staged.get((name, version))
        if entry is not None:
            return entry[0]
        raise PackUnavailable(f"pack {name}@{version} is not resident in the pack manager")


class StoreSource:
    """Reads immutable pack versions from an edits store URL (LRU-cached)."""

    def __init__(self, url: str, max_cached: int = 64):
        from edits_store import open_store

        self.store = open_store(url)
        self.max_cached = max_cached
        self._cache: OrderedDict[tuple[str, str], SenseEdits] = OrderedDict()
        self._lock = threading.Lock()

    def edits(self, name: str, version: str) -> SenseEdits:
        key = (name, version)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            c = self.store.load(f"{name}@{version}")
        except Exception as e:  # noqa: BLE001 - PackNotFoundError, validation errors, the store's I/O: all one refusal
            raise PackUnavailable(f"pack {name}@{version}: {e}") from None
        edits = SenseEdits(c.token_ids, c.sense_ids, c.deltas)
        with self._lock:
            self._cache[key] = edits
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return edits


class Registry:
    """Process-global: what an in-process server hands to the processors vLLM builds."""

    def __init__(self) -> None:
        self.backpack: BackpackLM | None = None
        self.source: EditsSource | None = None
        self.window_keep: int | None = None
        self.vocab_size: int | None = None  # |U| of the served pairing (ensemble.vocab.Vocabulary.size)
        self.processors: list = []  # live shim instances (hot-path stats, tests)

    def configure(
        self, backpack: BackpackLM, source: EditsSource, window_keep: int | None = None, vocab_size: int | None = None
    ) -> None:
        self.backpack, self.source, self.window_keep, self.vocab_size = backpack, source, window_keep, vocab_size

    def clear(self) -> None:
        self.backpack, self.source, self.window_keep, self.vocab_size = None, None, None, None
        self.processors = []


REGISTRY = Registry()


def _sensepack_config(vllm_config) -> dict:
    extra = getattr(vllm_config, "additional_config", None) or {}
    cfg = dict(extra.get("sensepack", {}) if isinstance(extra, dict) else {})
    for key, env in (
        ("backpack", "SENSEPACK_VLLM_BACKPACK"),
        ("store", "SENSEPACK_VLLM_STORE"),
        ("dtype", "SENSEPACK_VLLM_DTYPE"),
        ("vocab_size", "SENSEPACK_VLLM_VOCAB_SIZE"),
    ):
        if not cfg.get(key) and os.environ.get(env):
            cfg[key] = os.environ[env]
    return cfg


def _tokenizer_vocab_size(vllm_config) -> int:
    """|U| when nobody passed it: the size of the tokenizer vLLM serves with."""
    from ensemble.tokenizer import load_tokenizer

    mc = getattr(vllm_config, "model_config", None)
    name = getattr(mc, "tokenizer", None) or getattr(mc, "model", None)
    if not name:
        raise RuntimeError("sensepack processor: no vocab_size given and vLLM's model config names no tokenizer")
    return len(load_tokenizer(name))


def resolve_components(vllm_config, device) -> tuple[BackpackLM, EditsSource, int | None, int]:
    """(backpack on `device`, pack source, window_keep, |U|) for a processor instance."""
    device = torch.device(device)
    if REGISTRY.backpack is not None and REGISTRY.source is not None:
        bp = REGISTRY.backpack
        if bp.embedding.device != device:
            bp = copy.deepcopy(bp).to(device)  # e.g. one copy per rank under TP in one process
        vocab_size = REGISTRY.vocab_size or _tokenizer_vocab_size(vllm_config)
        return bp.eval(), REGISTRY.source, REGISTRY.window_keep, vocab_size
    cfg = _sensepack_config(vllm_config)
    if not cfg.get("backpack") or not cfg.get("store"):
        raise RuntimeError(
            "sensepack processor: no Backpack/pack source. In-process, fill serve.vllm.resolver.REGISTRY "
            "before starting vLLM; otherwise pass additional_config={'sensepack': {'backpack': PATH, "
            "'store': URL}} (or SENSEPACK_VLLM_BACKPACK / SENSEPACK_VLLM_STORE)"
        )
    from ensemble.backpack import BackpackLM
    from ensemble.large_model import parse_dtype

    bp = BackpackLM.from_pretrained(cfg["backpack"], dtype=parse_dtype(cfg.get("dtype") or "float32"))
    vocab_size = int(cfg["vocab_size"]) if cfg.get("vocab_size") else _tokenizer_vocab_size(vllm_config)
    return bp.to(device).eval(), StoreSource(cfg["store"]), cfg.get("window_keep"), vocab_size
