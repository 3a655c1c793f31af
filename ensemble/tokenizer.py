"""The GPT-2 tokenizer shared by the Backpack and the large model.

The package carries the GPT-2 BPE files (MIT, see data/gpt2-tokenizer/LICENSE) so
that everything works offline; a model folder or hub id with its own tokenizer
files uses those instead.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

from transformers import AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerBase

PACKAGED_TOKENIZER_DIR = Path(__file__).parent / "data" / "gpt2-tokenizer"


def load_tokenizer(name_or_path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load the packaged GPT-2 tokenizer (None) or the tokenizer of a folder / hub id."""
    if name_or_path is None:
        # transformers 5 ignores vocab_file= / merges_file= kwargs: load the folder.
        tok = GPT2Tokenizer.from_pretrained(str(PACKAGED_TOKENIZER_DIR))
    else:
        from .zoo import resolve_path

        resolved = resolve_path(name_or_path)  # registry names use their cached folder's tokenizer
        folder = Path(resolved)
        bare_bpe = (
            folder.is_dir()
            and (folder / "vocab.json").exists()
            and (folder / "merges.txt").exists()
            and not (folder / "tokenizer_config.json").exists()
            and not (folder / "tokenizer.json").exists()
        )
        # A folder with only the two BPE files has no class to auto-detect: it is GPT-2's format.
        tok = GPT2Tokenizer.from_pretrained(str(folder)) if bare_bpe else AutoTokenizer.from_pretrained(str(resolved))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_beside(model: str | Path) -> str | None:
    """The folder of `model` (a folder or registry name) when it carries tokenizer files (tokenizer.json,
    or vocab.json + merges.txt), else None: a Backpack trained by sensepack saves its tokenizer beside it."""
    from .zoo import resolve_path

    folder = Path(resolve_path(model))
    has = (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )
    return str(folder) if folder.is_dir() and has else None


_FINGERPRINTS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, tuple[int, str]] = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Stable hash of the vocabulary (token -> id) and the BPE merges.

    Two tokenizers with the same fingerprint split every text the same way, so a
    pack trained under one is valid under the other. Remembered per tokenizer object (hashing the vocabulary
    takes ~0.3 s, and every pack written is stamped with it) until its length changes (added tokens).
    """
    known = _FINGERPRINTS.get(tokenizer)
    if known is not None and known[0] == len(tokenizer):
        return known[1]
    fp = _fingerprint(tokenizer)
    _FINGERPRINTS[tokenizer] = (len(tokenizer), fp)
    return fp


def _fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        merges = model.get("merges", [])
        merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
        h.update("\n".join(merges).encode())
    return "sha256:" + h.hexdigest()
