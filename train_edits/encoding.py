"""Tokenization rules for canonical examples and corpora.

- Prefix and suffix are tokenized **separately** and concatenated; no BOS is
  added; the suffix keeps its leading space (" Kabul" -> ["ĠKab", "ul"]).
- A sequence ``ids`` with suffix tokens at ``[start, start+n)`` is scored at
  positions ``start-1 .. start+n-2`` (position ``p`` predicts ``ids[p+1]``).
- A literal ``<|endoftext|>`` in a text becomes the tokenizer's document
  separator id (``ensemble.vocab.doc_separator_id``: its own ``<|endoftext|>``
  token, else its eos token; 50256 for GPT-2), whatever the tokenizer's
  special-token configuration.
- Sequences longer than the model's context are cut from the left of the
  prefix (the suffix is kept whole when it fits; otherwise its end is cut);
  callers count these in ``truncated``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ensemble.vocab import DOC_SEPARATOR, doc_separator_id

from .tasks import DataError, Example, PairExample, SingleExample, TextExample

EOS = DOC_SEPARATOR
# Right padding is never attended by real positions, so any id in U will do; 0 is in every vocabulary.
PAD_ID = 0


def encode_text(tokenizer, text: str) -> list[int]:
    """Tokenize ``text`` without BOS; a literal ``<|endoftext|>`` maps to the document separator id."""
    parts = text.split(EOS)
    ids: list[int] = []
    sep = doc_separator_id(tokenizer) if len(parts) > 1 else None
    for i, part in enumerate(parts):
        if i > 0:
            assert sep is not None  # set above whenever there is more than one part
            ids.append(sep)
        if part:
            ids.extend(tokenizer.encode(part, add_special_tokens=False))
    return ids


@dataclass(frozen=True)
class Scored:
    """One sequence with a scored span: tokens ``ids[start:start+n]`` are scored."""

    ids: tuple[int, ...]
    start: int
    n: int
    truncated: bool = False

    @property
    def positions(self) -> list[int]:
        """Positions whose next-token prediction is scored."""
        return list(range(self.start - 1, self.start + self.n - 1))

    @property
    def targets(self) -> list[int]:
        return list(self.ids[self.start : self.start + self.n])


def encode_prefix_suffix(tokenizer, prefix: str, suffix: str, max_len: int | None = None, where: str = "") -> Scored:
    p = encode_text(tokenizer, prefix)
    s = encode_text(tokenizer, suffix)
    if not p:
        raise DataError(
            where or "<example>",
            None,
            "prefix",
            "empty prefix: the first suffix token cannot be scored (no BOS is added)",
        )
    if not s:
        raise DataError(where or "<example>", None, "suffix", "suffix encodes to no tokens")
    truncated = False
    if max_len is not None and len(p) + len(s) > max_len:
        truncated = True
        if len(s) >= max_len:
            s = s[: max_len - 1]
            p = p[-1:]
        else:
            p = p[-(max_len - len(s)) :]
    return Scored(tuple(p + s), len(p), len(s), truncated)


def encode_whole(tokenizer, text: str, max_len: int | None = None) -> Scored | None:
    """Unconditional text: every token but the first is scored. None if < 2 tokens."""
    ids = encode_text(tokenizer, text)
    truncated = False
    if max_len is not None and len(ids) > max_len:
        ids, truncated = ids[:max_len], True
    if len(ids) < 2:
        return None
    return Scored(tuple(ids), 1, len(ids) - 1, truncated)


@dataclass(frozen=True)
class EncodedExample:
    """An example as one (single/text) or two (pair) scored sequences."""

    seqs: tuple[Scored, ...]
    line: int = 0


def encode_example(tokenizer, ex: Example, max_len: int | None = None, path: str = "") -> EncodedExample | None:
    where = f"{path}:{ex.line}" if path else f"line {ex.line}"
    if isinstance(ex, SingleExample):
        return EncodedExample((encode_prefix_suffix(tokenizer, ex.prefix, ex.suffix, max_len, where),), ex.line)
    if isinstance(ex, PairExample):
        return EncodedExample(
            (
                encode_prefix_suffix(tokenizer, ex.prefix, ex.suffix1, max_len, where),
                encode_prefix_suffix(tokenizer, ex.prefix, ex.suffix2, max_len, where),
            ),
            ex.line,
        )
    if isinstance(ex, TextExample):
        s = encode_whole(tokenizer, ex.text, max_len)
        return None if s is None else EncodedExample((s,), ex.line)
    raise TypeError(type(ex))


def pad_batch(seqs: list[Scored], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (b, s), targets (b, s) and a float mask (b, s) of scored positions.

    Right padding is safe for causal models: real positions never attend to pads.
    """
    s = max(len(x.ids) for x in seqs)
    ids = torch.full((len(seqs), s), pad_id, dtype=torch.long)
    tgt = torch.zeros((len(seqs), s), dtype=torch.long)
    mask = torch.zeros((len(seqs), s), dtype=torch.float32)
    for i, x in enumerate(seqs):
        ids[i, : len(x.ids)] = torch.tensor(x.ids)
        pos = torch.tensor(x.positions)
        tgt[i, pos] = torch.tensor(x.targets)
        mask[i, pos] = 1.0
    return ids, tgt, mask
