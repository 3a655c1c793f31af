"""The shared vocabulary is the pairing's tokenizer, not GPT-2's 50257.

A small real byte-level BPE tokenizer is trained here on the repo's gate corpus (|U| ≈ 400, with
SmolLM2's special-token layout: "<|endoftext|>" = 0 separates documents, "<|im_end|>" is EOS), paired
with a tiny Backpack of exactly |U| rows and a tiny random Llama (SmolLM2's architecture) with MORE
rows than |U|: the ensemble, the server and train_edits all work on U = [0, |U|).
"""

from __future__ import annotations

import json

import grpc
import pytest
import torch
from click.testing import CliRunner

from ensemble.backpack import BackpackConfig, BackpackLM
from ensemble.edits import PackRef, SenseEdits
from ensemble.ensemble import Ensemble
from ensemble.tokenizer import PACKAGED_TOKENIZER_DIR, load_tokenizer, tokenizer_fingerprint
from ensemble.vocab import Vocabulary
from tests.conftest import REPO

CORPUS = REPO / "serve" / "data" / "gate_corpus.txt"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EXTRA_ROWS = 37  # the large model's padding rows past U


def build_bpe_tokenizer(folder, vocab_size: int = 400):
    """Train a byte-level BPE on the gate corpus and save it as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(CORPUS.read_text().splitlines(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>").save_pretrained(
        str(folder)
    )
    return load_tokenizer(str(folder))


def tiny_llama(rows: int, seed: int = 0, pad_bias: float | None = None, eos: tuple[int, float] | None = None):
    """A random LlamaForCausalLM (SmolLM2's architecture) with `rows` output rows; optionally a bias
    on the lm_head that makes the rows past U (pad_bias) or one id (eos) win every argmax."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # transformers types LlamaConfig by its declared fields (dataclass_transform), but at runtime its wrapped
    # __init__ also takes PreTrainedConfig's kwargs (attn_implementation among them): the signature is wrong.
    cfg = LlamaConfig(  # type: ignore[call-arg]
        vocab_size=rows,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).eval()
    if pad_bias is not None or eos is not None:
        head = torch.nn.Linear(cfg.hidden_size, rows, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            if pad_bias is not None:
                head.bias[rows - EXTRA_ROWS :] = pad_bias
            if eos is not None:
                head.bias[eos[0]] = eos[1]
        model.lm_head = head
    return model


@pytest.fixture(scope="module")
def pairing(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe-tokenizer")
    tok = build_bpe_tokenizer(folder)
    V = len(tok)
    torch.manual_seed(0)
    backpack = BackpackLM(BackpackConfig.tiny(vocab_size=V, n_positions=64)).eval()
    return {"folder": folder, "tok": tok, "V": V, "backpack": backpack, "large": tiny_llama(V + EXTRA_ROWS)}


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _pack(pairing, word=" river", seed=0, scale=3.0, beta=0.8, name="p"):
    """Random Δ on every sense of `word`'s tokens."""
    bp = pairing["backpack"]
    k, d = bp.config.num_senses, bp.config.n_embd
    toks = _ids(pairing["tok"], word)
    g = torch.Generator().manual_seed(seed)
    edits = SenseEdits(
        torch.tensor([t for t in toks for _ in range(k)]),
        torch.tensor(list(range(k)) * len(toks)),
        torch.randn(len(toks) * k, d, generator=g) * scale,
    )
    return PackRef(name, "v1", edits, beta)


# ---------------------------------------------------------------------------------------- the vocabulary


def test_vocabulary_comes_from_the_tokenizer(pairing):
    tok, V = pairing["tok"], pairing["V"]
    assert 300 <= V <= 500 and Vocabulary.gpt2().size != V
    vocab = Vocabulary.from_tokenizer(tok)
    assert vocab.size == V
    assert vocab.eos_id == tok.convert_tokens_to_ids("<|im_end|>") == 2
    assert vocab.doc_sep_id == tok.convert_tokens_to_ids("<|endoftext|>") == 0
    assert vocab.fingerprint == tokenizer_fingerprint(tok) != tokenizer_fingerprint(load_tokenizer())
    gpt2 = Vocabulary.from_tokenizer(load_tokenizer())
    assert (gpt2.size, gpt2.eos_id, gpt2.doc_sep_id) == (50257, 50256, 50256)
    ens = Ensemble(pairing["large"], pairing["backpack"], tok)
    assert ens.vocab == vocab


@pytest.mark.parametrize("short", ["backpack", "large model"])
def test_a_pairing_that_does_not_cover_the_tokenizer_is_refused(pairing, short):
    V = pairing["V"]
    torch.manual_seed(0)
    bp = BackpackLM(BackpackConfig.tiny(vocab_size=V - 1 if short == "backpack" else V, n_positions=64))
    large = tiny_llama(V - 5 if short == "large model" else V + EXTRA_ROWS)
    rows = V - 1 if short == "backpack" else V - 5
    with pytest.raises(ValueError) as ei:
        Ensemble(large, bp, pairing["tok"])
    msg = str(ei.value)
    assert msg.startswith(short + ":") and f"{rows} rows" in msg and f"tokenizer's {V} ids" in msg


def test_out_of_range_ids_are_refused(pairing):
    V = pairing["V"]
    ens = Ensemble(pairing["large"], pairing["backpack"], pairing["tok"])
    batch = ens.new_batch()
    with pytest.raises(
        ValueError, match=rf"prompt_ids\[1\]: token id {V} outside the tokenizer's vocabulary \[0, {V}\)"
    ):
        batch.add(0, [5, V], [])
    batch.add(0, [5, 6], [])
    with pytest.raises(ValueError, match=rf"outside \[0, {V}\)"):
        batch.append({0: V + 3})
    with pytest.raises(ValueError, match=rf"row 0 has a token id outside the tokenizer's vocabulary \[0, {V}\)"):
        ens.score([[5, 6]], [[V]], [[]])


# ---------------------------------------------------------------------------------------- the ensemble


@torch.no_grad()
def naive_logprobs(large, backpack, tokens, packs, V):
    """The paper's formula from two full Backpack forwards over the whole prefix (one with the edits):
    log_softmax_U(z + Σ β (log p_ft − log p_pre))."""
    ids = torch.tensor([tokens])
    total = large(ids).logits[0, -1, :V].float()
    pre = torch.log_softmax(backpack(ids).logits[0, -1], -1)
    for p in packs:
        ft = torch.log_softmax(backpack(ids, sense_edits=p.edits).logits[0, -1], -1)
        total = total + p.beta * (ft - pre)[:V]
    return torch.log_softmax(total, -1)


def test_cached_alpha_ensemble_equals_the_naive_formula_on_a_non_gpt2_pairing(pairing):
    tok, V, bp, large = pairing["tok"], pairing["V"], pairing["backpack"], pairing["large"]
    ens = Ensemble(large, bp, tok)
    pack = _pack(pairing)
    prompts = [
        _ids(tok, "In the spring the river floods the lower fields"),
        _ids(tok, "The committee met on"),
        _ids(tok, "She sat by the river"),
    ]
    packs = [[pack], [pack], []]
    assert not set(prompts[1]) & set(pack.edits.token_ids.tolist())  # row 1: no edited token (exact skip)
    batch = ens.new_batch()
    for i, (p, pk) in enumerate(zip(prompts, packs, strict=True)):
        batch.add(i, p, pk)
    seqs = [list(p) for p in prompts]
    for _ in range(4):
        lp = batch.logprobs()
        assert lp.shape == (3, V)
        for row, sid in enumerate(batch.seq_ids):
            ref = naive_logprobs(large, bp, seqs[sid], packs[sid], V)
            torch.testing.assert_close(lp[row], ref, atol=1e-5, rtol=0)
            if not (set(seqs[sid]) & set(pack.edits.token_ids.tolist())) or not packs[sid]:
                z = large(torch.tensor([seqs[sid]])).logits[0, -1, :V].float()
                torch.testing.assert_close(lp[row], torch.log_softmax(z, -1), atol=1e-5, rtol=0)
        nxt = lp.argmax(-1).tolist()
        for sid, t in zip(batch.seq_ids, nxt, strict=True):
            seqs[sid].append(t)
        batch.append(dict(zip(batch.seq_ids, nxt, strict=True)))
    assert ens.stats.exact_skip_rows > 0 and ens.stats.backpack_calls > 0
    # teacher-forced scoring agrees with the same formula
    prefix, cont = prompts[0], _ids(tok, " and farmers wait")
    got = ens.score([prefix], [cont], [[pack]])[0]
    want = torch.stack([naive_logprobs(large, bp, prefix + cont[:i], [pack], V)[t] for i, t in enumerate(cont)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_greedy_never_emits_an_id_outside_the_tokenizer(pairing):
    tok, V = pairing["tok"], pairing["V"]
    large = tiny_llama(V + EXTRA_ROWS, pad_bias=1e4)
    prompt = _ids(tok, "The river")
    with torch.no_grad():
        assert int(large(torch.tensor([prompt])).logits[0, -1].argmax()) >= V  # the padding rows win alone
    ens = Ensemble(large, pairing["backpack"], tok)
    out = ens.generate_greedy([prompt, prompt], [[], [_pack(pairing)]], 12)
    assert all(0 <= t < V for row in out for t in row) and all(len(row) == 12 for row in out)


# ---------------------------------------------------------------------------------------- the server


def _served(pairing, large=None):
    from serve.models import Served

    ens = Ensemble(large or pairing["large"], pairing["backpack"], pairing["tok"])
    return Served(ens, pairing["tok"], "tiny-llama-bpe", "tiny-backpack-bpe")


def test_server_refuses_a_pack_built_for_another_tokenizer_and_keeps_the_previous_one(pairing, tmp_path):
    from edits_store.format import CalibrationEntry, build_pack
    from edits_store.store import open_store
    from sensepack_proto import admin_pb, admin_pb_grpc, pb, pb_grpc
    from sensepack_testing.serve import auth, channel, publish_edits, running_server
    from serve.client import build_generate_request

    served, V, tok = _served(pairing), pairing["V"], pairing["tok"]
    assert served.vocab.size == V
    store = open_store(str(tmp_path))
    good = _pack(pairing, beta=1.0)
    v1 = publish_edits(store, served, "rivers", good.edits, beta=1.0, alias="prod")
    bp = served.ensemble.backpack
    gpt2_fp = tokenizer_fingerprint(load_tokenizer())
    cal = CalibrationEntry(
        target_model=served.large_name,
        target_fingerprint=served.ensemble.large_fingerprint(),
        beta=1.0,
        ball_ratio=1.0,
        g_fingerprint="test",
        g_tokens=0,
        epsilon=0.05,
    )
    other = build_pack(
        "rivers",
        good.edits.token_ids,
        good.edits.sense_ids,
        good.edits.deltas.float() * 2,
        backpack_name=served.backpack_name,
        backpack_fingerprint=bp.fingerprint(),
        tokenizer_fingerprint=gpt2_fp,
        vocab_size=bp.config.vocab_size,
        num_senses=bp.config.num_senses,
        epsilon=0.05,
        calibration=[cal],
        training={"source": "test"},
    )
    v2 = store.publish(other)
    prompt = _ids(tok, "She sat by the river")
    want = served.ensemble.generate_greedy([prompt], [[PackRef("rivers", v1, good.edits, 1.0)]], 6)[0]

    with running_server(
        tmp_path, served, **{"packs.preload": ["rivers@prod"], "gate.enabled": False, "ab.enabled": False}
    ) as server:
        ch = channel(server)
        stub, adm = pb_grpc.GenerationServiceStub(ch), admin_pb_grpc.PackAdminStub(ch)
        info = stub.ModelInfo(pb.ModelInfoRequest())
        assert (info.shared_vocab_size, info.eos_token_id) == (V, 2)
        assert info.tokenizer_fingerprint == served.vocab.fingerprint
        with pytest.raises(grpc.RpcError) as ei:
            adm.SetAlias(admin_pb.SetAliasRequest(name="rivers", alias="prod", version=v2), metadata=auth())
        details = ei.value.details()
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "tokenizer" in details and gpt2_fp in details and served.vocab.fingerprint in details, details
        r = stub.Generate(
            build_generate_request(prompt, packs=["rivers@prod"], max_new_tokens=6, ignore_eos=True, tokens=True)
        )
        assert [(u.name, u.version) for u in r.packs] == [("rivers", v1)]
        assert [t.id for t in r.tokens] == want
        # ids and top_k are bounded by this tokenizer, not by GPT-2's 50257
        with pytest.raises(grpc.RpcError) as ei:
            stub.Generate(build_generate_request([5, V], base_only=True, max_new_tokens=2))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ei.value.details().startswith("token_ids.ids[1]:") and f"[0, {V})" in ei.value.details()
        with pytest.raises(grpc.RpcError) as ei:
            stub.Generate(build_generate_request([5], base_only=True, max_new_tokens=2, greedy=False, top_k=V + 1))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.top_k" in ei.value.details()


def test_server_stops_on_the_tokenizers_eos(pairing, tmp_path):
    from sensepack_proto import pb, pb_grpc
    from sensepack_testing.serve import channel, running_server
    from serve.client import build_generate_request

    V, eos = pairing["V"], 2
    served = _served(pairing, large=tiny_llama(V + EXTRA_ROWS, pad_bias=1e4, eos=(eos, 1e3)))
    with running_server(tmp_path, served, **{"gate.enabled": False, "ab.enabled": False}) as server:
        stub = pb_grpc.GenerationServiceStub(channel(server))
        r = stub.Generate(build_generate_request("The river", base_only=True, max_new_tokens=5, tokens=True))
        assert [t.id for t in r.tokens] == [eos] and r.stop_reason == pb.EOS_TOKEN
        r = stub.Generate(
            build_generate_request("The river", base_only=True, max_new_tokens=5, tokens=True, ignore_eos=True)
        )
        assert [t.id for t in r.tokens] == [eos] * 5 and r.stop_reason == pb.MAX_TOKENS


# ---------------------------------------------------------------------------------------- train_edits


@pytest.fixture(scope="module")
def run_inputs(pairing, tmp_path_factory):
    """Corpora made with the BPE tokenizer and with GPT-2's, a Backpack folder carrying its tokenizer,
    a large-model folder and a small custom task."""
    from train_edits.cli import main

    d = tmp_path_factory.mktemp("run-inputs")
    docs = d / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": line}) + "\n" for line in CORPUS.read_text().splitlines()))
    for name, extra in (("bpe", ["--tokenizer", str(pairing["folder"])]), ("gpt2", [])):
        res = CliRunner().invoke(
            main, ["prepare-corpora", str(docs), "--out", str(d / name), "--chunk-len", "24"] + extra
        )
        assert res.exit_code == 0, res.output
    bp_dir = d / "backpack"
    pairing["backpack"].save_pretrained(bp_dir)
    pairing["tok"].save_pretrained(str(bp_dir))  # the run's default tokenizer: the one beside the Backpack
    large_dir = d / "large"
    pairing["large"].save_pretrained(large_dir)
    task = d / "task.jsonl"
    task.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"prefix": "In the spring the river floods the lower", "suffix": " fields"},
                {"prefix": "She opened the window, let the cold", "suffix": " air in"},
                {"prefix": "The committee met on Tuesday to discuss the", "suffix": " budget"},
                {"prefix": "The train was late again, so he called his", "suffix": " sister"},
            ]
        )
    )
    return {"dir": d, "backpack": bp_dir, "large": large_dir, "task": task}


def test_prepare_corpora_with_another_tokenizer(pairing, run_inputs):
    V = pairing["V"]
    meta = json.loads((run_inputs["dir"] / "bpe" / "corpora.json").read_text())
    assert meta["vocab_size"] == V and meta["tokenizer_fingerprint"] == tokenizer_fingerprint(pairing["tok"])
    chunks = [
        json.loads(x)["input_ids"]
        for name in ("G", "R")
        for x in (run_inputs["dir"] / "bpe" / f"{name}.jsonl").read_text().splitlines()
    ]
    flat = [t for c in chunks for t in c]
    assert chunks and all(len(c) == 24 for c in chunks) and all(0 <= t < V for t in flat)
    # documents are separated by the tokenizer's "<|endoftext|>" (id 0), one per document
    assert flat.count(0) >= meta["g_documents"] + meta["r_documents"] - 4
    gpt2 = json.loads((run_inputs["dir"] / "gpt2" / "corpora.json").read_text())
    assert gpt2["vocab_size"] == 50257 and gpt2["tokenizer_fingerprint"] == tokenizer_fingerprint(load_tokenizer())


def _run_args(run_inputs, run_dir, corpus="bpe", extra=()):
    c = run_inputs["dir"] / corpus
    return [
        "run",
        "--train",
        str(run_inputs["task"]),
        "--eval",
        str(run_inputs["task"]),
        "--loss-type",
        "good",
        "--threshold",
        "4.0",
        "--backpack",
        str(run_inputs["backpack"]),
        "--large",
        str(run_inputs["large"]),
        "--g",
        str(c / "G.jsonl"),
        "--r",
        str(c / "R.jsonl"),
        "--g-limit",
        "4",
        "--r-limit",
        "6",
        "--epochs",
        "2",
        "--lr",
        "0.5",
        "--grad-accum",
        "1",
        "-k",
        "2",
        "--epsilon",
        "0.5",
        "--run-dir",
        str(run_dir),
        "--no-progress",
        *extra,
    ]


def test_a_run_on_the_non_gpt2_pairing_records_its_tokenizer(pairing, run_inputs, tmp_path):
    from edits_store.format import read_pack
    from train_edits.cli import main

    res = CliRunner().invoke(main, _run_args(run_inputs, tmp_path / "run"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    fp = tokenizer_fingerprint(pairing["tok"])
    cal = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert cal["tokenizer_fingerprint"] == fp and cal["vocab_size"] == pairing["V"]
    (folder,) = (tmp_path / "run" / "packs").iterdir()
    pack = read_pack(folder)
    assert pack.manifest.tokenizer_fingerprint == fp
    assert all(0 <= t < pairing["V"] for t in pack.token_ids.tolist())


def test_a_run_refuses_a_corpus_made_with_another_tokenizer(pairing, run_inputs, tmp_path):
    from train_edits.cli import main

    res = CliRunner().invoke(main, _run_args(run_inputs, tmp_path / "run", corpus="gpt2"))
    assert res.exit_code == 1, res.output
    assert "tokenizer_fingerprint" in res.output and tokenizer_fingerprint(pairing["tok"]) in res.output
    assert tokenizer_fingerprint(load_tokenizer()) in res.output


def test_a_run_refuses_a_backpack_that_does_not_cover_its_tokenizer(pairing, run_inputs, tmp_path):
    from train_edits.cli import main

    res = CliRunner().invoke(
        main, _run_args(run_inputs, tmp_path / "run", extra=["--tokenizer", str(PACKAGED_TOKENIZER_DIR)])
    )
    assert res.exit_code == 1, res.output
    assert f"vocabulary has {pairing['V']} rows, fewer than the tokenizer's 50257 ids" in res.output
