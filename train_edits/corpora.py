"""The general corpus G and the disjoint regularisation corpus R.

Documents (lines of a JSONL file with a ``text`` field, or whole ``.txt``
files, or a Hugging Face dataset when online) are shuffled with a seed and
split **by document** into G and R, so no text is shared. Each side's
documents are joined with the tokenizer's document separator (what a literal
``<|endoftext|>`` encodes to: 50256 for GPT-2; a document's own leading
``<|endoftext|>`` is not doubled), tokenized, and cut into
consecutive fixed-length chunks (500 tokens by default, as in the paper; the
last partial chunk is dropped).

Corpus files are JSONL, one chunk per line: ``{"input_ids": [...], "text": ...}``.
Readers use ``input_ids`` when present (each id must lie in the tokenizer's
[0, |U|)), else tokenize ``text`` (so the upstream ``val-chunked.jsonl`` /
``trainval-chunked.jsonl`` work too). ``prepare-corpora`` writes a
``corpora.json`` beside the files with the tokenizer's fingerprint; a run with
another tokenizer refuses them (``check_corpus_tokenizer``).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ensemble.jsonl import MAX_RECORD_CHARS, DataError, iter_jsonl, open_text
from ensemble.vocab import doc_separator_id

from .encoding import EOS, encode_text


def _txt_documents(path: Path, max_chars: int) -> list[str]:
    """The documents of a .txt file (separated by a literal <|endoftext|>), streamed: no document is held
    beyond `max_chars` characters (a longer one is a DataError naming the file and the document)."""
    docs: list[str] = []
    buf = ""
    with open_text(path) as fh:
        while True:
            try:
                chunk = fh.read(1 << 20)
            except UnicodeDecodeError as exc:
                raise DataError(path, None, None, f"not UTF-8 text ({exc.reason})") from None
            buf += chunk
            *done, buf = buf.split(EOS)
            docs.extend(d for d in done if d.strip())
            if len(buf) > max_chars:
                raise DataError(
                    path, None, None, f"document {len(docs) + 1} longer than {max_chars} characters (the limit)"
                )
            if not chunk:
                break
    if buf.strip():
        docs.append(buf)
    return docs


def read_documents(
    paths: Sequence[str | Path], text_field: str = "text", max_chars: int = MAX_RECORD_CHARS
) -> list[str]:
    """Documents of .jsonl / .jsonl.gz files (one per line, `text_field`) and .txt / .txt.gz files (one
    document per file, or several separated by a literal <|endoftext|>); a record or document longer than
    `max_chars` characters is refused while streaming, before it is held or tokenised."""
    docs: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise DataError(p, None, None, "file not found")
        name = p.name.removesuffix(".gz")
        if name.endswith((".jsonl", ".json")):
            for lineno, rec in iter_jsonl(p, max_chars):
                if text_field not in rec:
                    raise DataError(p, lineno, text_field, "missing")
                if not isinstance(rec[text_field], str):
                    got = type(rec[text_field]).__name__
                    raise DataError(p, lineno, text_field, f"expected a string, got {got}")
                docs.append(rec[text_field])
        elif name.endswith(".txt"):
            docs.extend(_txt_documents(p, max_chars))
        else:
            raise DataError(p, None, None, "unsupported document file (expected .jsonl, .jsonl.gz, .txt or .txt.gz)")
    return docs


def corpus_meta(
    tokenizer,
    split: CorpusSplit,
    inputs: Sequence[str],
    chunk_len: int,
    g_fraction: float = 0.5,
    seed: int = 0,
    tokenizer_spec: str | None = None,
) -> dict:
    """What corpora.json records: inputs, split sizes, fingerprints of G and R, and the tokenizer."""
    from ensemble.vocab import Vocabulary

    vocab = Vocabulary.from_tokenizer(tokenizer)
    return {
        "inputs": list(inputs),
        "chunk_len": chunk_len,
        "g_fraction": g_fraction,
        "seed": seed,
        "documents": split.g_docs + split.r_docs,
        "g_documents": split.g_docs,
        "r_documents": split.r_docs,
        "g_chunks": len(split.g),
        "r_chunks": len(split.r),
        "g_fingerprint": corpus_fingerprint([torch.tensor(c) for c in split.g]),
        "r_fingerprint": corpus_fingerprint([torch.tensor(c) for c in split.r]),
        "tokenizer": tokenizer_spec or "gpt2 (packaged)",
        "tokenizer_fingerprint": vocab.fingerprint,
        "vocab_size": vocab.size,
    }


def read_hf_documents(
    name: str, split: str = "train", text_field: str = "text", config: str | None = None, limit: int | None = None
) -> list[str]:  # pragma: no cover - needs network
    try:
        import datasets  # type: ignore
    except ImportError as exc:
        raise RuntimeError(
            "reading a Hugging Face dataset needs the 'datasets' package (pip install datasets)"
        ) from exc
    ds = datasets.load_dataset(name, config, split=split, streaming=limit is not None)
    out = []
    for i, rec in enumerate(ds):
        if limit is not None and i >= limit:
            break
        out.append(rec[text_field])
    return out


def tokenize_documents(tokenizer, docs: Iterable[str]) -> list[int]:
    """Documents joined with the separator (one before each document, none doubled)."""
    ids: list[int] = []
    sep = doc_separator_id(tokenizer)
    for doc in docs:
        body = doc[len(EOS) :] if doc.startswith(EOS) else doc
        ids.append(sep)
        ids.extend(encode_text(tokenizer, body))
    return ids


def chunk(ids: Sequence[int], length: int) -> list[list[int]]:
    if length < 2:
        raise ValueError("chunk length must be >= 2")
    return [list(ids[i : i + length]) for i in range(0, len(ids) - length + 1, length)]


@dataclass
class CorpusSplit:
    g: list[list[int]]
    r: list[list[int]]
    g_docs: int
    r_docs: int


def split_corpora(
    tokenizer, docs: Sequence[str], chunk_len: int = 500, g_fraction: float = 0.5, seed: int = 0
) -> CorpusSplit:
    if not 0.0 < g_fraction < 1.0:
        raise ValueError("g_fraction must be in (0, 1)")
    if len(docs) < 2:
        raise ValueError("need at least two documents to split into G and R")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_g = min(max(1, round(len(docs) * g_fraction)), len(docs) - 1)
    g_docs = [docs[i] for i in order[:n_g]]
    r_docs = [docs[i] for i in order[n_g:]]
    return CorpusSplit(
        chunk(tokenize_documents(tokenizer, g_docs), chunk_len),
        chunk(tokenize_documents(tokenizer, r_docs), chunk_len),
        len(g_docs),
        len(r_docs),
    )


def write_chunks(tokenizer, chunks: Sequence[Sequence[int]], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for c in chunks:
            fh.write(json.dumps({"input_ids": list(c), "text": tokenizer.decode(list(c))}) + "\n")


def check_corpus_tokenizer(path: str | Path, fingerprint: str) -> None:
    """Refuse a corpus file whose ``corpora.json`` (written beside it by prepare-corpora) records
    another tokenizer: its ids would mean other tokens. Files without that record are accepted."""
    path = Path(path)
    meta_path = path.parent / "corpora.json"
    if not meta_path.is_file():
        return
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(meta_path, None, None, f"invalid JSON ({exc.msg})") from None
    made_with = meta.get("tokenizer_fingerprint") if isinstance(meta, dict) else None
    if made_with and made_with != fingerprint:
        raise DataError(
            path,
            None,
            "tokenizer_fingerprint",
            f"corpus made with tokenizer {made_with} ({meta_path}), but the run's tokenizer is "
            f"{fingerprint}; rebuild it with `train_edits prepare-corpora --tokenizer ...`",
        )


def prepare_corpora(
    tokenizer,
    docs: Sequence[str],
    out: str | Path,
    chunk_len: int,
    g_fraction: float = 0.5,
    seed: int = 0,
    inputs: Sequence[str] = (),
    tokenizer_spec: str | None = None,
) -> dict:
    """Split `docs` into G and R, write out/G.jsonl, out/R.jsonl and out/corpora.json; return the meta."""
    out = Path(out)
    sp = split_corpora(tokenizer, docs, chunk_len, g_fraction, seed)
    write_chunks(tokenizer, sp.g, out / "G.jsonl")
    write_chunks(tokenizer, sp.r, out / "R.jsonl")
    meta = corpus_meta(tokenizer, sp, inputs, chunk_len, g_fraction, seed, tokenizer_spec)
    (out / "corpora.json").write_text(json.dumps(meta, indent=1))
    return meta


def read_chunks(
    path: str | Path,
    tokenizer=None,
    limit: int | None = None,
    max_len: int | None = None,
    vocab_size: int | None = None,
) -> list[torch.Tensor]:
    """Read a corpus file into LongTensors (one per chunk); ids must lie in [0, vocab_size)
    (default: the tokenizer's size)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "corpus file not found")
    if vocab_size is None:
        if tokenizer is None:
            raise ValueError("read_chunks: give the tokenizer or vocab_size (ids are checked against it)")
        vocab_size = len(tokenizer)
    out: list[torch.Tensor] = []
    for lineno, rec in iter_jsonl(path):
        if limit is not None and len(out) >= limit:
            break
        if "input_ids" in rec:
            ids = rec["input_ids"]
            if not isinstance(ids, list) or not all(isinstance(x, int) and 0 <= x < vocab_size for x in ids):
                raise DataError(
                    path, lineno, "input_ids", f"expected a list of token ids in the tokenizer's [0, {vocab_size})"
                )
        elif "text" in rec:
            if tokenizer is None:
                raise DataError(path, lineno, "input_ids", "missing (and no tokenizer given to read 'text')")
            ids = encode_text(tokenizer, rec["text"])
        else:
            raise DataError(path, lineno, "input_ids", "missing (need 'input_ids' or 'text')")
        if len(ids) < 2:
            continue
        if max_len is not None and len(ids) > max_len:
            raise DataError(
                path,
                lineno,
                "input_ids",
                f"chunk of {len(ids)} tokens exceeds the Backpack context ({max_len}); "
                f"rebuild the corpus with a smaller --chunk-len",
            )
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


__all__ = [
    "EOS",
    "CorpusSplit",
    "check_corpus_tokenizer",
    "chunk",
    "corpus_fingerprint",
    "read_chunks",
    "read_documents",
    "read_hf_documents",
    "split_corpora",
    "tokenize_documents",
    "write_chunks",
]
