"""The Backpack trainer: DDP equals one process, exact resume, a loadable output
whose held-out NLL recomputes, the distillation loss by hand, clear errors, and learning."""

from __future__ import annotations

import json
import math
import os
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ensemble.backpack import BackpackLM
from ensemble.tokenizer import load_tokenizer, tokenizer_fingerprint
from sensepack_testing import backpack_train_command
from train_edits.backpack_trainer.config import BackpackTrainConfig, TrainConfigError
from train_edits.backpack_trainer.distill import init_embeddings_from, lm_losses
from train_edits.backpack_trainer.trainer import train_backpack
from train_edits.cli import main as cli_main
from train_edits.tasks import DataError

from .conftest import FIXTURES, REPO

CORPUS = FIXTURES / "backpack-corpus"
INPUTS = [str(CORPUS / "docs.jsonl"), str(CORPUS / "more.txt")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is several times faster on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """A 384-token byte-level BPE trained on the fixture corpus: a non-GPT-2 tokenizer, small and fast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (CORPUS / "docs.jsonl").read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    folder = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(
        folder
    )
    return folder


def tiny(out: Path, tokenizer, **kw) -> BackpackTrainConfig:
    base: dict[str, Any] = dict(  # BackpackTrainConfig's fields, of mixed types
        out=str(out),
        inputs=INPUTS,
        tokenizer=str(tokenizer) if tokenizer else None,
        n_embd=32,
        n_layer=2,
        n_head=4,
        num_senses=4,
        n_positions=32,
        sense_intermediate_scale=2,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        heldout_fraction=0.1,
        eval_every=0,
        checkpoint_every=0,
        eval_max_blocks=16,
        cache_dir=str(out / "cache"),
    )
    base.update(kw)
    return BackpackTrainConfig(**base)


def train_losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["event"] == "train"]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


# ------------------------------------------------------------------------------- (a) 2 processes


def torchrun(cfg: BackpackTrainConfig, nproc: int = 2) -> None:
    cfg_file = Path(cfg.out + ".json")
    cfg_file.write_text(json.dumps(asdict(cfg)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = backpack_train_command(str(cfg_file), nproc)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, bpe_dir):
    """torchrun --nproc_per_node 2 (gloo) follows the 1-process loss trajectory for the same global batch."""
    train_backpack(tiny(tmp_path / "one", bpe_dir, max_steps=6, grad_accum=2), progress=False)
    torchrun(tiny(tmp_path / "two", bpe_dir, max_steps=6, grad_accum=2))
    rec = json.loads((tmp_path / "two" / "training.json").read_text())
    assert rec["world_size"] == 2
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert a[-1] < a[0]  # it trained
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5, (a, b)
    assert max_weight_diff(tmp_path / "one", tmp_path / "two") < 1e-5
    nll_one = json.loads((tmp_path / "one" / "training.json").read_text())["heldout"]["nll"]
    assert abs(rec["heldout"]["nll"] - nll_one) < 1e-5
    # A 1-process checkpoint resumes on 2 processes onto the same trajectory.
    train_backpack(tiny(tmp_path / "mixed", bpe_dir, max_steps=3, decay_steps=6, grad_accum=2), progress=False)
    torchrun(tiny(tmp_path / "mixed", bpe_dir, max_steps=6, decay_steps=6, grad_accum=2, resume=True))
    c = train_losses(tmp_path / "mixed")
    assert len(c) == 6 and max(abs(x - y) for x, y in zip(a, c, strict=True)) < 1e-5, (a, c)
    assert max_weight_diff(tmp_path / "one", tmp_path / "mixed") < 1e-5


# ---------------------------------------------------------------------------------- (b) resume


def test_resume_equals_straight_through(tmp_path, bpe_dir):
    """N steps, stop, resume to 2N == 2N straight: same losses, same weights (dropout on: seeded per step)."""
    n = 5
    drop = dict(attn_pdrop=0.1, embd_pdrop=0.1, resid_pdrop=0.1, grad_accum=2, decay_steps=2 * n)
    train_backpack(tiny(tmp_path / "straight", bpe_dir, max_steps=2 * n, **drop), progress=False)
    train_backpack(tiny(tmp_path / "resumed", bpe_dir, max_steps=n, **drop), progress=False)
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text().strip() == f"step-{n:08d}.pt"
    train_backpack(tiny(tmp_path / "resumed", bpe_dir, max_steps=2 * n, resume=True, **drop), progress=False)
    straight = train_losses(tmp_path / "straight")
    resumed = train_losses(tmp_path / "resumed")
    assert len(straight) == len(resumed) == 2 * n
    assert max(abs(x - y) for x, y in zip(straight, resumed, strict=True)) <= 1e-6
    assert max_weight_diff(tmp_path / "straight", tmp_path / "resumed") <= 1e-6
    assert json.loads((tmp_path / "resumed" / "training.json").read_text())["steps"] == 2 * n


def test_resume_refuses_another_model_shape(tmp_path, bpe_dir):
    train_backpack(tiny(tmp_path / "r", bpe_dir, max_steps=1), progress=False)
    with pytest.raises(TrainConfigError, match="resume: n_layer"):
        train_backpack(tiny(tmp_path / "r", bpe_dir, max_steps=2, n_layer=3, resume=True), progress=False)


# --------------------------------------------------------------------- (c) output folder, held-out NLL


def test_output_folder_loads_and_heldout_nll_recomputes(tmp_path):
    """GPT-2's packaged tokenizer: from_pretrained loads the folder; a manual CE over the saved held-out
    blocks gives training.json's NLL; the recipe names the tokenizer and corpus files."""
    out = tmp_path / "gpt2"
    train_backpack(tiny(out, None, max_steps=3), progress=False)
    rec = json.loads((out / "training.json").read_text())
    model = BackpackLM.from_pretrained(out)
    tok = load_tokenizer(out)
    assert tokenizer_fingerprint(tok) == rec["tokenizer"]["fingerprint"] == tokenizer_fingerprint(load_tokenizer())
    assert model.config.vocab_size == 50304 and rec["tokenizer"]["size"] == 50257  # padded to a multiple of 64
    blocks = load_file(out / "heldout_blocks.safetensors")["blocks"].long()
    assert blocks.shape[1] == 32 and rec["heldout"]["blocks"] == len(blocks)
    with torch.no_grad():
        logits = model(blocks).logits.double()[:, :-1, :50257]
    target = blocks[:, 1:]
    picked = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    nll = (torch.logsumexp(logits, dim=-1) - picked).mean().item()
    assert abs(nll - rec["heldout"]["nll"]) < 1e-5
    assert abs(math.exp(nll) - rec["heldout"]["ppl"]) / rec["heldout"]["ppl"] < 1e-5
    assert rec["heldout"]["scored_tokens"] == target.numel()
    files = [s["file"] for s in rec["corpus"]["sources"]]
    assert files == INPUTS and all(s["sha256"].startswith("sha256:") for s in rec["corpus"]["sources"])
    assert rec["steps"] == 3 and rec["tokens_seen"] == 3 * 4 * 32
    assert rec["config"]["n_embd"] == 32 and rec["torch"] == torch.__version__
    assert (out / "loss.png").stat().st_size > 0


def test_documents_split_by_document_and_separated(tmp_path, bpe_dir):
    """Held-out blocks come from documents that never reach the train blocks; documents are joined by the separator."""
    from ensemble.vocab import Vocabulary
    from train_edits.backpack_trainer.data import prepare_corpus
    from train_edits.corpora import read_documents as read_corpus

    cfg = tiny(tmp_path, bpe_dir)
    tok = load_tokenizer(bpe_dir)
    data = prepare_corpus(cfg, tok, Vocabulary.from_tokenizer(tok))
    docs = read_corpus(INPUTS)
    assert data.meta["documents"] == len(docs) == 52  # 48 JSONL lines + 4 separated .txt documents
    assert data.meta["heldout_documents"] == 5
    train_text = tok.decode(data.train.flatten().tolist())
    held_text = tok.decode(data.heldout.flatten().tolist())
    unique = [d for d in docs if sum(d in other for other in docs) == 1]  # the templates repeat some documents
    held_docs = [d for d in unique if d in held_text]
    assert len(held_docs) >= 3 and not any(d in train_text for d in held_docs)
    assert data.train.flatten().tolist().count(0) >= 40  # separator id 0 before each train document


# ------------------------------------------------------------------------------- (d) distillation


def test_distillation_loss_equals_hand_computed_value():
    """|U| = 3 (row 3 is padding), one block [0, 2, 1], k = 2."""
    logits = torch.tensor([[[1.0, 2.0, 0.0, 9.0], [0.5, 0.0, -1.0, 9.0], [0.0, 0.0, 0.0, 9.0]]])
    blocks = torch.tensor([[0, 2, 1]])
    t_ids = torch.tensor([[[1, 0], [2, 1]]])
    t_lp = torch.tensor([[[math.log(0.6), math.log(0.2)], [math.log(0.5), math.log(0.3)]]])

    def logp(row, i):  # log-softmax over U = {0, 1, 2}; the padding logit 9.0 is not in U
        return row[i] - math.log(sum(math.exp(v) for v in row[:3]))

    r0, r1 = [1.0, 2.0, 0.0], [0.5, 0.0, -1.0]
    ce = -(logp(r0, 2) + logp(r1, 1)) / 2
    q0 = [0.6 / 0.8, 0.2 / 0.8]
    q1 = [0.5 / 0.8, 0.3 / 0.8]
    kd = -((q0[0] * logp(r0, 1) + q0[1] * logp(r0, 0)) + (q1[0] * logp(r1, 2) + q1[1] * logp(r1, 1))) / 2
    got_ce, got_kd = lm_losses(logits, blocks, 3, t_ids, t_lp)
    assert abs(got_ce.item() - ce) < 1e-6
    assert abs(got_kd.item() - kd) < 1e-6
    assert lm_losses(logits, blocks, 3)[1] is None


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, bpe_dir) -> Path:
    """A tiny random GPT-J over the BPE vocabulary, saved with that tokenizer."""
    from ensemble.large_model import tiny_gptj

    tok = load_tokenizer(bpe_dir)
    folder = tmp_path_factory.mktemp("teacher")
    tiny_gptj(seed=3, vocab_size=len(tok) + 16, bos_token_id=0, eos_token_id=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_distillation_cache_holds_teacher_topk_and_equals_on_the_fly(tmp_path, bpe_dir, teacher_dir):
    from ensemble.large_model import load_large_model

    kw = dict(max_steps=3, distill_from=str(teacher_dir), distill_topk=5, distill_weight=0.7)
    cached = tiny(tmp_path / "cached", bpe_dir, distill_cache="on", **kw)
    train_backpack(cached, progress=False)
    fly = tiny(tmp_path / "fly", bpe_dir, distill_cache="off", **kw)
    train_backpack(fly, progress=False)
    rec = json.loads((tmp_path / "cached" / "training.json").read_text())
    cache = load_file(rec["teacher"]["cache_file"])
    # Independent: the teacher's full forward on one train block, log_softmax over U, top 5.
    data = torch.load(next((tmp_path / "cached" / "data").glob("blocks-*.pt")), weights_only=False)
    teacher = load_large_model(str(teacher_dir))
    with torch.no_grad():
        z = teacher(input_ids=data["train"][:2].long()).logits[:, :-1, :384].double()
    lp = torch.log_softmax(z, dim=-1)
    top = lp.topk(5, dim=-1)
    assert torch.equal(cache["ids"][:2].long(), top.indices)
    assert torch.allclose(cache["logprobs"][:2].double(), top.values, atol=1e-5)
    a, b = train_losses(tmp_path / "cached"), train_losses(tmp_path / "fly")
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    recs = [json.loads(line) for line in (tmp_path / "cached" / "log.jsonl").read_text().splitlines()]
    first = next(r for r in recs if r["event"] == "train")
    assert abs(first["loss"] - (0.3 * first["ce"] + 0.7 * first["kd"])) < 1e-5


def test_init_embeddings_copy_and_pca():
    from ensemble.backpack import BackpackConfig

    torch.manual_seed(0)
    big = torch.randn(70, 12) * torch.linspace(3, 0.1, 12)
    model = BackpackLM(BackpackConfig.tiny(vocab_size=80, n_embd=12, n_head=4, num_senses=4))
    init_embeddings_from(model, big, "large", 64)
    assert torch.equal(model.embedding[:64], big[:64])
    small = BackpackLM(BackpackConfig.tiny(vocab_size=80, n_embd=8, n_head=4, num_senses=4))
    init_embeddings_from(small, big, "large-pca", 64)
    rows = small.embedding[:64].detach().double()
    centred = (big[:64] - big[:64].mean(0)).double()
    # The top-8 principal directions keep the top-8 singular values (up to the common rescale).
    sv_rows = torch.linalg.svdvals(rows)
    sv_src = torch.linalg.svdvals(centred)[:8]
    assert torch.allclose(sv_rows / sv_rows[0], sv_src / sv_src[0], atol=1e-5)
    assert abs(rows.std().item() - 0.02) < 1e-6 and rows.mean(0).abs().max() < 1e-6
    with pytest.raises(TrainConfigError, match="width 12 to equal n_embd 8"):
        init_embeddings_from(small, big, "large", 64)


# --------------------------------------------------------------------------------- (e) bad options


def test_bad_options_give_clear_errors(tmp_path, bpe_dir):
    with pytest.raises(DataError, match=r"nope\.jsonl: corpus file not found"):
        train_backpack(tiny(tmp_path / "a", bpe_dir, inputs=[str(tmp_path / "nope.jsonl")], max_steps=1))
    with pytest.raises(TrainConfigError, match=r"block_len: 64 must be in \[2, n_positions=32\]"):
        train_backpack(tiny(tmp_path / "b", bpe_dir, block_len=64, max_steps=1))
    with pytest.raises(TrainConfigError, match="max_steps: give a budget"):
        train_backpack(tiny(tmp_path / "c", bpe_dir))
    with pytest.raises(TrainConfigError, match=r"batch_size: 4 is not divisible by grad_accum 3"):
        train_backpack(tiny(tmp_path / "d", bpe_dir, grad_accum=3, max_steps=1))
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'text': missing"):
        train_backpack(tiny(tmp_path / "e", bpe_dir, inputs=[str(bad_jsonl)], max_steps=1))


def test_teacher_with_another_tokenizer_is_refused(tmp_path, bpe_dir):
    from ensemble.large_model import tiny_gptj

    gpt2_teacher = tmp_path / "gpt2-teacher"
    tiny_gptj(seed=1).save_pretrained(gpt2_teacher)
    load_tokenizer().save_pretrained(gpt2_teacher)
    with pytest.raises(TrainConfigError, match=r"tokenizer \(50257 ids.*differs from the Backpack's \(384 ids"):
        train_backpack(tiny(tmp_path / "t", bpe_dir, max_steps=1, distill_from=str(gpt2_teacher)))


def test_cli_exit_codes_and_help(tmp_path, bpe_dir):
    runner = CliRunner()
    ok = runner.invoke(cli_main, ["backpack", "train", "--help"])
    assert ok.exit_code == 0 and "--distill-from" in ok.output and "--init-embeddings" in ok.output
    usage = runner.invoke(
        cli_main,
        [
            "backpack",
            "train",
            *INPUTS,
            "--tokenizer",
            str(bpe_dir),
            "--n-positions",
            "32",
            "--block-len",
            "64",
            "--max-steps",
            "1",
            "--out",
            str(tmp_path / "u"),
        ],
    )
    assert usage.exit_code == 2 and "block_len: 64" in usage.output
    missing = runner.invoke(
        cli_main, ["backpack", "train", str(tmp_path / "none.txt"), "--max-steps", "1", "--out", str(tmp_path / "m")]
    )
    assert missing.exit_code == 1 and "none.txt: corpus file not found" in missing.output


# ------------------------------------------------------------------------------------- (f) learning


def test_loss_goes_down_on_the_fixture_corpus(tmp_path, bpe_dir):
    out = tmp_path / "learn"
    train_backpack(tiny(out, bpe_dir, max_steps=100, warmup_steps=10, eval_every=50), progress=False)
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r["nll"] for r in evals if r["event"] == "eval"]
    assert len(evals) == 3  # steps 0, 50, 100
    assert evals[0] > math.log(384) - 0.5  # a random start is near uniform over |U|
    assert evals[-1] < evals[0] - 1.5, evals


def test_minutes_budget_stops_the_run(tmp_path, bpe_dir):
    """--max-minutes alone: the cosine follows the clock and the run stops on time."""
    out = tmp_path / "timed"
    train_backpack(tiny(out, bpe_dir, max_minutes=0.02), progress=False)
    rec = json.loads((out / "training.json").read_text())
    assert 0 < rec["steps"] < 10_000 and rec["seconds"] >= 0.02 * 60
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in recs if r["event"] == "train"]
    assert len(lrs) <= 2 or lrs[-1] < 3e-3  # past the 2 warmup steps, the clock-driven cosine has decayed
    assert BackpackLM.from_pretrained(out).config.n_embd == 32
    assert (out / "checkpoints" / "latest").is_file()  # kept by default (keep_checkpoints=2)


def test_keep_checkpoints_zero_removes_them_after_the_end(tmp_path, bpe_dir):
    out = tmp_path / "nockpt"
    train_backpack(tiny(out, bpe_dir, max_steps=2, checkpoint_every=1, keep_checkpoints=0), progress=False)
    assert not (out / "checkpoints").exists() and (out / "model.safetensors").is_file()


def test_read_corpus_formats(tmp_path):
    """.jsonl.gz lines and .txt.gz documents split at <|endoftext|> read like their plain forms."""
    import gzip

    from train_edits.corpora import read_documents as read_corpus

    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write('{"text": "first doc"}\n\n{"text": "second doc", "id": 2}\n')
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write("third\n<|endoftext|>\nfourth\n<|endoftext|>\n")
    docs = read_corpus([str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.txt.gz")])
    assert [d.strip() for d in docs] == ["first doc", "second doc", "third", "fourth"]
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(DataError, match=r"c.csv: unsupported document file \(expected .jsonl"):
        read_corpus([str(tmp_path / "c.csv")])
