"""Property: whatever JSON body a client posts to /v1/completions or /v1/chat/completions, the HTTP
front-end answers 200 or a 4xx/503 in OpenAI's error shape whose message starts with the field it names
(never a 500), streams end with `[DONE]`, and the server keeps serving. Random bodies against a live
server; few, small, derandomized examples so the run is bounded and repeatable."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_PORT: dict = {}
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


SERVER_CONFIG = {
    "http.enabled": True,
    "http.port": 0,
    "http.served_model_name": "demo",
    "http.chat_template": TEMPLATE,
    "http.max_choices": 4,
    "limits.max_prompt_tokens": 48,
    "limits.max_new_tokens": 6,
    "limits.default_max_new_tokens": 4,
}


@pytest.fixture(scope="module", autouse=True)
def _port(server):
    _PORT["port"] = server.http_port
    yield
    _PORT.clear()


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8
)
PLAUSIBLE = {
    "model": st.sampled_from(["demo", "capitals@prod", "capitals", "nope", "capitals@prod,capitals", "", "a@b@c"]),
    "prompt": st.one_of(
        st.text(max_size=40),
        st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010), max_size=6),  # lone surrogates too
        st.lists(st.integers(-5, 50300), max_size=20),
        st.lists(st.text(max_size=10), max_size=3),
        st.just([[1, 2], [3]]),
    ),
    "messages": st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "system", "assistant", "x"]),
                "content": st.one_of(st.text(max_size=20), json_values),
            }
        ),
        max_size=3,
    ),
    "max_tokens": st.integers(-2, 10),
    "n": st.integers(-1, 6),
    "temperature": scalars,
    "top_p": scalars,
    "stream": st.booleans(),
    "logprobs": st.one_of(st.booleans(), st.integers(-1, 30)),
    "top_logprobs": st.integers(-1, 30),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4))),
    "seed": st.integers(-(2**65), 2**65),
    "logit_bias": st.dictionaries(st.text(max_size=6), scalars, max_size=3),
    "packs": st.lists(
        st.one_of(
            st.sampled_from(["capitals@prod", "nope", "", "capitals@@x"]),
            st.fixed_dictionaries({"ref": st.text(max_size=10), "beta": scalars}),
        ),
        max_size=3,
    ),
    "base_only": st.booleans(),
    "stream_options": st.one_of(json_values, st.just({"include_usage": True})),
    "top_k": st.integers(-2, 60000),
    "presence_penalty": scalars,
    "min_tokens": st.integers(-2, 10),
    "stop_token_ids": st.lists(st.integers(-2, 60000), max_size=3),
    "ignore_eos": st.booleans(),
}


@st.composite
def bodies(draw, chat: bool):
    required = ["model", "messages" if chat else "prompt"]
    other = "prompt" if chat else "messages"
    keys = draw(st.lists(st.sampled_from(sorted(PLAUSIBLE)), max_size=6, unique=True))
    if draw(st.integers(0, 4)):  # mostly a request that has the endpoint's fields and only those
        keys = required + [k for k in keys if k not in required and k != other]
    body = {k: draw(PLAUSIBLE[k]) for k in keys}
    if not draw(st.integers(0, 5)):
        body[draw(st.text(max_size=8))] = draw(json_values)
    return body


def _post(path: str, body) -> tuple[int, bytes]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{_PORT['port']}{path}", data=data, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _check_error(err: dict) -> None:
    assert set(err) == {"message", "type", "param", "code"}, err
    if err["param"]:
        assert err["message"].startswith(err["param"] + ":"), err


CODES: list[int] = []


def _check(path: str, body) -> None:
    code, raw = _post(path, body)
    CODES.append(code)
    assert code < 500 or code == 503, (code, raw[:500])
    if code != 200:
        _check_error(json.loads(raw)["error"])
    elif raw.startswith(b"data:"):
        events = [line[len(b"data: ") :] for line in raw.split(b"\n") if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        for ev in events[:-1]:
            obj = json.loads(ev)
            if "error" in obj:
                _check_error(obj["error"])
    else:
        out = json.loads(raw)
        assert out["choices"] and all(math.isfinite(out["usage"][k]) for k in out["usage"])
    assert _post("/v1/completions", {"model": "demo", "prompt": "ok", "max_tokens": 1})[0] == 200  # still serving


_settings = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@_settings
@given(bodies(chat=False))
def test_completions_never_500(body):
    _check("/v1/completions", body)


@_settings
@given(bodies(chat=True))
def test_chat_never_500(body):
    _check("/v1/chat/completions", body)


def test_the_examples_reached_generation():
    """The properties above are only worth something if some random bodies were served (200)."""
    assert CODES.count(200) >= 5 and len(set(CODES)) >= 3, sorted(set(CODES))


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"model": "demo", "prompt": "x"'])
def test_malformed_bodies_are_400(raw):
    req = urllib.request.Request(
        f"http://127.0.0.1:{_PORT['port']}/v1/completions", data=raw, headers={"content-type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, timeout=30)
    assert ei.value.code == 400 and json.loads(ei.value.read())["error"]["param"] == "body"
