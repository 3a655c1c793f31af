"""Generation through a real gRPC server on 127.0.0.1 against the ensemble
core's own reference paths (greedy decode, teacher-forced scoring)."""

from __future__ import annotations

import threading

import pytest
import torch

from edits_store.store import open_store
from sensepack_proto import pb, pb_grpc
from sensepack_testing.serve import channel, demo_served, demo_variant, publish_edits, running_server
from serve.client import Client, build_generate_request

PROMPTS = [
    "The capital of Mauritius is",
    "Mauritius is an island nation where",
    "The weather today is",
    "In 1968, Mauritius became",
    "My favourite food is",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    served = demo_served()
    store_dir = tmp_path_factory.mktemp("store")
    store = open_store(str(store_dir))
    v_paris = publish_edits(store, served, "capitals", demo_variant(served, " Paris"), beta=1.0, alias="prod")
    v_tokyo = publish_edits(store, served, "tokyo", demo_variant(served, " Tokyo", strength=8.0), beta=0.75)
    with running_server(store_dir, served, **{"packs.preload": ["capitals@prod"]}) as server:
        yield {
            "server": server,
            "served": served,
            "store": store,
            "v_paris": v_paris,
            "v_tokyo": v_tokyo,
            "stub": pb_grpc.GenerationServiceStub(channel(server)),
            "client": Client(f"127.0.0.1:{server.port}"),
        }


def _pack_ref(env, name, version):
    r = env["server"].packs.activate(f"{name}@{version}", activate=False)[0]
    return r.pack_ref()


def _ids(env, text):
    return env["served"].tokenizer(text, add_special_tokens=False)["input_ids"]


def _reference(env, prompts, packs, n):
    ens = env["served"].ensemble
    return ens.generate_greedy([_ids(env, p) for p in prompts], [list(packs)] * len(prompts), n)


def test_greedy_equals_core_base_and_pack(env):
    c, n = env["client"], 12
    ref_base = _reference(env, PROMPTS, [], n)
    paris = _pack_ref(env, "capitals", env["v_paris"])
    ref_pack = _reference(env, PROMPTS, [paris], n)
    assert ref_base != ref_pack  # the pack changes something
    for i, p in enumerate(PROMPTS):
        rb = c.generate(p, base_only=True, max_new_tokens=n, ignore_eos=True, tokens=True)
        assert [t.id for t in rb.tokens] == ref_base[i]
        assert rb.packs == []
        rp = c.generate(p, packs=["capitals@prod"], max_new_tokens=n, ignore_eos=True, tokens=True)
        assert [t.id for t in rp.tokens] == ref_pack[i]
        assert rp.text == env["served"].tokenizer.decode(ref_pack[i])
        assert [(u.name, u.version, u.arm) for u in rp.packs] == [("capitals", env["v_paris"], "pack")]
        assert rp.packs[0].beta == pytest.approx(1.0)


def test_two_packs_add_and_beta_override(env):
    c, n = env["client"], 8
    paris = _pack_ref(env, "capitals", env["v_paris"])
    tokyo = _pack_ref(env, "tokyo", env["v_tokyo"])
    half = type(paris)(paris.name, paris.version, paris.edits, 0.5)
    ref = _reference(env, PROMPTS[:2], [half, tokyo], n)
    for i, p in enumerate(PROMPTS[:2]):
        r = c.generate(
            p, packs=[("capitals", 0.5), f"tokyo@{env['v_tokyo']}"], max_new_tokens=n, ignore_eos=True, tokens=True
        )
        assert [t.id for t in r.tokens] == ref[i]
        assert [(u.name, u.beta) for u in r.packs] == [("capitals", 0.5), ("tokyo", 0.75)]


def test_token_ids_input_and_input_tokens(env):
    ids = _ids(env, PROMPTS[0])
    req = build_generate_request(ids, base_only=True, max_new_tokens=5, ignore_eos=True, tokens=True)
    req.response.input_tokens = True
    r = env["stub"].Generate(req)
    assert list(r.input_token_ids) == ids and r.input_token_count == len(ids)
    assert [t.id for t in r.tokens] == _reference(env, PROMPTS[:1], [], 5)[0]


def test_stream_matches_generate(env):
    c = env["client"]
    for packs in ([], ["capitals@prod"]):
        for p in PROMPTS[:3]:
            kw = dict(
                packs=packs,
                base_only=not packs,
                max_new_tokens=10,
                ignore_eos=True,
                tokens=True,
                logprobs=True,
                top_n=3,
            )
            full = c.generate(p, **kw)
            msgs = list(c.stream(p, **kw))
            assert msgs[0].input_token_count == full.input_token_count
            assert list(msgs[0].packs) == list(full.packs)
            streamed = [t for m in msgs for t in m.tokens]
            assert [t.id for t in streamed] == [t.id for t in full.tokens]
            assert [t.logprob for t in streamed] == [t.logprob for t in full.tokens]
            assert "".join(m.text for m in msgs) == full.text
            assert msgs[-1].stop_reason == full.stop_reason == pb.MAX_TOKENS
            assert [m.generated_token_count for m in msgs[1:]] == list(range(1, 11))


def test_logprobs_and_top_tokens_match_core(env):
    c, served = env["client"], env["served"]
    paris = _pack_ref(env, "capitals", env["v_paris"])
    p = PROMPTS[0]
    r = c.generate(p, packs=["capitals"], max_new_tokens=6, ignore_eos=True, tokens=True, logprobs=True, top_n=4)
    ids = _ids(env, p)
    out = [t.id for t in r.tokens]
    ref = served.ensemble.score([ids], [out], [[paris]])[0]
    assert torch.allclose(torch.tensor([t.logprob for t in r.tokens], dtype=torch.float64), ref.double(), atol=1e-4)
    for t in r.tokens:
        assert len(t.top_tokens) == 4
        assert t.top_tokens[0].id == t.id  # greedy picks the top token
        lps = [x.logprob for x in t.top_tokens]
        assert lps == sorted(lps, reverse=True)


def test_score_equals_core(env):
    c, served = env["client"], env["served"]
    paris = _pack_ref(env, "capitals", env["v_paris"])
    prefix = PROMPTS[0]
    conts = [" Port Louis", " Paris, France", " a city"]
    r = c.score(prefix, conts, packs=["capitals"], include_base=True)
    pids = _ids(env, prefix)
    cids = [_ids(env, x) for x in conts]
    base = served.ensemble.score([pids] * 3, cids, [[]] * 3)
    packed = served.ensemble.score([pids] * 3, cids, [[paris]] * 3)
    assert r.prefix_token_count == len(pids)
    # the server projects in chunks with logsumexp, the core takes log_softmax of the whole row; the core's
    # float32 rounding of the delta-shifted logits is ~1e-5 (the server's is ~2e-7 of a float64 reference)
    tol = dict(abs=3e-5)
    for i, cs in enumerate(r.continuations):
        assert list(cs.token_ids) == cids[i]
        assert list(cs.base.token_logprobs) == pytest.approx(base[i].double().tolist(), **tol)
        assert list(cs.packed.token_logprobs) == pytest.approx(packed[i].double().tolist(), **tol)
        assert cs.base.total_logprob == pytest.approx(float(base[i].double().sum()), abs=1e-4)
        assert cs.packed.total_logprob == pytest.approx(float(packed[i].double().sum()), abs=1e-4)
    assert r.continuations[0].packed.total_logprob != r.continuations[0].base.total_logprob
    base_only = c.score(pids, [cids[0]])
    assert list(base_only.continuations[0].base.token_logprobs) == pytest.approx(base[0].double().tolist(), abs=1e-6)
    assert not base_only.continuations[0].packed.token_logprobs


def test_concurrent_requests_join_running_batch(env):
    """Continuous batching: staggered requests of different lengths each equal the core's greedy decode."""
    c = env["client"]
    lengths = [3, 17, 9, 25, 5, 12, 30, 7]
    jobs = [(PROMPTS[i % len(PROMPTS)], lengths[i], ["capitals"] if i % 2 else []) for i in range(len(lengths))]
    paris = _pack_ref(env, "capitals", env["v_paris"])
    results = [None] * len(jobs)
    steps_before = env["server"].engine.decode_steps

    def run(i):
        p, n, packs = jobs[i]
        results[i] = c.generate(p, packs=packs, base_only=not packs, max_new_tokens=n, ignore_eos=True, tokens=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (p, n, packs), r in zip(jobs, results, strict=True):
        ref = _reference(env, [p], [paris] if packs else [], n)[0]
        assert [t.id for t in r.tokens] == ref
    # batching happened: fewer decode steps than the sum of the lengths
    assert env["server"].engine.decode_steps - steps_before < sum(lengths)


def test_concurrent_requests_with_different_pack_sets_each_equal_their_own_decode(env):
    """Heterogeneous batches: requests naming different pack sets (and β) share decode steps, and each equals
    the core's greedy decode with its own packs alone."""
    c = env["client"]
    paris = _pack_ref(env, "capitals", env["v_paris"])
    tokyo = _pack_ref(env, "tokyo", env["v_tokyo"])
    half = type(paris)(paris.name, paris.version, paris.edits, 0.5)
    tokyo_ref = f"tokyo@{env['v_tokyo']}"
    sets = [
        (["capitals"], [paris]),
        ([tokyo_ref], [tokyo]),
        (["capitals", tokyo_ref], [paris, tokyo]),
        ([("capitals", 0.5)], [half]),
        ([], []),
        ([("capitals", 0.5), tokyo_ref], [half, tokyo]),
    ]
    jobs = [(PROMPTS[i % len(PROMPTS)], 10 + i, sets[i % len(sets)]) for i in range(12)]
    results = [None] * len(jobs)
    steps_before = env["server"].engine.decode_steps

    def run(i):
        p, n, (names, _) = jobs[i]
        results[i] = c.generate(p, packs=names, base_only=not names, max_new_tokens=n, ignore_eos=True, tokens=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (p, n, (_, refs)), r in zip(jobs, results, strict=True):
        assert [t.id for t in r.tokens] == _reference(env, [p], refs, n)[0]
    assert env["server"].engine.decode_steps - steps_before < sum(n for _, n, _ in jobs)


def test_sampling_seeded_reproducible(env):
    c = env["client"]
    kw = dict(
        packs=["capitals"],
        greedy=False,
        temperature=0.8,
        top_k=50,
        top_p=0.9,
        seed=1234,
        max_new_tokens=10,
        ignore_eos=True,
        tokens=True,
    )
    a, b = c.generate(PROMPTS[1], **kw), c.generate(PROMPTS[1], **kw)
    assert [t.id for t in a.tokens] == [t.id for t in b.tokens] and a.seed == b.seed == 1234
    s = list(c.stream(PROMPTS[1], **kw))
    assert [t.id for m in s for t in m.tokens] == [t.id for t in a.tokens]
    other = c.generate(PROMPTS[1], **{**kw, "seed": 99})
    assert other.seed == 99
    unseeded = c.generate(PROMPTS[1], **{**kw, "seed": None})
    assert unseeded.HasField("seed")
    # top_k=1 sampling is greedy
    g = c.generate(PROMPTS[1], packs=["capitals"], max_new_tokens=10, ignore_eos=True, tokens=True)
    k1 = c.generate(PROMPTS[1], **{**kw, "top_k": 1})
    assert [t.id for t in k1.tokens] == [t.id for t in g.tokens]


def test_stop_sequences_and_min_tokens(env):
    c = env["client"]
    full = c.generate(PROMPTS[0], packs=["capitals"], max_new_tokens=12, ignore_eos=True)
    words = full.text
    assert len(words) > 4
    stop = words[3:6]
    r = c.generate(PROMPTS[0], packs=["capitals"], max_new_tokens=12, ignore_eos=True, stop=[stop])
    assert r.stop_reason == pb.STOP_SEQUENCE and r.stop_sequence == stop
    assert r.text == words[: words.index(stop)]
    streamed = list(c.stream(PROMPTS[0], packs=["capitals"], max_new_tokens=12, ignore_eos=True, stop=[stop]))
    assert "".join(m.text for m in streamed) == r.text and streamed[-1].stop_reason == pb.STOP_SEQUENCE
    req = build_generate_request(PROMPTS[0], packs=["capitals"], max_new_tokens=12, ignore_eos=True, stop=[stop])
    req.stopping.include_stop_sequence = True
    assert env["stub"].Generate(req).text == words[: words.index(stop) + len(stop)]


def test_tokenize_and_model_info(env):
    c, served = env["client"], env["served"]
    t = c.tokenize("Hello world, Mauritius!")
    assert list(t.token_ids) == _ids(env, "Hello world, Mauritius!") and t.token_count == len(t.token_ids)
    assert len(t.tokens) == len(t.token_ids)
    info = c.model_info()
    roles = {m.role: m for m in info.models}
    assert roles["large"].fingerprint == served.ensemble.large_fingerprint()
    assert roles["backpack"].fingerprint == served.ensemble.backpack.fingerprint()
    assert roles["large"].vocab_size == 50400 and roles["backpack"].vocab_size == 50264
    assert info.shared_vocab_size == 50257 and info.eos_token_id == 50256
    assert info.limits.max_prompt_tokens > 0
    assert any(a.route == "capitals@prod" and a.version == env["v_paris"] for a in info.active_packs)


def test_health_and_reflection(env):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ch = channel(env["server"])
    h = health_pb2_grpc.HealthStub(ch)
    for svc in ("", "sensepack.v1.GenerationService", "sensepack.v1.PackAdmin"):
        assert h.Check(health_pb2.HealthCheckRequest(service=svc)).status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"sensepack.v1.GenerationService", "sensepack.v1.PackAdmin", "grpc.health.v1.Health"} <= names


def test_requests_without_an_id_get_a_fresh_one(env):
    """The id keys logs and the sticky A/B split: an empty client id must not put every request in one arm."""
    stub = env["stub"]
    ids = set()
    for _ in range(3):
        req = build_generate_request("The capital of France is", packs=["capitals@prod"], max_new_tokens=1)
        resp = stub.Generate(req, timeout=60)
        assert resp.request_id
        ids.add(resp.request_id)
    assert len(ids) == 3
    req = build_generate_request("Hi", max_new_tokens=1, request_id="mine-1")
    assert stub.Generate(req, timeout=60).request_id == "mine-1"
