"""Vocabulary alignment between the Backpack, the large model and the GPT-2 tokenizer.

GPT-2's BPE has 50257 ids. The Backpack's embedding has 50264 rows and GPT-J's
50400; ids >= 50257 are padding rows in both, so every score and every sample
lives on the shared range U = [0, 50257).
"""

SHARED_VOCAB = 50257
EOS_TOKEN_ID = 50256


def check_vocab_covers(name: str, vocab_rows: int) -> None:
    """Refuse a model whose output rows do not cover the shared vocabulary."""
    if vocab_rows < SHARED_VOCAB:
        raise ValueError(
            f"{name}: vocabulary has {vocab_rows} rows, fewer than the shared GPT-2 range "
            f"[0, {SHARED_VOCAB}); the ensemble needs both models to cover it"
        )
