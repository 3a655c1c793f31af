"""One pack-reference grammar: edits_store parses it; the server's request validation uses the same parser."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edits_store import InvalidReferenceError, PackReference, parse_pack_reference
from serve.errors import InvalidRequest
from serve.params import parse_pack_ref

VERSION = "0123456789abcdef" * 2


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("demo", PackReference("demo", None)),
        ("demo-capitals@prod", PackReference("demo-capitals", "prod")),
        (f"demo@{VERSION}", PackReference("demo", VERSION)),
        ("demo@latest", PackReference("demo", "latest")),
        ("a.b_c-1@canary.2", PackReference("a.b_c-1", "canary.2")),
    ],
)
def test_valid_references(ref, expected):
    parsed = parse_pack_reference(ref)
    assert parsed == expected and str(parsed) == ref


def test_selector_kinds():
    assert parse_pack_reference(f"demo@{VERSION}").is_version
    assert parse_pack_reference("demo@prod").is_alias and not parse_pack_reference("demo@prod").is_version
    latest = parse_pack_reference("demo@latest")
    assert not latest.is_alias and not latest.is_version
    assert not parse_pack_reference("demo").is_alias


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "demo-capitals@prod\n",
        "demo\n",
        " demo",
        "demo@",
        "a@b@c",
        "de mo",
        "../etc",
        "demo@1abc",
        "demo@x:y",
        "demo@" + "v" * 65,
        "-demo",
    ],
)
def test_malformed_references_are_refused_by_the_store_and_the_server(ref):
    with pytest.raises(InvalidReferenceError) as store_err:
        parse_pack_reference(ref)
    assert store_err.value.check == "ref_syntax"
    with pytest.raises(InvalidRequest) as served:
        parse_pack_ref(ref, "packs[0].ref")
    assert str(served.value).startswith("packs[0].ref: ")


@given(st.one_of(st.text(max_size=24), st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._@:+-]{0,30}\Z")))
def test_server_accepts_exactly_what_the_store_accepts(ref):
    try:
        expected = parse_pack_reference(ref)
    except InvalidReferenceError:
        expected = None
    try:
        got = parse_pack_ref(ref, "ref")
    except InvalidRequest:
        got = None
    assert got == expected
