"""Property: whatever Generate / Score / Tokenize request a client sends, the
server answers OK or an error that names its field (never INTERNAL or
UNKNOWN), and keeps serving. Random requests against a live server; the
examples are few, small and derandomized so the run is bounded and repeatable."""

from __future__ import annotations

import re

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensepack_proto import pb, pb_grpc
from sensepack_testing.serve import channel

# "sampling.top_p: ...", "packs[0].ref: ...", "token_ids.ids[3]: ...", "request: ..."
FIELD = re.compile(r"^[a-z_]+(\[\d+\])?(\.[a-z_]+(\[\d+\])?)*: ")
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

_SERVER: dict = {}


SERVER_CONFIG = {
    "limits.max_prompt_tokens": 48,
    "limits.max_new_tokens": 6,
    "limits.default_max_new_tokens": 4,
    "limits.max_continuations": 4,
}


@pytest.fixture(scope="module", autouse=True)
def _stub(server):
    _SERVER["stub"] = pb_grpc.GenerationServiceStub(channel(server))
    yield
    _SERVER.clear()


floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1e-39, 5e-324, 1e-7, 0.5, 1.0, 2.0, 100.0, 101.0, -1e-39, 1e300]),
)
ints32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-3, 70))
texts = st.one_of(st.text(max_size=60), st.sampled_from(["", "Hello Mauritius", "\x00", "\ud7ff\ue000", "a" * 500]))
token_ids = st.lists(st.one_of(st.integers(-5, 50262), st.integers(-(2**62), 2**62)), max_size=60)
refs = st.one_of(
    st.sampled_from(
        ["capitals", "capitals@prod", "capitals@nope", "nope", "capitals@prod\n", "", "a@b@c", "capitals@" + "v" * 200]
    ),
    st.text(max_size=20),
)
packs = st.lists(
    st.builds(
        lambda r, b: pb.PackSpec(ref=r, beta=b) if b is not None else pb.PackSpec(ref=r),
        refs,
        st.one_of(st.none(), floats),
    ),
    max_size=3,
)


@st.composite
def generate_requests(draw):
    req = pb.GenerateRequest(
        request_id=draw(st.text(max_size=8)), base_only=draw(st.booleans()), ab_key=draw(st.text(max_size=8))
    )
    if draw(st.booleans()):
        req.text = draw(texts)
    elif draw(st.booleans()):
        req.token_ids.ids.extend(draw(token_ids))
    req.packs.extend(draw(packs))
    s = req.sampling
    s.method = draw(st.sampled_from([0, 1, 1, 7]))
    s.temperature, s.top_k, s.top_p = draw(floats), draw(ints32), draw(floats)
    if draw(st.booleans()):
        s.seed = draw(st.integers(-(2**63), 2**63 - 1))
    t = req.stopping
    t.max_new_tokens, t.min_new_tokens = draw(ints32), draw(ints32)
    t.stop_sequences.extend(draw(st.lists(st.text(max_size=5), max_size=3)))
    t.ignore_eos, t.include_stop_sequence = draw(st.booleans()), draw(st.booleans())
    r = req.response
    r.generated_tokens, r.token_logprobs, r.input_tokens = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    r.top_n_tokens = draw(ints32)
    return req


@st.composite
def score_requests(draw):
    req = pb.ScoreRequest(include_base=draw(st.booleans()))
    if draw(st.booleans()):
        req.prefix_text = draw(texts)
    elif draw(st.booleans()):
        req.prefix_token_ids.ids.extend(draw(token_ids))
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["text", "ids", "none"]))
        c = req.continuations.add()
        if kind == "text":
            c.text = draw(texts)
        elif kind == "ids":
            c.token_ids.ids.extend(draw(token_ids))
    req.packs.extend(draw(packs))
    return req


def _check(call):
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() not in NEVER, e.details()
        assert FIELD.match(e.details() or ""), (e.code(), e.details())
    # still serving
    assert _SERVER["stub"].Tokenize(pb.TokenizeRequest(text="ok"), timeout=30).token_count == 1


_settings = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@_settings
@given(generate_requests(), st.booleans())
def test_generate_never_internal(req, stream):
    stub = _SERVER["stub"]
    _check(lambda: list(stub.GenerateStream(req, timeout=60)) if stream else stub.Generate(req, timeout=60))


@_settings
@given(score_requests())
def test_score_never_internal(req):
    _check(lambda: _SERVER["stub"].Score(req, timeout=60))


@_settings
@given(texts, st.booleans())
def test_tokenize_never_internal(text, tokens):
    _check(lambda: _SERVER["stub"].Tokenize(pb.TokenizeRequest(text=text, return_tokens=tokens), timeout=30))
