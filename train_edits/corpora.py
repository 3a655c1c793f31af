"""The general corpus G and the disjoint regularisation corpus R.

Documents (lines of a JSONL file with a ``text`` field, or whole ``.txt``
files, or a Hugging Face dataset when online) are shuffled with a seed and
split **by document** into G and R, so no text is shared. Each side's
documents are joined with ``<|endoftext|>`` (EOS, 50256; a document's own
leading ``<|endoftext|>`` is not doubled), tokenized, and cut into
consecutive fixed-length chunks (500 tokens by default, as in the paper; the
last partial chunk is dropped).

Corpus files are JSONL, one chunk per line: ``{"input_ids": [...], "text": ...}``.
Readers use ``input_ids`` when present, else tokenize ``text`` (so the
upstream ``val-chunked.jsonl`` / ``trainval-chunked.jsonl`` work too).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .encoding import EOS, EOS_ID, encode_text
from .tasks import DataError


def read_documents(paths: Sequence[str | Path], text_field: str = "text") -> list[str]:
    docs: list[str] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise DataError(p, None, None, "file not found")
        if p.suffix in (".jsonl", ".json"):
            with p.open(encoding="utf-8") as fh:
                for lineno, raw in enumerate(fh, start=1):
                    if not raw.strip():
                        continue
                    try:
                        rec = json.loads(raw)
                    except json.JSONDecodeError as exc:
                        raise DataError(p, lineno, None, f"invalid JSON ({exc.msg})") from None
                    if not isinstance(rec, dict) or text_field not in rec:
                        raise DataError(p, lineno, text_field, "missing")
                    if not isinstance(rec[text_field], str):
                        raise DataError(p, lineno, text_field, f"expected a string, got {type(rec[text_field]).__name__}")
                    docs.append(rec[text_field])
        else:
            docs.append(p.read_text(encoding="utf-8"))
    return docs


def read_hf_documents(name: str, split: str = "train", text_field: str = "text", config: str | None = None,
                      limit: int | None = None) -> list[str]:  # pragma: no cover - needs network
    try:
        import datasets  # type: ignore
    except ImportError as exc:
        raise RuntimeError("reading a Hugging Face dataset needs the 'datasets' package (pip install datasets)") from exc
    ds = datasets.load_dataset(name, config, split=split, streaming=limit is not None)
    out = []
    for i, rec in enumerate(ds):
        if limit is not None and i >= limit:
            break
        out.append(rec[text_field])
    return out


def tokenize_documents(tokenizer, docs: Iterable[str]) -> list[int]:
    """Documents joined with EOS (one EOS before each document, none doubled)."""
    ids: list[int] = []
    for doc in docs:
        body = doc[len(EOS):] if doc.startswith(EOS) else doc
        ids.append(EOS_ID)
        ids.extend(encode_text(tokenizer, body))
    return ids


def chunk(ids: Sequence[int], length: int) -> list[list[int]]:
    if length < 2:
        raise ValueError("chunk length must be >= 2")
    return [list(ids[i:i + length]) for i in range(0, len(ids) - length + 1, length)]


@dataclass
class CorpusSplit:
    g: list[list[int]]
    r: list[list[int]]
    g_docs: int
    r_docs: int


def split_corpora(tokenizer, docs: Sequence[str], chunk_len: int = 500, g_fraction: float = 0.5,
                  seed: int = 0) -> CorpusSplit:
    if not 0.0 < g_fraction < 1.0:
        raise ValueError("g_fraction must be in (0, 1)")
    if len(docs) < 2:
        raise ValueError("need at least two documents to split into G and R")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_g = min(max(1, round(len(docs) * g_fraction)), len(docs) - 1)
    g_docs = [docs[i] for i in order[:n_g]]
    r_docs = [docs[i] for i in order[n_g:]]
    return CorpusSplit(chunk(tokenize_documents(tokenizer, g_docs), chunk_len),
                       chunk(tokenize_documents(tokenizer, r_docs), chunk_len), len(g_docs), len(r_docs))


def write_chunks(tokenizer, chunks: Sequence[Sequence[int]], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for c in chunks:
            fh.write(json.dumps({"input_ids": list(c), "text": tokenizer.decode(list(c))}) + "\n")


def read_chunks(path: str | Path, tokenizer=None, limit: int | None = None, max_len: int | None = None) -> list[torch.Tensor]:
    """Read a corpus file into LongTensors (one per chunk)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "corpus file not found")
    out: list[torch.Tensor] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if limit is not None and len(out) >= limit:
                break
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(path, lineno, None, f"invalid JSON ({exc.msg})") from None
            if "input_ids" in rec:
                ids = rec["input_ids"]
                if not isinstance(ids, list) or not all(isinstance(x, int) and 0 <= x < 50257 for x in ids):
                    raise DataError(path, lineno, "input_ids", "expected a list of token ids in [0, 50257)")
            elif "text" in rec:
                if tokenizer is None:
                    raise DataError(path, lineno, "input_ids", "missing (and no tokenizer given to read 'text')")
                ids = encode_text(tokenizer, rec["text"])
            else:
                raise DataError(path, lineno, "input_ids", "missing (need 'input_ids' or 'text')")
            if len(ids) < 2:
                continue
            if max_len is not None and len(ids) > max_len:
                raise DataError(path, lineno, "input_ids",
                                f"chunk of {len(ids)} tokens exceeds the Backpack context ({max_len}); "
                                f"rebuild the corpus with a smaller --chunk-len")
            out.append(torch.tensor(ids, dtype=torch.long))
    if not out:
        raise DataError(path, None, None, "no chunks")
    return out


def corpus_fingerprint(chunks: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c.to(torch.int64).numpy().tobytes())
        h.update(b"|")
    return "sha256:" + h.hexdigest()


__all__ = ["read_documents", "read_hf_documents", "tokenize_documents", "chunk", "split_corpora", "write_chunks",
           "read_chunks", "corpus_fingerprint", "CorpusSplit", "EOS"]
