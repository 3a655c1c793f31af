"""Ball checks through the serving path: the activation gate refuses a pack
that leaves the ball (with its measured ratio) while the previous version
keeps serving; a planted live breach is detected and the pack deactivated."""

from __future__ import annotations

import re

import grpc
import pytest
import torch

from edits_store.store import open_store
from ensemble.edits import PackRef, SenseEdits
from sensepack_proto import admin_pb, admin_pb_grpc, pb_grpc
from sensepack_testing.serve import (
    auth,
    channel,
    demo_served,
    demo_variant,
    metric,
    parse_metrics,
    publish_edits,
    running_server,
    scrape,
    wait_until,
)
from serve.abtest import ratio_ci
from serve.client import Client, build_generate_request
from serve.scoring import paired_nll

EPS = 0.01


def _edits_on(served, words: list[str], strength: float, seed: int) -> SenseEdits:
    """Strong deltas on every sense of the given tokens, in a random direction: general text gets less likely."""
    tok, bp = served.tokenizer, served.ensemble.backpack
    ids = sorted({i for w in words for i in tok(w, add_special_tokens=False)["input_ids"]})
    k, d = bp.config.num_senses, bp.config.n_embd
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=g)
    direction = direction / direction.norm() * strength
    token_ids = torch.tensor([t for t in ids for _ in range(k)])
    sense_ids = torch.tensor([s for _ in ids for s in range(k)])
    return SenseEdits(token_ids, sense_ids, direction.expand(len(token_ids), d).clone())


def test_ratio_ci_and_sticky_arms():
    r, lo, hi = ratio_ci([10.0, 12.0, 8.0, 11.0], [10.5, 12.2, 8.6, 11.4], 0.95)
    assert r == pytest.approx(42.7 / 41.0) and lo < r < hi
    r, lo, hi = ratio_ci([10.0] * 5, [11.0] * 5, 0.95)  # no spread: a point
    assert r == pytest.approx(1.1) and lo == pytest.approx(1.1) and hi == pytest.approx(1.1)
    from serve.abtest import LiveMonitor
    from serve.config import ABConfig

    mon = LiveMonitor(ABConfig(traffic_share=0.5, control_share=0.5), None, None)
    arms = [mon.assign("p", f"user-{i}") for i in range(2000)]
    assert arms == [mon.assign("p", f"user-{i}") for i in range(2000)]  # sticky
    in_exp = [a for a in arms if a[1]]
    assert 0.4 < len(in_exp) / 2000 < 0.6
    assert 0.4 < sum(a[0] == "base" for a in in_exp) / len(in_exp) < 0.6
    assert all(a == ("pack", False) for a in arms if not a[1])


@pytest.mark.parametrize("n,scale", [(1, 1.0), (2, 1.0), (7, 1.0), (500, 100.0), (5000, 1e4)])
def test_streaming_moments_equal_the_batch_formula(n, scale):
    """The monitor's O(1)-per-sample statistics give the batch delta-method interval of ratio_ci."""
    import random

    from serve.abtest import PairedMoments

    rng = random.Random(n)
    a = [scale * (10 + rng.random()) for _ in range(n)]
    b = [x * (1.02 + 0.05 * rng.gauss(0, 1)) for x in a]
    m = PairedMoments()
    for x, y in zip(a, b, strict=True):
        m.add(x, y)
    assert m.n == n
    for got, want in zip(m.ratio_ci(0.95), ratio_ci(a, b, 0.95), strict=True):
        assert got == pytest.approx(want, rel=1e-9)
    assert PairedMoments().ratio_ci(0.95)[0] != PairedMoments().ratio_ci(0.95)[0]  # nan without samples


def test_gate_refuses_pack_that_leaves_the_ball(tmp_path):
    served = demo_served()
    store = open_store(str(tmp_path))
    good = publish_edits(store, served, "capitals", demo_variant(served, " Paris"), beta=1.0, epsilon=EPS, alias="prod")
    common = [" the", ",", ".", " and", " of", " to", " a", " in"]
    bad = publish_edits(store, served, "capitals", _edits_on(served, common, 40.0, 0), beta=1.0, epsilon=EPS)
    bad2 = publish_edits(store, served, "capitals", _edits_on(served, common, 30.0, 1), beta=1.0, epsilon=EPS)
    with running_server(tmp_path, served, **{"packs.preload": ["capitals@prod"]}) as server:
        ch = channel(server)
        adm = admin_pb_grpc.PackAdminStub(ch)
        c = Client(f"127.0.0.1:{server.port}")
        assert server.packs.routes()["capitals@prod"].gate.passed
        # admin hot swap to the bad version: refused with its ratio, nothing moves
        with pytest.raises(grpc.RpcError) as ei:
            adm.SetAlias(admin_pb.SetAliasRequest(name="capitals", alias="prod", version=bad), metadata=auth())
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        m = re.search(r"ratio ([0-9.]+) > 1\+epsilon", ei.value.details())
        assert m, ei.value.details()
        ratio = float(m.group(1))
        assert ratio > 1 + EPS
        # independent check of the measured ratio with the core's scoring over the same corpus
        loaded = store.load(f"capitals@{bad}")
        edits = SenseEdits(loaded.token_ids, loaded.sense_ids, loaded.deltas)
        rows = server.gate.rows
        pk = PackRef("capitals", bad, edits, 1.0)
        base = served.ensemble.score([r[:1] for r in rows], [r[1:] for r in rows], [[] for _ in rows])
        packed = served.ensemble.score([r[:1] for r in rows], [r[1:] for r in rows], [[pk] for _ in rows])
        core_ratio = sum(float(x.double().sum()) for x in packed) / sum(float(x.double().sum()) for x in base)
        assert core_ratio == pytest.approx(ratio, rel=1e-5)
        a, b = paired_nll(served.ensemble, rows, pk)
        # the one-pass paired scorer equals the core's scoring
        for i, (x, y) in enumerate(zip(base, packed, strict=True)):
            assert a[i] == pytest.approx(-float(x.double().sum()), rel=1e-5)
            assert b[i] == pytest.approx(-float(y.double().sum()), rel=1e-5)
        samples = parse_metrics(scrape(server))
        assert metric(samples, "sensepack_gate_ball_ratio", pack="capitals", version=bad) == pytest.approx(
            ratio, rel=1e-5
        )
        assert metric(samples, "sensepack_pack_loads_total", result="refused_gate") >= 1
        assert store.resolve("capitals@prod") == ("capitals", good)
        listed = adm.ListPacks(admin_pb.ListPacksRequest(), metadata=auth())
        assert f"capitals@{bad}" in listed.refused and "ball gate" in listed.refused[f"capitals@{bad}"]
        # the store moves the alias itself (e.g. another operator): the notification is gated too
        store.set_alias("capitals", "prod", bad2)
        assert wait_until(lambda: f"capitals@{bad2}" in server.packs.refused(), timeout=60)
        r = c.generate("The capital of Mauritius is", packs=["capitals@prod"], max_new_tokens=3)
        assert r.packs[0].version == good
        # and a good new version does go through the notification path
        good2 = publish_edits(store, served, "capitals", demo_variant(served, " Rome"), beta=1.0, epsilon=EPS)
        store.set_alias("capitals", "prod", good2)
        assert wait_until(lambda: server.packs.routes()["capitals@prod"].version == good2, timeout=60)
        r = c.generate("The capital of Mauritius is", packs=["capitals@prod"], max_new_tokens=3)
        assert r.packs[0].version == good2
        # a removed alias drops its route: requests naming it are NOT_FOUND, the plain name keeps serving
        store.remove_alias("capitals", "prod")
        assert wait_until(lambda: "capitals@prod" not in server.packs.routes(), timeout=60)
        with pytest.raises(grpc.RpcError) as ei:
            c.generate("The capital of Mauritius is", packs=["capitals@prod"], max_new_tokens=3)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND and ei.value.details().startswith("packs[0].ref:")
        assert c.generate("Mauritius", packs=["capitals"], max_new_tokens=2).packs[0].version == good2


def test_live_breach_detected_and_pack_deactivated(tmp_path):
    served = demo_served()
    store = open_store(str(tmp_path))
    good = publish_edits(store, served, "capitals", demo_variant(served, " Paris"), beta=1.0, epsilon=EPS, alias="prod")
    # passes the gate (no trigger token in G: ratio exactly 1) but wrecks text after " Mauritius"
    planted = publish_edits(
        store, served, "capitals", _edits_on(served, [" Mauritius"], 60.0, 3), beta=1.0, epsilon=EPS
    )
    cfg = {
        "packs.preload": ["capitals@prod"],
        "ab.traffic_share": 1.0,
        "ab.control_share": 0.5,
        "ab.sample_rate": 1.0,
        "ab.min_samples": 8,
        "ab.auto_disable": True,
    }
    with running_server(tmp_path, served, **cfg) as server:
        ch = channel(server)
        adm = admin_pb_grpc.PackAdminStub(ch)
        stub = pb_grpc.GenerationServiceStub(ch)
        r = adm.SetAlias(admin_pb.SetAliasRequest(name="capitals", alias="prod", version=planted), metadata=auth())
        assert r.gate.passed and r.gate.ratio == pytest.approx(1.0)
        arms = set()
        for i in range(24):
            req = build_generate_request(
                "We spent two weeks in Mauritius and the beaches were beautiful and warm",
                packs=["capitals@prod"],
                max_new_tokens=2,
                ab_key=f"user-{i}",
            )
            out = stub.Generate(req)
            arms.add(out.packs[0].arm)
            if out.packs[0].version != planted:
                break  # already disabled
        assert "base" in arms  # the control arm was served by the base model
        # every finished request queued its sample before its reply left (on_finish runs before the finish
        # event): waiting for the monitor's pending count to reach 0 waits for a state, not for a time
        assert server.monitor.flush(timeout=600)
        report = adm.ABReport(admin_pb.ABReportRequest(name="capitals"), metadata=auth()).packs
        (rep,) = [p for p in report if p.version == planted]
        assert rep.breached and rep.disabled and rep.samples >= 8
        assert rep.ci_lower > 1 + EPS and rep.ci_lower <= rep.ratio <= rep.ci_upper
        samples = parse_metrics(scrape(server))
        assert metric(samples, "sensepack_ab_breaches_total", pack="capitals") == 1
        assert metric(samples, "sensepack_pack_auto_disables_total", pack="capitals") == 1
        assert metric(samples, "sensepack_ab_samples_total", pack="capitals") >= 8
        # one gauge series per (pack, version) with a live record: the planted one, and the fallback serving
        # now if it was sampled (the interval gauges exist once a version has a finite interval: 2 samples)
        live = [p for p in report if p.samples]
        assert {p.version for p in live} <= {planted, good} and planted in {p.version for p in live}
        for p in live:
            assert metric(samples, "sensepack_ab_ball_ratio", pack="capitals", version=p.version) == pytest.approx(
                p.ratio
            )
            if p.samples >= 2:
                assert metric(
                    samples, "sensepack_ab_ball_ratio_ci_lower", pack="capitals", version=p.version
                ) == pytest.approx(p.ci_lower)
        assert metric(samples, "sensepack_active_pack_info", pack="capitals", version=planted) == 0
        # the previous alias target takes over
        out = stub.Generate(
            build_generate_request("Hello Mauritius", packs=["capitals@prod"], max_new_tokens=2, ab_key="someone-new")
        )
        assert out.packs[0].version == good
        assert server.packs.routes()["capitals@prod"].version == good


def test_paired_nll_equals_core_scoring():
    """The one-pass paired scorer equals the core's scoring (rows past the Backpack window delegate to it)."""
    served = demo_served()
    tok, ens = served.tokenizer, served.ensemble
    pk = PackRef("capitals", "v", demo_variant(served, " Paris"), 1.0)
    rows = [
        tok(t, add_special_tokens=False)["input_ids"]
        for t in [
            "The capital of Mauritius is Port Louis.",
            "No edited token here at all.",
            "We flew to Mauritius, then to Paris, and back to Mauritius again.",
        ]
    ]
    a, b = paired_nll(ens, rows, pk)
    base = ens.score([r[:1] for r in rows], [r[1:] for r in rows], [[] for _ in rows])
    packed = ens.score([r[:1] for r in rows], [r[1:] for r in rows], [[pk] for _ in rows])
    for i in range(3):
        assert a[i] == pytest.approx(-float(base[i].double().sum()), rel=1e-5)
        assert b[i] == pytest.approx(-float(packed[i].double().sum()), rel=1e-5)
    assert a[1] == b[1] and b[0] != a[0] and b[2] != a[2]  # exact skip without an edited token


def test_gate_refuses_a_pack_trained_out_of_the_ball(tmp_path):
    """A pack from train_edits' sense finetuning, trained hard (no KL, high lr) on common tokens and
    published as if calibrated for a tight ball: the gate measures it through the serving path and refuses it."""
    from train_edits.encoding import encode_example
    from train_edits.finetune import FinetuneParams, finetune
    from train_edits.tasks import LossType, SingleExample

    served = demo_served()
    tok, bp = served.tokenizer, served.ensemble.backpack
    ids = sorted({i for w in [" the", ",", ".", " and", " of"] for i in tok(w).input_ids})
    pairs = [(t, s) for t in ids for s in range(bp.config.num_senses)]
    examples = [
        encode_example(tok, SingleExample("The cat, the dog and the bird.", " zebra zebra zebra", i)) for i in range(4)
    ]
    text = "The history of the city, and of the people. The end of the story, and the start of the next one. " * 3
    chunk = torch.tensor(tok(text).input_ids[:64])
    # ε = 1.0 keeps the last epoch, whatever its ratio: the pack is out of any tight ball.
    res = finetune(
        bp,
        examples,
        LossType("good"),
        pairs,
        [chunk],
        [chunk],
        FinetuneParams(lr=5.0, kl_weight=0.0, epochs=4, epsilons=(1.0,)),
        progress=False,
    )
    assert res.chosen_epoch[1.0] == 4 and res.history[-1].g_ratio > 1 + EPS  # the Backpack itself left the ball
    trained = SenseEdits(
        torch.tensor([p[0] for p in res.pairs]), torch.tensor([p[1] for p in res.pairs]), res.deltas[1.0]
    )
    store = open_store(str(tmp_path))
    good = publish_edits(store, served, "capitals", demo_variant(served, " Paris"), beta=1.0, epsilon=EPS, alias="prod")
    bad = publish_edits(
        store,
        served,
        "capitals",
        trained,
        beta=1.0,
        epsilon=EPS,
        training={"note": "trained without KL at lr 5; calibrated for a tight ball by mistake"},
    )
    with running_server(tmp_path, served, **{"packs.preload": ["capitals@prod"]}) as server:
        adm = admin_pb_grpc.PackAdminStub(channel(server))
        with pytest.raises(grpc.RpcError) as ei:
            adm.SetAlias(admin_pb.SetAliasRequest(name="capitals", alias="prod", version=bad), metadata=auth())
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        m = re.search(r"ratio ([0-9.]+) > 1\+epsilon", ei.value.details())
        assert m and float(m.group(1)) > 1 + EPS, ei.value.details()
        assert store.resolve("capitals@prod") == ("capitals", good)
        r = Client(f"127.0.0.1:{server.port}").generate(
            "The capital of Mauritius is", packs=["capitals@prod"], max_new_tokens=2
        )
        assert r.packs[0].version == good
