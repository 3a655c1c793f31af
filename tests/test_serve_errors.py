"""Malformed requests get the right status code and a message naming the
field; the server keeps serving. Admin auth. Queue bound."""

from __future__ import annotations

import math

import grpc
import pytest

from edits_store.format import CalibrationEntry, build_pack
from edits_store.store import open_store
from ensemble.tokenizer import tokenizer_fingerprint
from sensepack_proto import admin_pb, admin_pb_grpc, pb, pb_grpc
from sensepack_testing.serve import TOKEN, auth, channel, demo_served, demo_variant, publish_edits, running_server
from serve.client import build_generate_request

C = grpc.StatusCode
LIMIT = 64  # limits.max_prompt_tokens in this module


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    served = demo_served()
    store_dir = tmp_path_factory.mktemp("store")
    store = open_store(str(store_dir))
    version = publish_edits(store, served, "capitals", demo_variant(served, " Paris"), beta=1.0, alias="prod")
    edits = demo_variant(served, " Rome")
    bp = served.ensemble.backpack
    # trained against another Backpack: incompatible
    store.publish(
        build_pack(
            "alien",
            edits.token_ids,
            edits.sense_ids,
            edits.deltas,
            backpack_name="other",
            backpack_fingerprint="sha256:" + "0" * 64,
            tokenizer_fingerprint=tokenizer_fingerprint(served.tokenizer),
            vocab_size=bp.config.vocab_size,
            num_senses=bp.config.num_senses,
            epsilon=0.05,
            calibration=[
                CalibrationEntry(
                    target_model="x",
                    target_fingerprint=served.ensemble.large_fingerprint(),
                    beta=1.0,
                    ball_ratio=1.0,
                    g_fingerprint="g",
                    g_tokens=1,
                    epsilon=0.05,
                )
            ],
        )
    )
    # calibrated for another large model only: no beta for the served one
    store.publish(
        build_pack(
            "uncalibrated",
            edits.token_ids,
            edits.sense_ids,
            edits.deltas,
            backpack_name="demo",
            backpack_fingerprint=bp.fingerprint(),
            tokenizer_fingerprint=tokenizer_fingerprint(served.tokenizer),
            vocab_size=bp.config.vocab_size,
            num_senses=bp.config.num_senses,
            epsilon=0.05,
            calibration=[
                CalibrationEntry(
                    target_model="gpt-j",
                    target_fingerprint="sha256:" + "1" * 64,
                    beta=1.0,
                    ball_ratio=1.0,
                    g_fingerprint="g",
                    g_tokens=1,
                    epsilon=0.05,
                )
            ],
        )
    )
    with running_server(
        store_dir,
        served,
        **{"limits.max_prompt_tokens": LIMIT, "limits.max_new_tokens": 64, "limits.max_packs_per_request": 2},
    ) as server:
        yield {"server": server, "version": version, "ch": channel(server)}


def _set(path, value):
    def f(req):
        obj = req
        parts = path.split(".")
        for p in parts[:-1]:
            obj = getattr(obj, p)
        setattr(obj, parts[-1], value)

    return f


def _packs(*specs):
    def f(req):
        del req.packs[:]
        for s in specs:
            req.packs.add(**s)

    return f


def _ids(ids):
    def f(req):
        req.token_ids.ids[:] = ids

    return f


CASES = [
    # (case id, request mutation, expected code, field named in the message)
    ("no prompt", lambda r: r.ClearField("text"), C.INVALID_ARGUMENT, "input"),
    ("empty prompt", _set("text", ""), C.INVALID_ARGUMENT, "text"),
    ("empty token ids", lambda r: r.token_ids.SetInParent(), C.INVALID_ARGUMENT, "token_ids.ids"),
    ("prompt over the limit (text)", _set("text", "word " * (LIMIT + 10)), C.INVALID_ARGUMENT, "text"),
    ("prompt over the limit (ids)", _ids([11] * (LIMIT + 1)), C.INVALID_ARGUMENT, "token_ids.ids"),
    ("token id beyond the shared vocab", _ids([464, 50257]), C.INVALID_ARGUMENT, "token_ids.ids[1]"),
    ("negative token id", _ids([-3, 464]), C.INVALID_ARGUMENT, "token_ids.ids[0]"),
    ("negative max_new_tokens", _set("stopping.max_new_tokens", -1), C.INVALID_ARGUMENT, "stopping.max_new_tokens"),
    ("absurd max_new_tokens", _set("stopping.max_new_tokens", 10**9), C.INVALID_ARGUMENT, "stopping.max_new_tokens"),
    ("min_new_tokens above max", _set("stopping.min_new_tokens", 10), C.INVALID_ARGUMENT, "stopping.min_new_tokens"),
    ("negative temperature", _set("sampling.temperature", -0.5), C.INVALID_ARGUMENT, "sampling.temperature"),
    ("NaN temperature", _set("sampling.temperature", math.nan), C.INVALID_ARGUMENT, "sampling.temperature"),
    ("absurd temperature", _set("sampling.temperature", 1e9), C.INVALID_ARGUMENT, "sampling.temperature"),
    ("top_p above 1", _set("sampling.top_p", 1.5), C.INVALID_ARGUMENT, "sampling.top_p"),
    ("negative top_k", _set("sampling.top_k", -1), C.INVALID_ARGUMENT, "sampling.top_k"),
    ("negative seed", _set("sampling.seed", -7), C.INVALID_ARGUMENT, "sampling.seed"),
    ("unknown decoding method", _set("sampling.method", 7), C.INVALID_ARGUMENT, "sampling.method"),
    ("absurd top_n_tokens", _set("response.top_n_tokens", 10**6), C.INVALID_ARGUMENT, "response.top_n_tokens"),
    (
        "empty stop sequence",
        lambda r: r.stopping.stop_sequences.append(""),
        C.INVALID_ARGUMENT,
        "stopping.stop_sequences[0]",
    ),
    ("unknown pack", _packs({"ref": "nosuchpack"}), C.NOT_FOUND, "packs[0].ref"),
    ("unknown version", _packs({"ref": "capitals@" + "0123456789abcdef" * 2}), C.NOT_FOUND, "packs[0].ref"),
    ("unknown alias", _packs({"ref": "capitals@canary"}), C.NOT_FOUND, "packs[0].ref"),
    ("malformed pack reference", _packs({"ref": "capitals@@prod"}), C.INVALID_ARGUMENT, "packs[0].ref"),
    ("empty pack reference", _packs({"ref": ""}), C.INVALID_ARGUMENT, "packs[0].ref"),
    ("incompatible pack", _packs({"ref": "alien"}), C.FAILED_PRECONDITION, "packs[0].ref"),
    ("no beta for the served model", _packs({"ref": "uncalibrated"}), C.FAILED_PRECONDITION, "packs[0].ref"),
    ("beta above calibrated", _packs({"ref": "capitals", "beta": 1.5}), C.INVALID_ARGUMENT, "packs[0].beta"),
    ("negative beta", _packs({"ref": "capitals", "beta": -0.1}), C.INVALID_ARGUMENT, "packs[0].beta"),
    ("NaN beta", _packs({"ref": "capitals", "beta": math.nan}), C.INVALID_ARGUMENT, "packs[0].beta"),
    ("same pack twice", _packs({"ref": "capitals"}, {"ref": "capitals@prod"}), C.INVALID_ARGUMENT, "packs[1].ref"),
    ("too many packs", _packs({"ref": "a"}, {"ref": "b"}, {"ref": "c"}), C.INVALID_ARGUMENT, "packs"),
    ("base_only with a pack", _set("base_only", True), C.INVALID_ARGUMENT, "base_only"),
    ("request_id too long", _set("request_id", "x" * 1000), C.INVALID_ARGUMENT, "request_id"),
]


@pytest.mark.parametrize("case,mutate,code,field", CASES, ids=[c[0] for c in CASES])
def test_malformed_generate(env, case, mutate, code, field):
    stub = pb_grpc.GenerationServiceStub(env["ch"])
    req = build_generate_request("The capital of Mauritius is", packs=["capitals"], max_new_tokens=4)
    mutate(req)
    for call in (stub.Generate, lambda r: list(stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as ei:
            call(req)
        assert ei.value.code() == code, ei.value.details()
        assert ei.value.details().startswith(field + ":"), ei.value.details()
    # still serving, and no slot leaked
    ok = stub.Generate(build_generate_request("Hello", packs=["capitals"], max_new_tokens=2))
    assert ok.generated_token_count == 2
    assert env["server"].engine.running == 0


SCORE_CASES = [
    ("no prefix", {}, "prefix"),
    ("no continuation", {"prefix_text": "Hi"}, "continuations"),
    ("empty continuation", {"prefix_text": "Hi", "continuations": [pb.Continuation(text="")]}, "continuations[0].text"),
    (
        "bad continuation id",
        {"prefix_text": "Hi", "continuations": [pb.Continuation(token_ids=pb.TokenIds(ids=[1, 60000]))]},
        "continuations[0].token_ids.ids[1]",
    ),
    (
        "bad prefix id",
        {"prefix_token_ids": pb.TokenIds(ids=[-1]), "continuations": [pb.Continuation(text=" x")]},
        "prefix_token_ids.ids[0]",
    ),
    (
        "unknown pack",
        {"prefix_text": "Hi", "continuations": [pb.Continuation(text=" x")], "packs": [pb.PackSpec(ref="nosuch")]},
        "packs[0].ref",
    ),
]


@pytest.mark.parametrize("case,fields,field", SCORE_CASES, ids=[c[0] for c in SCORE_CASES])
def test_malformed_score(env, case, fields, field):
    stub = pb_grpc.GenerationServiceStub(env["ch"])
    with pytest.raises(grpc.RpcError) as ei:
        stub.Score(pb.ScoreRequest(**fields))
    assert ei.value.code() in (C.INVALID_ARGUMENT, C.NOT_FOUND)
    assert ei.value.details().startswith(field + ":"), ei.value.details()


def test_admin_auth(env):
    adm = admin_pb_grpc.PackAdminStub(env["ch"])
    calls = [
        (adm.ListPacks, admin_pb.ListPacksRequest()),
        (adm.LoadPack, admin_pb.LoadPackRequest(ref="capitals@prod", activate=True)),
        (adm.SetAlias, admin_pb.SetAliasRequest(name="capitals", alias="prod", version=env["version"])),
        (adm.UnloadPack, admin_pb.UnloadPackRequest(ref="capitals")),
        (adm.ABReport, admin_pb.ABReportRequest()),
    ]
    for method, req in calls:
        with pytest.raises(grpc.RpcError) as ei:
            method(req)
        assert ei.value.code() == C.UNAUTHENTICATED
        for bad in (auth("wrong-token"), [("authorization", "Basic abc")]):
            with pytest.raises(grpc.RpcError) as ei:
                method(req, metadata=bad)
            assert ei.value.code() in (C.PERMISSION_DENIED, C.UNAUTHENTICATED)
    with pytest.raises(grpc.RpcError) as ei:
        adm.ListPacks(admin_pb.ListPacksRequest(), metadata=auth("wrong-token"))
    assert ei.value.code() == C.PERMISSION_DENIED
    assert adm.ListPacks(admin_pb.ListPacksRequest(), metadata=auth(TOKEN)).resident
    # refused packs are listed with their reasons (refuse one here: the test must not rely on an earlier one)
    with pytest.raises(grpc.RpcError) as ei:
        adm.LoadPack(admin_pb.LoadPackRequest(ref="alien"), metadata=auth(TOKEN))
    assert ei.value.code() == C.FAILED_PRECONDITION
    refused = adm.ListPacks(admin_pb.ListPacksRequest(), metadata=auth(TOKEN)).refused
    assert any(k.startswith("alien@") and "backpack_fingerprint" in v for k, v in refused.items())


def test_admin_errors_name_fields(env):
    adm = admin_pb_grpc.PackAdminStub(env["ch"])
    for req, code, field in [
        (admin_pb.LoadPackRequest(ref="bad@@ref"), C.INVALID_ARGUMENT, "ref"),
        (admin_pb.LoadPackRequest(ref="nosuch"), C.NOT_FOUND, "ref"),
        (admin_pb.LoadPackRequest(ref="alien"), C.FAILED_PRECONDITION, "ref"),
    ]:
        with pytest.raises(grpc.RpcError) as ei:
            adm.LoadPack(req, metadata=auth())
        assert ei.value.code() == code and ei.value.details().startswith(field + ":"), ei.value.details()
    with pytest.raises(grpc.RpcError) as ei:
        adm.SetAlias(admin_pb.SetAliasRequest(name="capitals", alias="", version=env["version"]), metadata=auth())
    assert ei.value.code() == C.INVALID_ARGUMENT and ei.value.details().startswith("alias:")


def test_queue_full_is_resource_exhausted(tmp_path):
    served = demo_served()
    with running_server(
        tmp_path, served, **{"limits.max_running": 1, "limits.max_waiting": 0, "limits.max_new_tokens": 2000}
    ) as server:
        stub = pb_grpc.GenerationServiceStub(channel(server))
        long = stub.GenerateStream(
            build_generate_request("Hello", base_only=True, max_new_tokens=2000, ignore_eos=True)
        )
        next(long)  # admitted (first message)
        next(long)  # running (first token)
        with pytest.raises(grpc.RpcError) as ei:
            stub.Generate(build_generate_request("Hi", base_only=True, max_new_tokens=2))
        assert ei.value.code() == C.RESOURCE_EXHAUSTED and "limits.max_waiting" in ei.value.details()
        long.cancel()
        from sensepack_testing.serve import wait_until

        assert wait_until(lambda: server.engine.running == 0)
        assert stub.Generate(build_generate_request("Hi", base_only=True, max_new_tokens=2)).generated_token_count == 2
