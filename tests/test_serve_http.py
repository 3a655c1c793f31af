"""The OpenAI-compatible HTTP API, driven by the official `openai` client against a live server on
127.0.0.1 (demo models), checked against the ensemble core's greedy decode and against gRPC Generate."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import pytest

openai = pytest.importorskip("openai")

from edits_store.format import CalibrationEntry, build_pack  # noqa: E402
from edits_store.store import open_store  # noqa: E402
from ensemble.tokenizer import tokenizer_fingerprint  # noqa: E402
from sensepack_proto import pb, pb_grpc  # noqa: E402
from sensepack_testing.serve import (  # noqa: E402
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
from serve.client import Client  # noqa: E402
from serve.errors import STATUS, ServeError, from_pack_error  # noqa: E402

PROMPT = "The capital of Mauritius is"
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _alien(store, served):
    """A pack trained against another Backpack: incompatible with the served one."""
    edits = demo_variant(served, " Rome")
    bp = served.ensemble.backpack
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


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    served = demo_served()
    store_dir = tmp_path_factory.mktemp("store")
    store = open_store(str(store_dir))
    version = publish_edits(store, served, "capitals", demo_variant(served, " Paris"), beta=1.0, alias="prod")
    _alien(store, served)
    with running_server(
        store_dir,
        served,
        **{
            "packs.preload": ["capitals@prod"],
            "http.enabled": True,
            "http.port": 0,
            "http.chat_template": TEMPLATE,
            "http.served_model_name": "demo",
        },
    ) as server:
        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0)
        yield {
            "server": server,
            "served": served,
            "version": version,
            "oa": oa,
            "grpc": Client(f"127.0.0.1:{server.port}"),
        }


def _ids(env, text):
    return env["served"].tokenizer(text, add_special_tokens=False)["input_ids"]


def _reference(env, prompt_ids, packs, n):
    return env["served"].ensemble.generate_greedy([prompt_ids], [list(packs)], n)[0]


def _capitals(env):
    return env["server"].packs.routes()["capitals@prod"].pack_ref()


def _token_ids(logprobs_tokens):
    return [int(t.split(":", 1)[1]) for t in logprobs_tokens]


EXTRA_IDS = {"ignore_eos": True, "return_tokens_as_token_ids": True}


def test_models_lists_the_served_model_and_pack_routes(env):
    models = {m.id: m for m in env["oa"].models.list().data}
    assert "demo" in models and "capitals@prod" in models and "capitals" in models
    assert models["capitals@prod"].sensepack["version"] == env["version"]
    assert env["oa"].models.retrieve("capitals@prod").sensepack["name"] == "capitals"
    with pytest.raises(openai.NotFoundError):
        env["oa"].models.retrieve("nosuchpack")


def test_completion_greedy_equals_core_with_and_without_pack(env):
    oa, n = env["oa"], 10
    ids = _ids(env, PROMPT)
    ref_base, ref_pack = _reference(env, ids, [], n), _reference(env, ids, [_capitals(env)], n)
    assert ref_base != ref_pack  # the pack changes the answer
    base = oa.completions.create(
        model="demo", prompt=PROMPT, max_tokens=n, temperature=0, logprobs=0, extra_body=dict(EXTRA_IDS, base_only=True)
    )
    packed = oa.completions.create(
        model="demo",
        prompt=PROMPT,
        max_tokens=n,
        temperature=0,
        logprobs=0,
        extra_body=dict(EXTRA_IDS, packs=["capitals@prod"]),
    )
    assert _token_ids(base.choices[0].logprobs.tokens) == ref_base
    assert _token_ids(packed.choices[0].logprobs.tokens) == ref_pack
    assert packed.choices[0].text == env["served"].tokenizer.decode(ref_pack)
    assert packed.choices[0].finish_reason == "length"
    assert base.sensepack["packs"] == []
    (used,) = packed.sensepack["packs"]
    assert (used["name"], used["version"], used["arm"], used["beta"]) == ("capitals", env["version"], "pack", 1.0)
    assert packed.usage.prompt_tokens == len(ids) and packed.usage.completion_tokens == n
    # the model-name form selects the same pack for clients that cannot send extra fields
    by_name = oa.completions.create(
        model="capitals@prod", prompt=PROMPT, max_tokens=n, temperature=0, logprobs=0, extra_body=EXTRA_IDS
    )
    assert _token_ids(by_name.choices[0].logprobs.tokens) == ref_pack
    # token ids as the prompt
    by_ids = oa.completions.create(
        model="capitals@prod", prompt=ids, max_tokens=n, temperature=0, extra_body={"ignore_eos": True}
    )
    assert by_ids.choices[0].text == packed.choices[0].text


def test_completion_stream_equals_non_stream(env):
    oa, n = env["oa"], 12
    full = oa.completions.create(
        model="capitals@prod", prompt=PROMPT, max_tokens=n, temperature=0, extra_body={"ignore_eos": True}
    )
    chunks = list(
        oa.completions.create(
            model="capitals@prod",
            prompt=PROMPT,
            max_tokens=n,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[0].sensepack["packs"][0]["version"] == env["version"]
    assert chunks[-1].usage.completion_tokens == n and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_uses_the_template_and_the_pack(env):
    oa, n = env["oa"], 8
    messages = [{"role": "user", "content": PROMPT}]
    ids = _ids(env, f"<user>{PROMPT}\n<assistant>")  # TEMPLATE rendered by hand
    ref_base, ref_pack = _reference(env, ids, [], n), _reference(env, ids, [_capitals(env)], n)
    assert ref_base != ref_pack
    tok = env["served"].tokenizer
    for model, ref in (("demo", ref_base), ("capitals@prod", ref_pack)):
        r = oa.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=n,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            extra_body={"ignore_eos": True},
        )
        assert r.choices[0].message.content == tok.decode(ref)
        assert r.choices[0].message.role == "assistant"
        assert [c.token for c in r.choices[0].logprobs.content] == [tok.decode([t]) for t in ref]
        assert all(
            len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
            for c in r.choices[0].logprobs.content
        )
        assert r.usage.prompt_tokens == len(ids)
        stream = list(
            oa.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=n,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
        )
        assert stream[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in stream) == tok.decode(ref)


def test_token_for_token_equal_to_grpc_generate(env):
    """Sampling with seed, top-k/top-p, penalties and logit_bias: the same tokens and log-probs as gRPC."""
    oa, n = env["oa"], 12
    bias_id = _ids(env, " the")[0]
    r = oa.completions.create(
        model="demo",
        prompt=PROMPT,
        max_tokens=n,
        temperature=0.8,
        top_p=0.9,
        seed=11,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        logit_bias={str(bias_id): 3.0},
        logprobs=3,
        extra_body=dict(EXTRA_IDS, packs=["capitals@prod"], top_k=50),
    )
    req = pb.GenerateRequest(text=PROMPT, packs=[pb.PackSpec(ref="capitals@prod")])
    s = req.sampling
    s.method, s.temperature, s.top_p, s.top_k, s.seed = pb.SAMPLE, 0.8, 0.9, 50, 11
    s.presence_penalty, s.frequency_penalty = 0.5, 0.3
    s.logit_bias[bias_id] = 3.0
    req.stopping.max_new_tokens, req.stopping.ignore_eos = n, True
    req.response.generated_tokens, req.response.token_logprobs, req.response.top_n_tokens = True, True, 3
    g = pb_grpc.GenerationServiceStub(channel(env["server"])).Generate(req, timeout=60)
    c = r.choices[0]
    assert _token_ids(c.logprobs.tokens) == [t.id for t in g.tokens]
    assert c.logprobs.token_logprobs == pytest.approx([t.logprob for t in g.tokens], abs=1e-5)
    assert [sorted(int(k.split(":")[1]) for k in top) for top in c.logprobs.top_logprobs] == [
        sorted(x.id for x in t.top_tokens) for t in g.tokens
    ]
    assert c.text == g.text and r.sensepack["seed"] == g.seed == 11
    # greedy too
    rg = oa.completions.create(
        model="capitals@prod", prompt=PROMPT, max_tokens=n, temperature=0, extra_body={"ignore_eos": True}
    )
    gg = env["grpc"].generate(PROMPT, packs=["capitals@prod"], max_new_tokens=n, ignore_eos=True)
    assert rg.choices[0].text == gg.text


def test_n_choices_are_seeded_one_by_one(env):
    oa = env["oa"]
    kw = dict(model="demo", prompt=PROMPT, max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    r = oa.completions.create(n=3, seed=5, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    singles = [oa.completions.create(seed=5 + i, **kw).choices[0].text for i in range(3)]
    assert [c.text for c in r.choices] == singles
    assert [c.sensepack["seed"] for c in r.choices] == [5, 6, 7]
    assert r.usage.completion_tokens == 24


def test_stream_with_several_choices(env):
    """n = 2 and two prompts in one streamed request: each choice's chunks reassemble to its own answer."""
    oa = env["oa"]
    prompts = [PROMPT, "The weather today is"]
    singles = [
        oa.completions.create(
            model="capitals@prod", prompt=p, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
        for p in prompts
    ]
    texts: dict[int, str] = {}
    finished = set()
    for chunk in oa.completions.create(
        model="capitals@prod",
        prompt=prompts,
        n=2,
        max_tokens=6,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    ):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2, 3}
    assert [texts[i] for i in range(4)] == [singles[0], singles[0], singles[1], singles[1]]


def test_stop_sequences(env):
    oa = env["oa"]
    full = (
        oa.completions.create(
            model="capitals@prod", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    r = oa.completions.create(
        model="capitals@prod", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    ).choices[0]
    assert r.text == full[: full.index(stop)] and r.finish_reason == "stop"


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_tokens=10**6), "max_tokens"),
        (dict(logprobs=10**3), "logprobs"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(logit_bias={"-4": 1.0}), "logit_bias[-4]"),
        (dict(stop=[""]), "stop[0]"),
        (dict(extra_body={"guided_regex": "a+"}), "guided_regex"),  # would change generation; not served
        (dict(suffix="!"), "suffix"),
        (dict(extra_body={"packs": ["capitals@@prod"]}), "packs[0].ref"),
        (dict(extra_body={"packs": ["capitals"], "base_only": True}), "base_only"),
        (dict(prompt=""), "prompt"),
    ],
)
def test_bad_input_is_400_naming_the_field(env, kwargs, param):
    args = dict(model="demo", prompt=PROMPT, max_tokens=4)
    args.update(kwargs)
    with pytest.raises(openai.BadRequestError) as ei:
        env["oa"].completions.create(**args)
    err = ei.value.body
    assert ei.value.status_code == 400 and err["param"] == param and err["message"].startswith(param + ":")
    assert err["type"] == "invalid_request_error" and err["code"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    "raw, param",
    [
        (b'{"model":"demo","prompt":"x","max_tokens":1,"seed":18446744073709551616}', "seed"),
        (b'{"model":"demo","prompt":"x","max_tokens":1,"seed":-1}', "seed"),
        (b'{"model":"demo","prompt":"x","max_tokens":1,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body"),
        (b'{"model":"demo","prompt":"x","max_tokens":1,"x":' + b"[" * 65 + b"]" * 65 + b"}", "x" + "[0]" * 64),
        (b'{"model":"demo","max_tokens":1,"prompt":[' + b"1" * 5000 + b"]}", "body"),
        (b'{"model":"demo","max_tokens":1,"prompt":"a\\ud800b"}', "prompt"),
        (b'{"model":"demo","max_tokens":1,"prompt":"x","user":"\\udfff"}', "user"),
        (b'{"model":"demo","max_tokens":1,"prompt":"x","\\ud800":1}', "body"),
    ],
)
def test_inputs_that_were_500s_are_400s_naming_the_field(env, raw, param):
    req = urllib.request.Request(
        f"http://127.0.0.1:{env['server'].http_port}/v1/completions",
        data=raw,
        headers={"content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, timeout=60)
    err = json.loads(ei.value.read())["error"]
    assert ei.value.code == 400 and err["param"] == param and err["message"].startswith(param + ":"), err


def test_seed_plus_i_wraps_within_uint64_for_n_choices(env):
    r = env["oa"].completions.create(
        model="demo", prompt=PROMPT, max_tokens=2, n=2, seed=2**64 - 1, temperature=1.0, extra_body={"ignore_eos": True}
    )
    assert sorted(c.sensepack["seed"] for c in r.choices) == [0, 2**64 - 1]


def test_chat_field_names_in_errors(env):
    with pytest.raises(openai.BadRequestError) as ei:
        env["oa"].chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=10**3
        )
    assert ei.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as ei:
        env["oa"].chat.completions.create(model="demo", messages=[{"role": "wizard", "content": "hi"}])
    assert ei.value.body["param"] == "messages[0].role"


def test_unknown_and_incompatible_packs(env):
    oa = env["oa"]
    with pytest.raises(openai.NotFoundError) as ei:
        oa.completions.create(model="demo", prompt=PROMPT, max_tokens=2, extra_body={"packs": ["nosuchpack"]})
    assert ei.value.body["param"] == "packs[0].ref" and ei.value.body["code"] == "NOT_FOUND"
    with pytest.raises(openai.NotFoundError) as ei:
        oa.completions.create(model="no such model!", prompt=PROMPT, max_tokens=2)
    assert ei.value.body["param"] == "model"
    with pytest.raises(openai.ConflictError) as ei:  # 409: incompatible pack (FAILED_PRECONDITION)
        oa.completions.create(model="alien", prompt=PROMPT, max_tokens=2)
    assert ei.value.body["code"] == "FAILED_PRECONDITION" and "backpack_fingerprint" in ei.value.body["message"]


LATENCY = (
    "sensepack_time_to_first_token_seconds_count",
    "sensepack_e2e_request_latency_seconds_count",
    "sensepack_queue_time_seconds_count",
)


def test_requests_are_counted_by_frontend(env):
    m0 = parse_metrics(scrape(env["server"]))
    for name in LATENCY:  # both label values exist before any request of that front-end
        assert f'{name}{{frontend="http"}}' in m0 and f'{name}{{frontend="grpc"}}' in m0, name
    env["oa"].completions.create(model="demo", prompt=PROMPT, max_tokens=2)
    m1 = parse_metrics(scrape(env["server"]))
    env["grpc"].generate(PROMPT, max_new_tokens=2)
    m = parse_metrics(scrape(env["server"]))
    for name in LATENCY:  # each request lands in its own front-end's histograms, once
        assert metric(m1, name, frontend="http") - metric(m0, name, frontend="http") == 1, name
        assert metric(m1, name, frontend="grpc") == metric(m0, name, frontend="grpc"), name
        assert metric(m, name, frontend="grpc") - metric(m1, name, frontend="grpc") == 1, name
    assert metric(m, "sensepack_requests_total", frontend="http", method="completions", status="OK") >= 1
    assert metric(m, "sensepack_requests_total", frontend="http", method="completions", status="NOT_FOUND") >= 1
    assert metric(m, "sensepack_requests_total", frontend="grpc", method="Generate", status="OK") >= 1
    assert metric(m, "sensepack_requests_total", frontend="http", method="Generate") == 0


def _post(port, path, body, headers=None):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_api_keys_on_both_front_ends(tmp_path):
    with running_server(
        tmp_path, demo_served(), **{"http.enabled": True, "http.port": 0, "api.keys": ["key-1", "key-2"]}
    ) as server:
        body = {"model": server.served.large_name, "prompt": PROMPT, "max_tokens": 2}
        code, err = _post(server.http_port, "/v1/completions", body)
        assert code == 401 and err["error"]["type"] == "authentication_error"
        code, err = _post(server.http_port, "/v1/completions", body, {"authorization": "Bearer test-admin-token"})
        assert code == 403 and err["error"]["type"] == "permission_error"  # the admin token is not an API key
        ok = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="key-2", max_retries=0)
        assert ok.completions.create(**body).usage.completion_tokens == 2
        with pytest.raises(openai.PermissionDeniedError):
            openai.OpenAI(
                base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="nope", max_retries=0
            ).models.list()
        target = f"127.0.0.1:{server.port}"
        for key, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("nope", grpc.StatusCode.PERMISSION_DENIED)):
            for call in (
                lambda c: c.generate(PROMPT, max_new_tokens=2),
                lambda c: list(c.stream(PROMPT)),
                lambda c: c.model_info(),
            ):
                with pytest.raises(grpc.RpcError) as ei:
                    call(Client(target, api_key=key))
                assert ei.value.code() == code
        assert Client(target, api_key="key-1").generate(PROMPT, max_new_tokens=2).generated_token_count == 2
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/health", timeout=10) as r:
            assert r.status == 200  # health needs no key


def test_queue_full_disconnect_frees_the_slot_and_shutdown(tmp_path):
    """429 when the one slot is taken; closing the stream mid-generation frees it; an oversized body is
    refused; 503 while draining."""
    with running_server(
        tmp_path,
        demo_served(),
        **{
            "http.enabled": True,
            "http.port": 0,
            "limits.max_running": 1,
            "limits.max_waiting": 0,
            "limits.max_new_tokens": 2000,
            "limits.max_prompt_tokens": 64,
            "http.max_body_bytes": 4096,
        },
    ) as server:
        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="x", max_retries=0)
        model = server.served.large_name
        long = dict(model=model, prompt=PROMPT, max_tokens=2000, temperature=0, extra_body={"ignore_eos": True})
        m0 = parse_metrics(scrape(server))
        before = metric(m0, "sensepack_requests_total", frontend="http", status="CANCELLED")
        tokens0 = metric(m0, "sensepack_generation_tokens_total")
        stream = oa.completions.create(stream=True, **long)
        it = iter(stream)
        next(it), next(it)  # generating
        assert server.engine.running == 1
        with pytest.raises(openai.RateLimitError) as ei:
            oa.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        assert ei.value.status_code == 429 and ei.value.body["code"] == "RESOURCE_EXHAUSTED"
        stream.close()  # the client goes away mid-stream
        assert wait_until(lambda: server.engine.running == 0, timeout=30)
        assert metric(parse_metrics(scrape(server)), "sensepack_generation_tokens_total") - tokens0 < 1000  # cut short
        assert all(r.refcount == 0 for r in server.packs.residents())
        assert oa.completions.create(model=model, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
        assert wait_until(
            lambda: (
                metric(parse_metrics(scrape(server)), "sensepack_requests_total", frontend="http", status="CANCELLED")
                == before + 1
            )
        )
        # a non-streaming request whose client gives up (its timeout) is cancelled too
        tokens1 = metric(parse_metrics(scrape(server)), "sensepack_generation_tokens_total")
        with pytest.raises(openai.APITimeoutError):
            oa.with_options(timeout=1.0).completions.create(**long)
        assert wait_until(lambda: server.engine.running == 0, timeout=30)
        assert metric(parse_metrics(scrape(server)), "sensepack_generation_tokens_total") - tokens1 < 1500
        assert wait_until(
            lambda: (
                metric(parse_metrics(scrape(server)), "sensepack_requests_total", frontend="http", status="CANCELLED")
                == before + 2
            )
        )
        code, err = _post(server.http_port, "/v1/completions", {"model": model, "prompt": "x" * 10_000})
        assert code == 400 and err["error"]["param"] == "body"  # refused before it is read whole
        server.engine.stop_accepting()  # what stop() does first: draining
        with pytest.raises(openai.APIStatusError) as ei:
            oa.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        assert ei.value.status_code == 503 and ei.value.body["code"] == "UNAVAILABLE"


def test_one_mapping_covers_every_domain_and_store_error():
    """Every ServeError class has a status; edits_store errors keep the gRPC status they had."""
    import edits_store.errors as st

    def subclasses(c):
        return {c} | {s for x in c.__subclasses__() for s in subclasses(x)}

    for cls in subclasses(ServeError) - {ServeError}:
        assert any(base in STATUS for base in cls.__mro__), cls
    for cls in subclasses(st.PackError):
        err = cls("detail")
        assert STATUS[type(from_pack_error(err))].grpc == cls.status, cls
        assert getattr(grpc.StatusCode, STATUS[type(from_pack_error(err))].grpc)
