"""The shared vocabulary U of a pairing (tokenizer, Backpack, large model).

U = [0, |tokenizer|) is a property of the tokenizer both models share, not a
constant: 50257 for GPT-2's BPE (the Backpack has 50264 rows and GPT-J 50400;
ids >= 50257 are padding in both), 49152 for SmolLM2's. Every score and every
sample lives on U; a model whose output rows do not cover U is refused when
the pairing is loaded, with both sizes named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is not imported to describe a vocabulary
    from transformers import PreTrainedTokenizerBase

# GPT-2's BPE: the vocabulary of the GPT-J + backpack-gpt2 pairing and of the tiny test models.
GPT2_VOCAB_SIZE = 50257
GPT2_EOS_ID = 50256
# The document separator that corpora and canonical examples write literally.
DOC_SEPARATOR = "<|endoftext|>"


@dataclass(frozen=True)
class Vocabulary:
    """U and the special ids every layer needs, derived from one tokenizer."""

    size: int  # |U|: real token ids are [0, size)
    eos_id: int  # generation stops here (the tokenizer's eos token)
    doc_sep_id: int  # what a literal "<|endoftext|>" encodes to (the separator between corpus documents)
    fingerprint: str = ""  # ensemble.tokenizer.tokenizer_fingerprint of the tokenizer

    def __post_init__(self) -> None:
        if self.size < 2:
            raise ValueError(f"vocabulary: size {self.size} < 2")
        for name in ("eos_id", "doc_sep_id"):
            v = getattr(self, name)
            if not 0 <= v < self.size:
                raise ValueError(f"vocabulary: {name} {v} outside [0, {self.size})")

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> Vocabulary:
        from .tokenizer import tokenizer_fingerprint

        size = len(tokenizer)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("tokenizer: no eos token; the server cannot stop generations")
        return cls(
            size=int(size),
            eos_id=int(eos),
            doc_sep_id=doc_separator_id(tokenizer),
            fingerprint=tokenizer_fingerprint(tokenizer),
        )

    @classmethod
    def gpt2(cls) -> Vocabulary:
        """GPT-2's BPE without loading it (its fingerprint is left empty)."""
        return cls(size=GPT2_VOCAB_SIZE, eos_id=GPT2_EOS_ID, doc_sep_id=GPT2_EOS_ID)

    def check_covers(self, name: str, vocab_rows: int) -> None:
        """Refuse a model whose output rows do not cover U, naming both sizes."""
        if vocab_rows < self.size:
            raise ValueError(
                f"{name}: vocabulary has {vocab_rows} rows, fewer than the tokenizer's {self.size} ids "
                f"(shared range [0, {self.size})); the ensemble needs both models to cover it"
            )

    def contains(self, token_id: int) -> bool:
        return 0 <= token_id < self.size


def doc_separator_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id a literal "<|endoftext|>" stands for: the tokenizer's own token of that name
    (GPT-2: 50256, SmolLM2: 0), else its eos token. Cheap (no fingerprint), for per-text use."""
    size = len(tokenizer)
    # A vocabulary lookup, not convert_tokens_to_ids alone: SmolLM2's unk token *is* "<|endoftext|>" (id 0),
    # so "maps to the unk id" cannot tell a missing separator from a present one.
    sep = tokenizer.get_vocab().get(DOC_SEPARATOR)
    if sep is None:
        sep = tokenizer.added_tokens_encoder.get(DOC_SEPARATOR) if hasattr(tokenizer, "added_tokens_encoder") else None
    if sep is None or not 0 <= int(sep) < size:
        sep = tokenizer.eos_token_id
    if sep is None:
        raise ValueError(f"tokenizer: neither a {DOC_SEPARATOR!r} token nor an eos token to separate documents")
    return int(sep)
