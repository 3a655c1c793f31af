"""The incremental detokeniser against a full decode of the same ids."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sensepack_testing.serve import demo_served
from serve.detok import IncrementalDetokenizer

TOK = demo_served().tokenizer
# whole words, single bytes of multi-byte characters (GPT-2 byte tokens 128..255 map to ids < 256),
# emoji and CJK split over several tokens, EOS
POOL = sorted(
    {
        *TOK("Hello world, Mauritius! 東京 😀 café naïve", add_special_tokens=False)["input_ids"],
        *range(0, 256),
        50256,
        220,
        198,
    }
)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(st.lists(st.one_of(st.sampled_from(POOL), st.integers(0, 50256)), max_size=40))
def test_incremental_text_equals_full_decode(ids):
    d = IncrementalDetokenizer(TOK)
    pieces = []
    for k, t in enumerate(ids):
        pieces.append(d.add(t))
        full = TOK.decode(ids[: k + 1])
        assert "".join(pieces) == d.text and full.startswith(d.text)
    assert d.flush() == TOK.decode(ids)


def test_split_character_is_held_until_complete():
    ids = TOK("😀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    d = IncrementalDetokenizer(TOK)
    assert [d.add(t) for t in ids] == [""] * (len(ids) - 1) + ["😀"]
