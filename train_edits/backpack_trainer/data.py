"""The corpus as token blocks: documents read, split by document into train and held-out, tokenized,
packed into blocks; the order train blocks are visited in (see the package docstring, "Data")."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ensemble.vocab import DOC_SEPARATOR, Vocabulary

from ..corpora import read_documents
from ..tasks import DataError
from .config import BackpackTrainConfig

# ---------------------------------------------------------------------------------------------- data


def read_hf_corpus(
    name: str, split: str, text_field: str, config: str | None, limit: int | None
) -> Iterator[str]:  # pragma: no cover - needs network and `datasets`
    """Stream documents of a Hugging Face dataset (not runnable offline; kept minimal)."""
    try:
        import datasets  # type: ignore
    except ImportError as exc:
        raise RuntimeError("hf_dataset needs the 'datasets' package (pip install datasets)") from exc
    for i, rec in enumerate(datasets.load_dataset(name, config, split=split, streaming=True)):
        if limit is not None and i >= limit:
            break
        yield rec[text_field]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def tensor_sha256(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def pack_blocks(tokenizer, docs: list[str], sep_id: int, block_len: int) -> tuple[torch.Tensor, int]:
    """[sep, doc0..., sep, doc1..., ...] cut into (n, block_len) int32 blocks; also the stream length."""
    bodies = [d[len(DOC_SEPARATOR) :] if d.startswith(DOC_SEPARATOR) else d for d in docs]
    stream: list[int] = []
    for ids in tokenizer(bodies, add_special_tokens=False, verbose=False)["input_ids"] if bodies else []:
        stream.append(sep_id)
        stream.extend(ids)
    n = len(stream) // block_len
    return torch.tensor(stream[: n * block_len], dtype=torch.int32).view(n, block_len), len(stream)


@dataclass
class CorpusData:
    train: torch.Tensor  # (n_train, block_len) int32
    heldout: torch.Tensor  # (n_heldout, block_len) int32, all held-out blocks
    meta: dict  # sources, document/token counts, fingerprints

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]


def prepare_corpus(cfg: BackpackTrainConfig, tokenizer, vocab: Vocabulary) -> CorpusData:
    """Read, split by document, tokenize and pack (see the module docstring)."""
    if cfg.hf_dataset:
        docs = list(read_hf_corpus(cfg.hf_dataset, cfg.hf_split, cfg.text_field, cfg.hf_config, cfg.hf_limit))
        sources = [
            {"hf_dataset": cfg.hf_dataset, "config": cfg.hf_config, "split": cfg.hf_split, "limit": cfg.hf_limit}
        ]
    else:
        docs = read_documents(cfg.inputs, cfg.text_field)
        sources = [{"file": str(p), "sha256": file_sha256(p)} for p in cfg.inputs]
    where = cfg.hf_dataset or ", ".join(cfg.inputs)  # validated: one or the other
    if len(docs) < 2:
        raise DataError(
            where,
            None,
            None,
            f"{len(docs)} document(s): need at least two to split into train and held-out",
        )
    order = list(range(len(docs)))
    random.Random(cfg.seed).shuffle(order)
    n_held = min(max(1, round(len(docs) * cfg.heldout_fraction)), len(docs) - 1)
    heldout, n_held_tok = pack_blocks(tokenizer, [docs[i] for i in order[:n_held]], vocab.doc_sep_id, cfg.block)
    train, n_train_tok = pack_blocks(tokenizer, [docs[i] for i in order[n_held:]], vocab.doc_sep_id, cfg.block)
    if len(heldout) == 0:
        raise DataError(
            where,
            None,
            None,
            f"held-out split has {n_held_tok} tokens, fewer than one block of "
            f"{cfg.block}: raise heldout_fraction or lower block_len",
        )
    if len(train) == 0:
        raise DataError(where, None, None, f"train split has {n_train_tok} tokens, fewer than one block of {cfg.block}")
    meta = {
        "sources": sources,
        "documents": len(docs),
        "train_documents": len(docs) - n_held,
        "heldout_documents": n_held,
        "train_tokens": n_train_tok,
        "heldout_tokens": n_held_tok,
        "train_blocks": len(train),
        "heldout_blocks": len(heldout),
        "fingerprint": tensor_sha256(train, heldout),
    }
    return CorpusData(train, heldout, meta)


class BlockOrder:
    """Global sample g -> train block: epoch g // n visits the blocks in a seeded permutation."""

    def __init__(self, n_blocks: int, seed: int):
        self.n, self.seed = n_blocks, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            gen = torch.Generator().manual_seed(self.seed + 7919 * (epoch + 1))
            self._perms[epoch] = torch.randperm(self.n, generator=gen)
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        return torch.stack([self._perm(g // self.n)[g % self.n] for g in range(start, start + count)])


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
