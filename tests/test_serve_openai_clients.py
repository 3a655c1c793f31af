"""Real OpenAI clients against a live server on 127.0.0.1 (demo models): the `openai` package and
lm-evaluation-harness's `local-completions` model, unchanged. Oracles: log-likelihoods computed directly
with transformers (no pack) or by the gRPC Score RPC (with a pack), greedy generation without the
ignored fields, and vLLM's documented defaults."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch

openai = pytest.importorskip("openai")

from edits_store.store import open_store  # noqa: E402
from sensepack_testing.serve import demo_served, demo_variant, publish_edits, running_server  # noqa: E402
from serve.client import Client  # noqa: E402

PROMPT = "The capital of Mauritius is"
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
MAX_NEW = 40  # limits.max_new_tokens of this server: the bound of an unset max_tokens on chat


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    served = demo_served()
    store_dir = tmp_path_factory.mktemp("store")
    publish_edits(open_store(str(store_dir)), served, "capitals", demo_variant(served, " Paris"), alias="prod")
    overrides = {
        "packs.preload": ["capitals@prod"],
        "http.enabled": True,
        "http.port": 0,
        "http.chat_template": TEMPLATE,
        "http.served_model_name": "demo",
        "limits.max_new_tokens": MAX_NEW,
        "limits.default_max_new_tokens": 8,
    }
    with running_server(store_dir, served, **overrides) as server:
        base = f"http://127.0.0.1:{server.http_port}"
        yield {
            "server": server,
            "served": served,
            "base": base,
            "oa": openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0),
            "grpc": Client(f"127.0.0.1:{server.port}"),
        }


def _ids(env, text: str) -> list[int]:
    return env["served"].tokenizer(text, add_special_tokens=False)["input_ids"]


def _direct_logprobs(env, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[<i]), i >= 1, straight from the large model with transformers (no pack)."""
    served = env["served"]
    large, n = served.ensemble.large, served.ensemble.vocab.size
    with torch.no_grad():
        logits = large(torch.tensor([ids])).logits[0, :, :n].double()
    lp = torch.log_softmax(logits, dim=-1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


def _score_rpc(env, ids: list[int], pack: str) -> list[float]:
    r = env["grpc"].score(ids[:1], [ids[1:]], packs=[pack], include_base=False)
    return list(r.continuations[0].packed.token_logprobs)


# ------------------------------------------------------------------ special tokens
def test_special_tokens_are_skipped_by_default_and_still_counted(env):
    oa, eos = env["oa"], env["served"].tokenizer.eos_token_id
    eos_text = env["served"].tokenizer.decode([eos])
    forced = dict(model="demo", prompt=PROMPT, max_tokens=3, logit_bias={str(eos): 100})
    r = oa.completions.create(**forced, logprobs=1, extra_body={"ignore_eos": True})
    assert r.choices[0].text == "" and r.usage.completion_tokens == 3
    assert r.choices[0].logprobs.tokens == ["", "", ""]
    kept = oa.completions.create(**forced, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert kept.choices[0].text == eos_text * 3
    stream = oa.completions.create(**forced, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream if c.choices) == ""
    # chat: the EOS that ends the answer leaves no text behind (was "...<|endoftext|>")
    msgs = [{"role": "user", "content": "hi"}]
    chat = oa.chat.completions.create(model="demo", messages=msgs, max_tokens=4, logit_bias={str(eos): 100})
    assert chat.choices[0].message.content == "" and chat.choices[0].finish_reason == "stop"
    assert chat.usage.completion_tokens == 1
    deltas = oa.chat.completions.create(
        model="demo", messages=msgs, max_tokens=4, logit_bias={str(eos): 100}, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in deltas if c.choices) == ""


# ------------------------------------------------------------------ echo and prompt log-probs
def test_echo_logprobs_equal_transformers_without_a_pack(env):
    ids = _ids(env, PROMPT)
    r = env["oa"].completions.create(model="demo", prompt=ids, max_tokens=1, logprobs=1, echo=True, temperature=0)
    c = r.choices[0]
    assert c.text.startswith(PROMPT) and len(c.logprobs.tokens) == len(ids) + 1
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert c.logprobs.token_logprobs[1 : len(ids)] == pytest.approx(_direct_logprobs(env, ids), abs=1e-3)
    assert c.logprobs.text_offset[: len(ids)] == _offsets(env, ids)
    for lp, top in zip(c.logprobs.token_logprobs[1:], c.logprobs.top_logprobs[1:], strict=True):
        assert max(top.values()) >= lp  # the token itself and the top 1: lm-eval's is_greedy test
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 1


def _offsets(env, ids: list[int]) -> list[int]:
    tok = env["served"].tokenizer
    return [len(tok.decode(ids[:k])) for k in range(len(ids))]


def test_echo_with_a_pack_returns_the_score_rpc_numbers(env):
    ids = _ids(env, PROMPT)
    r = env["oa"].completions.create(model="capitals@prod", prompt=ids, max_tokens=1, logprobs=0, echo=True)
    got = r.choices[0].logprobs.token_logprobs[1 : len(ids)]
    assert got == pytest.approx(_score_rpc(env, ids, "capitals@prod"), abs=1e-4)
    assert got != pytest.approx(_direct_logprobs(env, ids), abs=1e-3)  # the pack moves them
    assert r.choices[0].sensepack["packs"][0]["name"] == "capitals"


def test_echo_with_max_tokens_0_generates_nothing(env):
    ids = _ids(env, PROMPT)
    r = env["oa"].completions.create(model="demo", prompt=ids, max_tokens=0, logprobs=1, echo=True)
    c = r.choices[0]
    assert c.text == PROMPT and len(c.logprobs.tokens) == len(ids) and r.usage.completion_tokens == 0
    assert c.logprobs.token_logprobs[1:] == pytest.approx(_direct_logprobs(env, ids), abs=1e-3)
    with pytest.raises(openai.BadRequestError) as ei:  # without echo there is nothing to return
        env["oa"].completions.create(model="demo", prompt=ids, max_tokens=0)
    assert ei.value.body["param"] == "max_tokens"


def test_echo_streams_the_prompt_first(env):
    chunks = env["oa"].completions.create(
        model="demo", prompt=PROMPT, max_tokens=3, echo=True, stream=True, extra_body={"ignore_eos": True}
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert texts[0].startswith(PROMPT) and len(texts) == 3


def test_vllm_prompt_logprobs_ranks_and_top_tokens(env):
    ids = _ids(env, PROMPT)
    r = env["oa"].completions.create(
        model="demo", prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": 2, "ignore_eos": True}
    )
    pl = r.choices[0].model_extra["prompt_logprobs"]
    assert pl[0] is None and len(pl) == len(ids)
    served = env["served"]
    with torch.no_grad():
        z = served.ensemble.large(torch.tensor([ids])).logits[0, :, : served.ensemble.vocab.size].double()
    lp = torch.log_softmax(z, dim=-1)
    for i in range(1, len(ids)):
        entry = pl[i]
        mine = entry[str(ids[i])]
        assert mine["rank"] == int((lp[i - 1] > lp[i - 1, ids[i]]).sum()) + 1
        assert mine["logprob"] == pytest.approx(float(lp[i - 1, ids[i]]), abs=1e-3)
        top2 = torch.topk(lp[i - 1], 2).indices.tolist()
        assert set(entry) == {str(ids[i])} | {str(t) for t in top2}
        assert entry[str(top2[0])]["rank"] == 1


# ------------------------------------------------------------------ defaults and fields
def test_unset_max_tokens_follow_vllm(env):
    oa = env["oa"]
    r = oa.completions.create(model="demo", prompt=PROMPT, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
    msgs = [{"role": "user", "content": "Write a long poem."}]
    chat = oa.chat.completions.create(model="demo", messages=msgs, extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == MAX_NEW  # to the context, within limits.max_new_tokens


HARMLESS = {
    "store": True,
    "metadata": {"team": "a"},
    "service_tier": "auto",
    "parallel_tool_calls": False,
    "tool_choice": "none",
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "response_format": {"type": "text"},
    "some_future_field": {"x": 1},
}


def test_fields_that_do_not_change_generation_are_ignored(env):
    oa = env["oa"]
    msgs = [{"role": "user", "content": "hi"}]
    plain = oa.chat.completions.create(model="demo", messages=msgs, max_tokens=6, temperature=0)
    extra = {k: v for k, v in HARMLESS.items() if k not in ("store", "metadata", "service_tier")}
    r = oa.chat.completions.create(
        model="demo",
        messages=msgs,
        max_tokens=6,
        temperature=0,
        store=True,
        metadata={"team": "a"},
        service_tier="auto",
        extra_body=extra,
    )
    assert r.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": HARMLESS["tools"], "tool_choice": "auto"}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": "a+"}, "guided_regex"),
        ({"echo": True}, "echo"),
        ({"modalities": ["text", "audio"]}, "modalities"),
    ],
)
def test_bad_or_unserved_fields_are_refused_by_name(env, body, param):
    with pytest.raises(openai.BadRequestError) as ei:
        env["oa"].chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body=body
        )
    assert ei.value.body["param"] == param and ei.value.body["message"].startswith(param + ":")


# ------------------------------------------------------------------ structured outputs
CAPITAL = {
    "type": "object",
    "properties": {
        "capital": {"type": "string", "maxLength": 24},
        "population": {"type": "integer", "minimum": 0, "maximum": 100_000_000},
        "coastal": {"type": "boolean"},
    },
    "required": ["capital", "population", "coastal"],
    "additionalProperties": False,
}


def _json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("model", ["demo", "capitals@prod"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates_on_the_tiny_models(env, model, temperature):
    """Random tiny models, with and without a pack's delta: whatever they prefer, the grammar's mask holds the
    output to the schema (an independent validator: jsonschema)."""
    jsonschema = pytest.importorskip("jsonschema")
    for seed in range(3):
        r = env["oa"].chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "The capital of France, as JSON"}],
            response_format=_json_schema(CAPITAL),
            max_tokens=MAX_NEW,
            temperature=temperature,
            seed=seed,
        )
        c = r.choices[0]
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), CAPITAL)


def test_json_object_and_guided_json_on_completions_and_streams(env):
    oa = env["oa"]
    obj = oa.completions.create(
        model="demo",
        prompt="JSON:",
        max_tokens=MAX_NEW,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    text = obj.choices[0].text
    assert text.startswith("{")  # a JSON object under way (a random model need not close it in 40 tokens)
    guided = oa.completions.create(
        model="demo",
        prompt="JSON:",
        max_tokens=MAX_NEW,
        temperature=0,
        extra_body={"guided_json": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
    )
    assert isinstance(json.loads(guided.choices[0].text), list)
    chunks = oa.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "x"}],
        response_format=_json_schema(CAPITAL),
        max_tokens=MAX_NEW,
        temperature=0,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    pytest.importorskip("jsonschema").validate(json.loads(streamed), CAPITAL)


def test_json_schema_on_smollm2(tmp_path):
    """The real SmolLM2 with the sense head: a schema-constrained answer parses and validates."""
    jsonschema = pytest.importorskip("jsonschema")
    from ensemble import zoo
    from serve.config import ModelConfig
    from serve.models import build_served

    try:
        zoo.resolve(zoo.SMOLLM2_NAME)
    except zoo.ZooError as e:
        pytest.skip(f"SmolLM2 could not be fetched: {e}")
    served = build_served(
        ModelConfig(
            profile="pretrained",
            large_model=zoo.SMOLLM2_NAME,
            backpack="sense-smollm2",
            tokenizer=zoo.SMOLLM2_NAME,
        )
    )
    overrides = {"http.enabled": True, "http.port": 0, "http.served_model_name": "smollm2", "server.warmup": False}
    with running_server(tmp_path, served, **overrides) as server:
        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0)
        r = oa.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
            response_format=_json_schema(CAPITAL),
            max_tokens=48,
            temperature=0,
        )
    out = json.loads(r.choices[0].message.content)
    jsonschema.validate(out, CAPITAL)
    assert "<|im_end|>" not in r.choices[0].message.content


def test_unknown_model_is_model_not_found(env):
    for call in (
        lambda: env["oa"].completions.create(model="gpt-3.5-turbo-instruct", prompt=PROMPT, max_tokens=2),
        lambda: env["oa"].chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}]),
        lambda: env["oa"].completions.create(model="no such model!", prompt=PROMPT, max_tokens=2),
        lambda: env["oa"].models.retrieve("gpt-4o"),
    ):
        with pytest.raises(openai.NotFoundError) as ei:
            call()
        err = ei.value.body
        assert err["code"] == "model_not_found" and err["param"] == "model"
        assert "does not exist" in err["message"] and "demo" in err["message"] and "capitals@prod" in err["message"]


def test_openapi_schema_and_docs(env):
    with urllib.request.urlopen(f"{env['base']}/openapi.json", timeout=30) as r:
        schema = json.loads(r.read())
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    name = body["$ref"].rsplit("/", 1)[1]
    props = schema["components"]["schemas"][name]["properties"]
    assert {"prompt", "echo", "logprobs", "max_tokens", "packs", "skip_special_tokens"} <= set(props)
    chat = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "messages" in schema["components"]["schemas"][chat["$ref"].rsplit("/", 1)[1]]["properties"]
    with urllib.request.urlopen(f"{env['base']}/docs", timeout=30) as r:
        assert r.status == 200 and b"openapi.json" in r.read()


# ------------------------------------------------------------------ lm-evaluation-harness
MC = [
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " Berlin"], "label": 0},
    {"question": "The capital of Mauritius is", "choices": [" Port Louis", " Paris", " Lima"], "label": 0},
    {"question": "Water boils at", "choices": [" 100 degrees", " 10 degrees"], "label": 0},
]
PPL = [
    {"text": "The quick brown fox jumps over the lazy dog. It was a sunny day in the park."},
    {"text": "Port Louis is the capital of Mauritius, an island nation in the Indian Ocean."},
]


def _tasks(folder) -> None:
    """Two local lm-eval tasks (no network): multiple choice (loglikelihood) and perplexity (rolling)."""
    for name, rows in (("mc", MC), ("ppl", PPL)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        "task: sensepack_mc\n"
        + common.format(folder / "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"
        "    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "ppl.yaml").write_text(
        "task: sensepack_ppl\n"
        + common.format(folder / "ppl.jsonl")
        + "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
        "  - metric: word_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
    )


@pytest.mark.parametrize("model", ["demo", "capitals@prod"])
def test_lm_eval_multiple_choice_and_perplexity(env, tmp_path, monkeypatch, model):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the test extra (pip install -e '.[test]')")
    from lm_eval.tasks import TaskManager

    _tasks(tmp_path)
    tok_dir = tmp_path / "tokenizer"
    env["served"].tokenizer.save_pretrained(tok_dir)  # lm-eval tokenizes itself and sends token ids
    args = (
        f"model={model},base_url={env['base']}/v1/completions,tokenizer={tok_dir},tokenizer_backend=huggingface,"
        f"max_length={env['server'].context_len - 1},num_concurrent=1,max_retries=1"
    )
    res = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=["sensepack_mc", "sensepack_ppl"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    assert set(res["results"]) == {"sensepack_mc", "sensepack_ppl"}
    tok = env["served"].tokenizer

    def want(context: list[int], cont: list[int]) -> float:
        ids = context + cont
        lps = _direct_logprobs(env, ids) if model == "demo" else _score_rpc(env, ids, model)
        return sum(lps[len(context) - 1 :])

    for s in res["samples"]["sensepack_mc"]:
        doc = s["doc"]
        got = [r[0][0] for r in s["resps"]]
        ref = [want(_ids(env, doc["question"]), _ids(env, c)) for c in doc["choices"]]
        assert got == pytest.approx(ref, abs=1e-3)
    for s in res["samples"]["sensepack_ppl"]:
        text_ids = _ids(env, s["doc"]["text"])
        assert s["resps"][0][0] == pytest.approx(want([tok.eos_token_id], text_ids), abs=1e-3)
