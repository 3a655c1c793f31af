"""100 hot swaps (alias flips between two versions) while 16 clients stream:
zero failed requests, and every request's output equals the output of the
pack version it was admitted with (the core's greedy decode)."""
from __future__ import annotations

import threading

import grpc
import pytest

from edits_store.store import open_store
from sensepack_proto import admin_pb, admin_pb_grpc, pb_grpc
from serve.client import build_generate_request
from serve.testing import auth, channel, demo_served, demo_variant, publish_edits, running_server, wait_until

PROMPTS = ["The capital of Mauritius is", "Mauritius is known for", "I flew to Mauritius and",
           "Port Louis, Mauritius, is"]
CLIENTS, SWAPS, NEW = 16, 100, 3


def test_hot_swaps_under_streaming_load(tmp_path):
    served = demo_served()
    store = open_store(str(tmp_path))
    va = publish_edits(store, served, "capitals", demo_variant(served, " Paris"), beta=1.0, alias="prod")
    vb = publish_edits(store, served, "capitals", demo_variant(served, " Tokyo", strength=10.0), beta=0.9)
    tok = served.tokenizer
    ids = {p: tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS}

    with running_server(tmp_path, served, **{"packs.preload": ["capitals@prod"]}) as server:
        refs = {v: server.packs.activate(f"capitals@{v}", activate=False)[0].pack_ref() for v in (va, vb)}
        expected = {v: dict(zip(PROMPTS, served.ensemble.generate_greedy([ids[p] for p in PROMPTS],
                                                                         [[refs[v]]] * len(PROMPTS), NEW)))
                    for v in (va, vb)}
        assert expected[va] != expected[vb]          # the two versions are distinguishable

        ch = channel(server)
        stub = pb_grpc.GenerationServiceStub(ch)
        adm = admin_pb_grpc.PackAdminStub(ch)
        done = threading.Event()
        results, failures = [], []
        lock = threading.Lock()

        def client(k: int):
            i = 0
            while not done.is_set() or i < 2:
                p = PROMPTS[(k + i) % len(PROMPTS)]
                i += 1
                try:
                    msgs = list(stub.GenerateStream(build_generate_request(
                        p, packs=["capitals@prod"], max_new_tokens=NEW, ignore_eos=True, tokens=True)))
                    version = msgs[0].packs[0].version
                    out = [t.id for m in msgs for t in m.tokens]
                    with lock:
                        results.append((p, version, out))
                except Exception as e:  # noqa: BLE001 - every failure is reported
                    with lock:
                        failures.append(repr(e))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        assert wait_until(lambda: len(results) >= CLIENTS, timeout=120)
        swaps = 0
        for i in range(SWAPS):
            target = vb if i % 2 == 0 else va
            n0 = len(results)
            r = adm.SetAlias(admin_pb.SetAliasRequest(name="capitals", alias="prod", version=target), metadata=auth())
            assert r.pack.version == target and r.gate.passed
            swaps += 1
            wait_until(lambda: len(results) > n0, timeout=30)   # let traffic see this version
        done.set()
        for t in threads:
            t.join(timeout=120)

        assert failures == []
        assert swaps == SWAPS
        versions = {v for _, v, _ in results}
        assert versions == {va, vb}
        for p, v, out in results:
            assert out == expected[v][p], (p, v)
        # the last swap won: routes equal the store alias, and nothing stays pinned
        assert store.resolve("capitals@prod") == ("capitals", va)
        assert wait_until(lambda: server.packs.routes()["capitals@prod"].version == va)
        assert wait_until(lambda: all(r.refcount == 0 for r in server.packs.residents()))
        assert server.engine.running == 0


def test_unload_waits_for_running_requests(tmp_path):
    served = demo_served()
    store = open_store(str(tmp_path))
    va = publish_edits(store, served, "capitals", demo_variant(served, " Paris"), beta=1.0, alias="prod")
    tok = served.tokenizer
    prompt = PROMPTS[0]
    with running_server(tmp_path, served, **{"packs.preload": ["capitals@prod"]}) as server:
        ref = server.packs.activate(f"capitals@{va}", activate=False)[0].pack_ref()
        n = 60
        expected = served.ensemble.generate_greedy([tok(prompt, add_special_tokens=False)["input_ids"]], [[ref]], n)[0]
        stub = pb_grpc.GenerationServiceStub(channel(server))
        adm = admin_pb_grpc.PackAdminStub(channel(server))
        call = stub.GenerateStream(build_generate_request(prompt, packs=["capitals@prod"], max_new_tokens=n,
                                                          ignore_eos=True, tokens=True))
        msgs = [next(call), next(call)]
        assert msgs[0].packs[0].version == va
        r = adm.UnloadPack(admin_pb.UnloadPackRequest(ref=f"capitals@{va}"), metadata=auth())
        assert (r.version, r.freed) == (va, False)            # pinned by the running request
        states = {p.version: p.state for p in adm.ListPacks(admin_pb.ListPacksRequest(), metadata=auth()).resident}
        assert states[va] == "unloading"
        assert "capitals@prod" not in server.packs.routes()
        # UnloadPack holds for new requests even while the running one keeps the version in memory
        with pytest.raises(grpc.RpcError) as ei:
            stub.Generate(build_generate_request(prompt, packs=[f"capitals@{va}"], max_new_tokens=1))
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND and "unloaded by an operator" in ei.value.details()
        msgs += list(call)
        assert [t.id for m in msgs for t in m.tokens] == expected   # the swap never touched it
        assert wait_until(lambda: all(p.version != va for p in
                                      adm.ListPacks(admin_pb.ListPacksRequest(), metadata=auth()).resident))
