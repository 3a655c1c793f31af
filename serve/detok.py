"""Incremental detokenisation: the text of a growing token list at O(window)
cost per token instead of decoding the whole output again at every step.

The scheme of vLLM / TGI: keep two offsets into the ids, `prefix` (start of a
short window whose text is known) and `read` (end of the text already
emitted). For a new token,

    new = decode(ids[prefix:]);  old = decode(ids[prefix:read])
    if new is longer than old and does not end in U+FFFD (an incomplete UTF-8
    sequence): emit new[len(old):], then prefix, read = read, len(ids)

Decoding a short window that starts at a token boundary gives the same
characters as decoding everything (byte-level BPE concatenates bytes), so the
emitted pieces concatenate to ``decode(ids)``; `flush()` emits whatever is
held at the end (an unfinished character decodes to U+FFFD, as in a full
decode). With `skip_special_tokens` (the OpenAI front-end's default, as
vLLM's) special tokens decode to nothing, in every window alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # emitted so far (complete characters)
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        # transformers types decode() as str | list[str] (the list is for batched input); one list of ids: str
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)  # type: ignore[return-value]

    def add(self, token_id: int) -> str:
        """Append one token; returns the newly complete text ("" while a character is unfinished)."""
        self.ids.append(token_id)
        old = self._decode(self.ids[self._prefix : self._read])
        new = self._decode(self.ids[self._prefix :])
        if len(new) > len(old) and not new.endswith("\ufffd"):
            piece = new[len(old) :]
            self.text += piece
            self._prefix, self._read = self._read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """The whole text, including a held unfinished tail (as a full decode shows it)."""
        old = self._decode(self.ids[self._prefix : self._read])
        new = self._decode(self.ids[self._prefix :])
        return self.text + new[len(old) :]
