"""Score, prompt log-probs, the activation gate and the A/B re-scoring through the serving vLLM engine
(serve.vllm.scoring: forced decoding, the processor records base and packed log-probs), with the large
model loaded once, by vLLM.

The server here is built from its config alone (`build_served(..., large_from_checkpoint=...)`), as
`sensepack serve` builds it: the large model is described from its checkpoint, never loaded by
transformers. Oracles:

* `Ensemble.score` / `Ensemble.paired_nll` on the same weights loaded by transformers (the embedded
  engine's numbers). vLLM's GPT-J kernels are not transformers', so they agree to float32 rounding
  (`ABS`), not bit for bit;
* vLLM's own processed log-probs of a greedy generation: the same logits, processor and Backpack state,
  so Score of the generated tokens must equal them to float32 rounding;
* a separate server process, counted with gc: one large model's parameters, none of them transformers'.

Skipped where vLLM is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest

from tests.vllm_gate import require_vllm

require_vllm(in_process=True)

from edits_store.store import open_store  # noqa: E402
from ensemble.backpack import BackpackLM  # noqa: E402
from ensemble.demo import demo_pack, tiny_backpack  # noqa: E402
from ensemble.edits import PackRef, SenseEdits  # noqa: E402
from ensemble.ensemble import Ensemble  # noqa: E402
from ensemble.large_model import load_large_model, model_fingerprint  # noqa: E402
from ensemble.tokenizer import load_tokenizer  # noqa: E402
from sensepack_testing.serve import TOKEN, make_config, publish_edits  # noqa: E402
from sensepack_testing.vllm import save_tiny_gptj  # noqa: E402
from serve.client import Client  # noqa: E402
from serve.config import ModelConfig  # noqa: E402
from serve.models import build_served  # noqa: E402
from serve.vllm.resolver import REGISTRY  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ABS = 2e-5  # vLLM's kernels vs transformers' on the same float32 weights (measured: 2e-6, bench/RESULTS.md)
SAME_PATH = 1e-5  # the same vLLM logits and processor: float32 rounding only
PROMPT = "The capital of Mauritius is"


def _config(tmp: Path, **extra) -> dict:
    model = ModelConfig(profile="pretrained", large_model=str(tmp / "gptj"), backpack=str(tmp / "backpack"))
    cfg = {
        "engine": "vllm",
        "model.profile": "pretrained",
        "model.large_model": model.large_model,
        "model.backpack": model.backpack,
        "vllm.model": str(tmp / "gptj"),
        "vllm.multiprocessing": False,
        "vllm.enforce_eager": True,
        "vllm.max_model_len": 512,
        "limits.max_prompt_tokens": 256,
        "limits.max_new_tokens": 256,
        "packs.preload": ["capitals@prod"],
        "gate.enabled": True,
        "gate.epsilon": 100.0,  # the tiny random pair's ratio is whatever it is: measured, not judged
        "gate.max_texts": 8,
        "gate.corpus": str(ROOT / "tests" / "fixtures" / "gate_mauritius.txt"),  # carries the edited token
        "ab.enabled": True,
        "ab.traffic_share": 1.0,
        "ab.control_share": 0.5,
        "ab.sample_rate": 1.0,
        "ab.min_samples": 1000,
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-score")
    save_tiny_gptj(tmp / "gptj", seed=0)
    tiny_backpack(0).save_pretrained(tmp / "backpack")
    tok = load_tokenizer()
    # the reference pairing, loaded by transformers from the same folders (not the server's)
    large = load_large_model(str(tmp / "gptj"), dtype="float32")
    bp = BackpackLM.from_pretrained(tmp / "backpack").eval()
    ens = Ensemble(large, bp, tok)
    served_ref = build_served(
        ModelConfig(profile="pretrained", large_model=str(tmp / "gptj"), backpack=str(tmp / "backpack"))
    )
    store = open_store(str(tmp / "store"))
    version = publish_edits(store, served_ref, "capitals", demo_pack(bp, tok).edits, beta=1.0, alias="prod")
    loaded = store.load(f"capitals@{version}")
    pack = PackRef("capitals", version, SenseEdits(loaded.token_ids, loaded.sense_ids, loaded.deltas), 1.0)
    return dict(tmp=tmp, tok=tok, ens=ens, large=large, store=store, version=version, pack=pack)


@pytest.fixture(scope="module")
def server(world):
    from serve.server import SensepackServer

    cfg = make_config(world["tmp"] / "store", **_config(world["tmp"]))
    srv = SensepackServer(cfg).start()  # no `served`: built from the config, as `sensepack serve` does
    try:
        yield srv
    finally:
        srv.stop(grace=5.0)
        REGISTRY.clear()


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}", token=TOKEN, timeout=120) as c:
        yield c


def _ids(world, text: str) -> list[int]:
    return world["tok"](text, add_special_tokens=False)["input_ids"]


def test_server_describes_the_large_model_without_loading_it(world, server, client):
    assert server.served.ensemble is None and server.engine.ensemble is None
    info = client.model_info()
    large = next(m for m in info.models if m.role == "large")
    # the checkpoint fingerprint is the loaded model's: packs calibrated with transformers load here
    assert large.fingerprint == model_fingerprint(world["large"])
    assert (large.architecture, large.vocab_size, large.device) == ("GPTJForCausalLM", 50400, "vllm")
    assert {p.version for p in info.active_packs} == {world["version"]}  # preloaded: the gate passed through vLLM


def test_score_through_vllm_equals_the_embedded_ensemble(world, client):
    """Several continuations, one with EOS inside, one past the Backpack's 128-position window."""
    ens, pack, tok = world["ens"], world["pack"], world["tok"]
    prefix = _ids(world, PROMPT)
    conts = [
        _ids(world, " Port Louis, a city of"),
        _ids(world, " Paris.") + [tok.eos_token_id] + _ids(world, " The end"),
        (_ids(world, " Mauritius is an island. ") * 20)[:150],
    ]
    r = client.score(prefix, conts, packs=["capitals@prod"], include_base=True)
    base = ens.score([prefix] * 3, conts, [[]] * 3)
    packed = ens.score([prefix] * 3, conts, [[pack]] * 3)
    for k in range(3):
        got_b, got_p = list(r.continuations[k].base.token_logprobs), list(r.continuations[k].packed.token_logprobs)
        assert len(got_b) == len(got_p) == len(conts[k])
        assert got_b == pytest.approx(base[k].double().tolist(), abs=ABS)
        assert got_p == pytest.approx(packed[k].double().tolist(), abs=ABS)
    assert any(
        abs(a - b) > 0.1
        for a, b in zip(r.continuations[0].base.token_logprobs, r.continuations[0].packed.token_logprobs, strict=True)
    )  # the pack is felt


def test_score_equals_vllms_own_generation_logprobs(world, client):
    """Forced scoring and generation read the same logits through the same processor: Score of what vLLM
    generated greedily equals the log-probs vLLM returned while generating, with the pack and without."""
    for packs in (["capitals@prod"], []):
        g = client.generate(PROMPT, packs=packs, max_new_tokens=40, ignore_eos=True, tokens=True, logprobs=True)
        out = [t.id for t in g.tokens]
        r = client.score(_ids(world, PROMPT), [out], packs=packs, include_base=True)
        served_pack = bool(packs) and g.packs[0].arm == "pack"  # every request is in the A/B experiment here
        side = r.continuations[0].packed if served_pack else r.continuations[0].base
        assert list(side.token_logprobs) == pytest.approx([t.logprob for t in g.tokens], abs=SAME_PATH)


def test_prompt_logprobs_through_vllm(world, client):
    from serve.client import build_generate_request

    req = build_generate_request(PROMPT, packs=["capitals@prod"], max_new_tokens=1)
    req.response.prompt_logprobs = True
    g = client.gen.Generate(req, timeout=120)
    ids = _ids(world, PROMPT)
    packs = [world["pack"]] if g.packs[0].arm == "pack" else []  # the A/B arm this request was served by
    ref = world["ens"].score([ids[:1]], [ids[1:]], [packs])[0]
    assert list(g.prompt_logprobs) == pytest.approx(ref.double().tolist(), abs=ABS)


def test_gate_ratio_through_vllm_equals_the_embedded_one(world, server):
    r = server.packs.routes()["capitals@prod"]
    assert r.gate is not None and r.gate.tokens == server.gate.tokens
    base, packed = world["ens"].paired_nll(server.gate.rows, [world["pack"]])
    assert r.gate.ratio == pytest.approx(sum(packed) / sum(base), rel=1e-5)
    assert abs(r.gate.ratio - 1.0) > 1e-3  # the corpus carries the edited token: not an exact skip


def test_ab_samples_are_scored_through_vllm(world, server, client):
    """Every request with packs is in the experiment (traffic_share 1, ab_key defaults to the request id)
    and sampled: the monitor's sums grow by the paired NLL of exactly these rows."""
    assert server.monitor.flush(timeout=120)
    before = server.monitor.report().get(("capitals", world["version"]))
    n0, a0, b0 = (before.moments.n, before.moments.mean_a, before.moments.mean_b) if before else (0, 0.0, 0.0)
    rows = []
    ids = _ids(world, PROMPT)
    for i in range(6):
        g = client.generate(PROMPT, packs=["capitals@prod"], ab_key=f"user-{i}", max_new_tokens=6, tokens=True)
        arm = g.packs[0].arm
        rows.append(ids + [t.id for t in g.tokens] if arm == "base" else list(ids))
    assert server.monitor.flush(timeout=120)
    st = server.monitor.report()[("capitals", world["version"])]
    assert st.samples == n0 + len(rows)
    a, b = world["ens"].paired_nll(rows, [world["pack"]])
    n = st.moments.n
    assert n * st.moments.mean_a - n0 * a0 == pytest.approx(sum(a), rel=1e-5)
    assert n * st.moments.mean_b - n0 * b0 == pytest.approx(sum(b), rel=1e-5)
    assert sum(b) != pytest.approx(sum(a), rel=1e-4)  # the prompt carries the edited token


def test_a_scores_continuations_run_together(world, server, client):
    """On vLLM a Score's continuations are rows of one batch: three 60-token continuations take about 60
    engine steps, not 180 (one after another, as the embedded engine scores them)."""
    prefix = _ids(world, PROMPT)
    conts = [(_ids(world, f" and the {w} is calm") * 20)[:60] for w in ("sea", "sky", "town")]
    before = server.engine.decode_steps
    r = client.score(prefix, conts, packs=["capitals@prod"], include_base=True)
    steps = server.engine.decode_steps - before
    assert [len(c.packed.token_logprobs) for c in r.continuations] == [60, 60, 60]
    assert 60 <= steps < 120, steps
    ref = world["ens"].score([prefix] * 3, conts, [[world["pack"]]] * 3)
    for k in range(3):
        assert list(r.continuations[k].packed.token_logprobs) == pytest.approx(ref[k].double().tolist(), abs=ABS)


def test_decoding_goes_on_while_a_long_score_runs(world, server):
    """A 200-token Score and a 10-token generation enter together: the generation finishes while the Score
    is still being scored (forced rows are ordinary rows of vLLM's batch; nothing waits for the Score)."""
    from serve import engine as eng
    from serve.params import GenerationRequest
    from serve.sampling_params import SamplingParams

    ids = _ids(world, PROMPT)
    long = (_ids(world, " and the sea is blue") * 50)[:200]
    job = server.components.scorer.score(ids, long, [world["pack"]], True, True)
    seq = server.engine.submit(
        GenerationRequest(
            request_id="beside", prompt_ids=ids, packs=[], sampling=SamplingParams(max_new_tokens=10, ignore_eos=True)
        ),
        [],
    )
    while not isinstance(ev := seq.events.get(timeout=120), eng.FinishEvent):
        pass
    assert len(ev.output_ids) == 10
    assert not job.future.done()  # the Score is still running: the generation did not wait for it
    base, packed = job.result(timeout=300)
    assert len(base) == len(packed) == 200


def test_an_abandoned_score_leaves_nothing_behind(world, server, client):
    long = (_ids(world, " and so on") * 80)[:240]
    with pytest.raises(grpc.RpcError) as ei:
        client.score(_ids(world, PROMPT), [long], packs=["capitals@prod"], timeout=0.3)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    runner = server.engine.runner
    deadline = time.monotonic() + 30
    while runner.busy() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not runner.busy()  # aborted in vLLM, no pending record
    # the processor dropped the record once the engine synced the finished id
    deadline = time.monotonic() + 30
    while any(p.core._scores for p in REGISTRY.processors) and time.monotonic() < deadline:
        client.generate(PROMPT, max_new_tokens=1)
    assert not any(p.core._scores for p in REGISTRY.processors)
    r = client.score(_ids(world, PROMPT), [_ids(world, " Port Louis")], packs=["capitals@prod"])
    assert len(r.continuations[0].packed.token_logprobs) == len(_ids(world, " Port Louis"))


_COUNT = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    from transformers import PreTrainedModel
    from sensepack_testing.serve import make_config
    from serve.server import SensepackServer
    from serve.client import Client

    cfg = make_config(sys.argv[1], **json.loads(sys.argv[2]))
    srv = SensepackServer(cfg).start()
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=120) as c:
            r = c.score("The capital of Mauritius is", [" Port Louis"], packs=["capitals@prod"], include_base=True)
            scored = len(r.continuations[0].packed.token_logprobs)
        gc.unfreeze()  # vLLM freezes what exists after its start-up: get_objects() would miss it
        gc.collect()
        mods = [o for o in gc.get_objects() if isinstance(o, torch.nn.Module)]
        out = {
            "scored": scored,
            "transformers_models": sorted(type(m).__name__ for m in mods if isinstance(m, PreTrainedModel)),
            "causal_lms": [
                [type(m).__module__, type(m).__name__, sum(p.numel() for p in m.parameters())]
                for m in mods
                if type(m).__name__.endswith("ForCausalLM")
            ],
        }
        print("RESULT " + json.dumps(out), flush=True)
    finally:
        srv.stop(grace=5.0)
    """
)


def test_the_server_process_holds_one_copy_of_the_large_model(world):
    """Counted in a server process of its own (this test process holds the reference copy): exactly one
    GPT-J module, vLLM's, with the large model's parameters; no transformers model at all."""
    overrides = _config(world["tmp"], **{"gate.enabled": False, "ab.enabled": False})
    env = dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
    )
    proc = subprocess.run(
        [sys.executable, "-c", _COUNT, str(world["tmp"] / "store"), json.dumps(overrides)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stderr[-4000:]
    out = json.loads(line[len("RESULT ") :])
    assert out["scored"] == len(_ids(world, " Port Louis"))
    assert out["transformers_models"] == []
    n_large = sum(p.numel() for p in world["large"].parameters())
    assert len(out["causal_lms"]) == 1, out["causal_lms"]
    module, name, n = out["causal_lms"][0]
    assert module.startswith("vllm.") and name == "GPTJForCausalLM"
    # its parameters hold the embedding and the LM head (vLLM pads their rows to a multiple of 64; its CPU
    # backend repacks the linear layers' weights out of Parameters, so those are not all counted here)
    rows, d = world["large"].config.vocab_size, world["large"].config.n_embd
    assert 2 * rows * d <= n <= n_large + 2 * 64 * (d + 1)
