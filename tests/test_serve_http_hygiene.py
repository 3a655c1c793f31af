"""HTTP connection hygiene against a live server on 127.0.0.1: clients that trickle their headers or bodies
are cut off by the timeouts, connections past http.max_connections are closed at once, and a client that
hangs up mid-body is counted as a disconnect, not as a server error; meanwhile normal requests are served."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import urllib.request

import pytest

from sensepack_testing.serve import demo_served, metric, parse_metrics, running_server, scrape

HEADER_S, BODY_S, MAX_CONN = 1.0, 1.0, 12


@pytest.fixture(scope="module")
def server():
    overrides = {
        "http.enabled": True,
        "http.port": 0,
        "http.served_model_name": "demo",
        "http.header_timeout_s": HEADER_S,
        "http.body_timeout_s": BODY_S,
        "http.max_connections": MAX_CONN,
    }
    with running_server(None, demo_served(), **overrides) as s:
        yield s


def _connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes `sock` (recv gives b"" or a reset) within `seconds`."""
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _ok(server) -> bool:
    body = json.dumps({"model": "demo", "prompt": "hi", "max_tokens": 1}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}/v1/completions", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status == 200


def _cuts(server, reason: str) -> float:
    return metric(parse_metrics(scrape(server)), "sensepack_http_connections_cut_total", reason=reason)


def test_slow_headers_are_cut_off_and_others_are_served(server):
    before = _cuts(server, "header_timeout")
    slow = [_connect(server) for _ in range(4)]
    t0 = time.monotonic()
    for s in slow:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    for _ in range(3):  # one header byte at a time, never finishing
        time.sleep(0.2)
        for s in slow:
            with contextlib.suppress(OSError):
                s.sendall(b"X")
    assert _ok(server)  # the trickle holds nobody up
    assert all(_closed_within(s, HEADER_S + 3) for s in slow)
    assert time.monotonic() - t0 < HEADER_S + 4
    assert _cuts(server, "header_timeout") - before >= 4
    for s in slow:
        s.close()


def test_slow_body_gets_408_naming_the_body(server):
    before = _cuts(server, "body_timeout")
    s = _connect(server)
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n"
        b'{"model": "demo",'
    )
    s.settimeout(BODY_S + 5)
    raw = b""
    while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
        chunk = s.recv(65536)
        if not chunk:
            break
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), head
    err = json.loads(body)["error"]
    assert err["param"] == "body" and "http.body_timeout_s" in err["message"]
    assert _closed_within(s, 5)
    s.close()
    assert _cuts(server, "body_timeout") - before == 1
    assert _ok(server)


def test_connections_past_the_cap_are_closed_at_once(server):
    before = _cuts(server, "over_limit")
    held = [_connect(server) for _ in range(MAX_CONN)]
    time.sleep(0.2)  # the server has accepted them all
    extra = _connect(server)
    assert _closed_within(extra, 0.9)  # before any header timeout could have closed it
    assert _cuts(server, "over_limit") - before >= 1
    for s in held + [extra]:
        s.close()
    deadline = time.monotonic() + 10
    while True:  # the freed slots serve again
        try:
            assert _ok(server)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_client_that_hangs_up_mid_body_is_a_disconnect_not_a_server_error(server):
    m0 = parse_metrics(scrape(server))
    s = _connect(server)
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n"
        b'{"model": "demo", "prompt": "'
    )
    time.sleep(0.2)
    s.close()
    deadline = time.monotonic() + 10
    while _cuts(server, "disconnect") == metric(m0, "sensepack_http_connections_cut_total", reason="disconnect"):
        assert time.monotonic() < deadline, "the disconnect was never counted"
        time.sleep(0.1)
    m = parse_metrics(scrape(server))
    internal = "sensepack_requests_total"
    assert metric(m, internal, method="completions", status="INTERNAL", frontend="http") == metric(
        m0, internal, method="completions", status="INTERNAL", frontend="http"
    )
    assert _ok(server)
