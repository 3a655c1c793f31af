"""The gRPC server with `engine: vllm`: same API, the embedded engine's answers.

A real server on 127.0.0.1 runs the tiny GPT-J (head_dim 32) in vLLM with the sensepack processor
in-process (the pack manager's resident packs reach it through serve.vllm.resolver.REGISTRY).
Greedy Generate with and without a pack equals `Ensemble.generate_greedy`; a hot swap of the
route changes new requests only; Score (through vLLM) and ModelInfo still work.
Skipped where vLLM is not installed, or before the server wiring for `engine: vllm` is applied.
"""

from __future__ import annotations

import json

import pytest

from tests.vllm_gate import require_vllm

require_vllm(in_process=False)

from serve.config import Config  # noqa: E402

if "engine" not in Config.model_fields:
    pytest.skip(
        "serve/config.py has no `engine` field yet: the server wiring for engine: vllm (docs/vllm.md) is not applied",
        allow_module_level=True,
    )

from edits_store.store import open_store  # noqa: E402
from ensemble.demo import demo_pack, tiny_backpack  # noqa: E402
from ensemble.ensemble import Ensemble  # noqa: E402
from ensemble.tokenizer import load_tokenizer  # noqa: E402
from sensepack_testing.serve import publish_edits, running_server  # noqa: E402
from sensepack_testing.vllm import save_tiny_gptj  # noqa: E402
from serve.client import Client  # noqa: E402
from serve.models import Served  # noqa: E402

PROMPTS = ["The capital of Mauritius is", "Mauritius is an island nation where", "The weather today is"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gptj-server")
    large = save_tiny_gptj(folder, seed=0)
    tok = load_tokenizer()
    bp = tiny_backpack(0)
    served = Served(Ensemble(large, bp, tok), tok, "tiny-gptj-h32", "tiny-backpack")
    store_dir = tmp_path_factory.mktemp("store")
    store = open_store(str(store_dir))
    paris = demo_pack(bp, tok, target=" Paris").edits
    tokyo = demo_pack(bp, tok, target=" Tokyo", strength=8.0).edits
    v_paris = publish_edits(store, served, "capitals", paris, beta=1.0, alias="prod")
    v_tokyo = publish_edits(store, served, "capitals", tokyo, beta=1.0)
    overrides = {
        "engine": "vllm",
        "vllm.model": str(folder),
        "vllm.multiprocessing": False,
        "vllm.enforce_eager": True,
        "vllm.max_model_len": 512,
        "limits.max_prompt_tokens": 256,
        "limits.max_new_tokens": 64,
        "limits.default_max_new_tokens": 16,
        "packs.preload": ["capitals@prod"],
        "http.enabled": True,
        "http.port": 0,
    }
    with running_server(store_dir, served, **overrides) as server:
        yield dict(
            server=server,
            served=served,
            tok=tok,
            store=store,
            v_paris=v_paris,
            v_tokyo=v_tokyo,
            client=Client(f"127.0.0.1:{server.port}"),
        )


def _ref(env, prompts, packs, n):
    ids = [env["tok"](p, add_special_tokens=False)["input_ids"] for p in prompts]
    return env["served"].ensemble.generate_greedy(ids, [list(packs)] * len(prompts), n)


def _pack_ref(env, version):
    return env["server"].packs.activate(f"capitals@{version}", activate=False)[0].pack_ref()


def test_generate_equals_embedded_reference(env):
    c, n = env["client"], 10
    ref_base = _ref(env, PROMPTS, [], n)
    ref_pack = _ref(env, PROMPTS, [_pack_ref(env, env["v_paris"])], n)
    assert ref_base != ref_pack
    for i, p in enumerate(PROMPTS):
        rb = c.generate(p, base_only=True, max_new_tokens=n, ignore_eos=True, tokens=True)
        assert [t.id for t in rb.tokens] == ref_base[i]
        rp = c.generate(p, packs=["capitals@prod"], max_new_tokens=n, ignore_eos=True, tokens=True)
        assert [t.id for t in rp.tokens] == ref_pack[i]
        assert [(u.name, u.version) for u in rp.packs] == [("capitals", env["v_paris"])]
    from serve.vllm.engine import VLLMEngine
    from serve.vllm.resolver import REGISTRY

    assert isinstance(env["server"].engine, VLLMEngine)
    assert REGISTRY.processors[-1].core.stats.delta_applies > 0  # the deltas came from the vLLM processor


def test_hot_swap_changes_new_requests(env):
    c, n = env["client"], 8
    env["server"].packs.activate(f"capitals@{env['v_tokyo']}")  # route `capitals` -> tokyo version
    try:
        ref = _ref(env, PROMPTS[:1], [_pack_ref(env, env["v_tokyo"])], n)[0]
        r = c.generate(PROMPTS[0], packs=["capitals"], max_new_tokens=n, ignore_eos=True, tokens=True)
        assert [t.id for t in r.tokens] == ref
        assert r.packs[0].version == env["v_tokyo"]
    finally:
        env["server"].packs.activate(f"capitals@{env['v_paris']}")


def test_running_request_keeps_its_pinned_version_across_a_swap(env):
    c, n = env["client"], 40
    ref = _ref(env, PROMPTS[:1], [_pack_ref(env, env["v_paris"])], n)[0]
    stream = c.stream(PROMPTS[0], packs=["capitals"], max_new_tokens=n, ignore_eos=True, tokens=True)
    got, swapped = [], False
    try:
        for msg in stream:
            got += [t.id for t in msg.tokens]
            if not swapped:
                env["server"].packs.activate(f"capitals@{env['v_tokyo']}")  # hot swap mid-generation
                swapped = True
        assert got == ref  # still the version it was admitted with
        after = c.generate(PROMPTS[0], packs=["capitals"], max_new_tokens=4, ignore_eos=True, tokens=True)
        assert after.packs[0].version == env["v_tokyo"]
    finally:
        env["server"].packs.activate(f"capitals@{env['v_paris']}")


def test_logprobs_are_the_ensembles(env):
    c, n = env["client"], 6
    paris = _pack_ref(env, env["v_paris"])
    r = c.generate(
        PROMPTS[0], packs=["capitals@prod"], max_new_tokens=n, ignore_eos=True, tokens=True, logprobs=True, top_n=3
    )
    ids = env["tok"](PROMPTS[0], add_special_tokens=False)["input_ids"]
    ref = env["served"].ensemble.score([ids], [[t.id for t in r.tokens]], [[paris]])[0]
    assert [t.logprob for t in r.tokens] == pytest.approx(ref.double().tolist(), abs=2e-3)
    assert all(t.top_tokens[0].id == t.id for t in r.tokens)


def test_model_info_and_score_still_work(env):
    assert env["client"].model_info().engine == "vllm"
    paris = _pack_ref(env, env["v_paris"])
    tok = env["tok"]
    pids = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    cids = tok(" Port Louis", add_special_tokens=False)["input_ids"]
    r = env["client"].score(PROMPTS[0], [" Port Louis"], packs=["capitals@prod"], include_base=True)
    packed = env["served"].ensemble.score([pids], [cids], [[paris]])[0]
    # Score runs through vLLM (forced decoding, serve.vllm.scoring): vLLM's kernels against transformers',
    # float32 rounding apart (tests/test_vllm_score.py checks it in depth)
    assert list(r.continuations[0].packed.token_logprobs) == pytest.approx(packed.double().tolist(), abs=2e-5, rel=1e-5)


def test_one_refused_request_among_streams_hurts_none(env):
    """A request vLLM's add_request refuses (longer than vllm.max_model_len; validation would refuse it,
    so it is submitted to the engine directly) ends alone with REFUSED; a tiny-temperature request
    samples the argmax; eight streams around them finish normally with their reference tokens."""
    import threading

    from serve import engine as eng
    from serve import scheduler as sched
    from serve.params import GenerationRequest
    from serve.sampling_params import SamplingParams

    c, n = env["client"], 12
    ref = _ref(env, [PROMPTS[0]], [], n)[0]
    streams = [c.stream(PROMPTS[0], base_only=True, max_new_tokens=n, ignore_eos=True, tokens=True) for _ in range(8)]
    for s in streams:
        next(s)
    out: list = [None] * 8
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, list(streams[i]))) for i in range(8)]
    for t in threads:
        t.start()
    bad = env["server"].engine.submit(
        GenerationRequest(
            request_id="too-long", prompt_ids=[11] * 600, packs=[], sampling=SamplingParams(max_new_tokens=4)
        ),
        [],
    )
    ev = bad.events.get(timeout=120)
    assert isinstance(ev, eng.FinishEvent) and ev.reason == sched.REFUSED and ev.error.startswith("text:")
    tiny = c.generate(
        PROMPTS[0],
        base_only=True,
        greedy=False,
        temperature=1e-39,
        seed=1,
        max_new_tokens=n,
        ignore_eos=True,
        tokens=True,
    )
    assert [t.id for t in tiny.tokens] == ref
    for t in threads:
        t.join()
    for msgs in out:
        assert [t.id for m in msgs for t in m.tokens] == ref


def _http(env):
    openai = pytest.importorskip("openai")
    port = env["server"].http_port
    return openai, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)


def test_echo_and_prompt_logprobs_come_from_vllms_forced_scoring(env):
    """OpenAI's echo / vLLM's prompt_logprobs on engine: vllm: the prompt scored through the serving vLLM
    engine (the forced-scoring processor records ranks and top tokens too) equals the embedded ensemble's
    teacher-forced numbers and its own ranking."""
    _, oa = _http(env)
    paris = _pack_ref(env, env["v_paris"])
    ids = env["tok"](PROMPTS[0], add_special_tokens=False)["input_ids"]
    r = oa.completions.create(
        model="capitals@prod", prompt=ids, max_tokens=1, logprobs=1, echo=True, extra_body={"prompt_logprobs": 2}
    )
    c = r.choices[0]
    want = env["served"].ensemble.score([ids[:1]], [ids[1:]], [[paris]])[0].double().tolist()
    assert c.logprobs.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=2e-5, rel=1e-5)
    pl = c.model_extra["prompt_logprobs"]
    for i in range(1, len(ids)):
        entry = pl[i]
        ranks = sorted(v["rank"] for k, v in entry.items() if k != str(ids[i]))
        assert ranks == [1, 2] and entry[str(ids[i])]["logprob"] == pytest.approx(want[i - 1], abs=2e-5, rel=1e-5)
        best = max(v["logprob"] for v in entry.values())
        assert entry[str(ids[i])]["rank"] >= 1 and (entry[str(ids[i])]["rank"] == 1) == (
            entry[str(ids[i])]["logprob"] >= best
        )


def test_json_schema_through_vllms_structured_outputs(env):
    jsonschema = pytest.importorskip("jsonschema")
    _, oa = _http(env)
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string", "maxLength": 16}, "ok": {"type": "boolean"}},
        "required": ["capital", "ok"],
        "additionalProperties": False,
    }
    for model in ("tiny-gptj-h32", "capitals@prod"):
        r = oa.completions.create(
            model=model,
            prompt=PROMPTS[0],
            max_tokens=48,
            temperature=0,
            extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}},
        )
        jsonschema.validate(json.loads(r.choices[0].text), schema)
