"""train_edits end to end: corpora, the CLI on a val task with tiny models, packs the core loads and applies."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.conftest import SHARED
from train_edits.cli import main
from train_edits.sweep import draw

DATA = str(SHARED / "data" / "canonical-examples")
needs_data = pytest.mark.skipif(
    not (SHARED / "data" / "canonical-examples").is_dir(),
    reason=f"the canonical-examples data is not at {DATA} (set SENSEPACK_SHARED)",
)
pytestmark = needs_data  # every test here reads it (fixtures built from val100 and the task files)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("corp")
    src = d / "docs.jsonl"
    with open(f"{DATA}/val100-val.jsonl") as fh:
        src.write_text("".join(next(fh) for _ in range(60)))
    res = CliRunner().invoke(main, ["prepare-corpora", str(src), "--out", str(d), "--chunk-len", "64", "--seed", "3"])
    assert res.exit_code == 0, res.output
    return d


def test_repeated_ngram_rate_by_hand():
    from train_edits.evaluate import repeated_ngram_rate

    assert repeated_ngram_rate([1, 2, 3, 1, 2, 3, 1, 2, 3]) == pytest.approx(1 - 3 / 7)  # 7 trigrams, 3 distinct
    assert repeated_ngram_rate([1, 2, 3, 4, 5]) == 0.0
    assert repeated_ngram_rate([7, 7, 7, 7], n=2) == pytest.approx(1 - 1 / 3)
    assert repeated_ngram_rate([1, 2]) == 0.0  # shorter than n: nothing to repeat


def _chunks(path):
    return [json.loads(x)["input_ids"] for x in open(path)]


def test_prepare_corpora_disjoint_fixed_length(corpora):
    meta = json.loads((corpora / "corpora.json").read_text())
    g, r = _chunks(corpora / "G.jsonl"), _chunks(corpora / "R.jsonl")
    assert meta["g_documents"] + meta["r_documents"] == 60 and meta["g_chunks"] == len(g) > 0 and len(r) > 0
    assert all(len(c) == 64 for c in g + r)
    # documents are joined with EOS and each document goes to exactly one side
    from ensemble.tokenizer import load_tokenizer

    tok = load_tokenizer()
    docs = [json.loads(x)["text"] for x in (corpora / "docs.jsonl").read_text().splitlines()]
    flat_g = [t for c in g for t in c]
    flat_r = [t for c in r for t in c]
    sides = []
    for doc in docs:
        ids = tok.encode(doc.replace("<|endoftext|>", ""), add_special_tokens=False)[:20]
        sides.append((_contains(flat_g, ids), _contains(flat_r, ids)))
    assert not any(a and b for a, b in sides)
    assert sum(a for a, _ in sides) > 0 and sum(b for _, b in sides) > 0
    assert flat_g.count(50256) >= meta["g_documents"] - 2  # one EOS per document (a few in the dropped tail)


def _contains(hay, needle):
    n = len(needle)
    return any(hay[i : i + n] == needle for i in range(len(hay) - n + 1))


def test_run_end_to_end_pack_loads_and_applies(corpora, tmp_path):
    run_dir, store = tmp_path / "run", tmp_path / "store"
    args = [
        "run",
        "--task",
        "country_capital",
        "--data-dir",
        DATA,
        "--backpack",
        "tiny",
        "--large",
        "tiny-gptj",
        "--g",
        str(corpora / "G.jsonl"),
        "--g-limit",
        "8",
        "--r",
        str(corpora / "R.jsonl"),
        "--r-limit",
        "12",
        "--max-train",
        "6",
        "--max-eval",
        "6",
        "--epochs",
        "3",
        "--lr",
        "1.0",
        "--grad-accum",
        "1",
        "-k",
        "3",
        "--epsilon",
        "0.5",
        "--epsilon",
        "1e-12",
        "--run-dir",
        str(run_dir),
        "--store",
        str(store),
        "--no-progress",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    for f in (
        "config.json",
        "log.jsonl",
        "selection.json",
        "training.json",
        "calibration.json",
        "report.json",
        "report.md",
        "plots/g_ratio.png",
        "plots/success.png",
        "plots/calibration.png",
    ):
        assert (run_dir / f).is_file(), f
    assert all(json.loads(line)["event"] for line in (run_dir / "log.jsonl").read_text().splitlines())
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["backpack"]["after"]) == {"0.5", "1e-12"} and report["ensemble"]["target"] == "tiny-gptj"
    assert "| ε | Country | Avg |" in (run_dir / "report.md").read_text()
    # fluency: greedy continuations of the eval prompts, the base one equal to transformers' own greedy decode
    fb = report["ensemble"]["before"]["fluency"]
    assert fb["prompts"] == 6 and set(report["ensemble"]["after"]["0.5"]["fluency"]) >= {"repeated_ngram_rate"}
    assert "## Fluency" in (run_dir / "report.md").read_text()
    tr = json.loads((run_dir / "training.json").read_text())
    assert tr["history"][-1]["train_loss"] < tr["history"][0]["train_loss"]
    assert tr["chosen_epoch"]["0.5"] == 3  # G ratio < 1.5 at every epoch: the last one
    ratios = [h["g_ratio"] for h in tr["history"]]
    assert tr["chosen_epoch"]["1e-12"] == max(e for e, r in enumerate(ratios) if r < 1 + 1e-12)

    from edits_store.format import read_pack
    from ensemble.edits import PackRef, SenseEdits
    from ensemble.ensemble import Ensemble
    from ensemble.large_model import model_fingerprint, tiny_gptj
    from ensemble.tokenizer import load_tokenizer
    from train_edits.run import load_backpack

    bp, large, tok = load_backpack("tiny"), tiny_gptj(seed=0), load_tokenizer()
    from train_edits.config import RunConfig
    from train_edits.run import Run

    cfg = RunConfig.model_validate_json((run_dir / "config.json").read_text())
    first = Run(tmp_path / "reread", cfg).task.eval[0].seqs[0]
    prompt = torch.tensor([first.ids[: first.start]])
    hf = large.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)[0, prompt.shape[1] :]
    assert fb["examples"][0] == tok.decode(hf.tolist())
    packs = {p.name: read_pack(p) for p in (run_dir / "packs").iterdir()}
    assert set(packs) == {"country-capital-eps0.5", "country-capital-eps1e-12"}
    big, none = packs["country-capital-eps0.5"], packs["country-capital-eps1e-12"]
    assert big.manifest.backpack["fingerprint"] == bp.fingerprint()
    entry = big.manifest.beta_for(model_fingerprint(large))
    assert 0.0 <= entry.beta <= 1.0 and entry.ball_ratio < 1.5
    tiny_epoch = none.manifest.training["last_in_ball_epoch"]
    assert tiny_epoch == tr["chosen_epoch"]["1e-12"]
    # epoch 0 (no trained epoch fits; guaranteed in test_train_finetune) gives an empty pack
    assert (none.manifest.n_senses_edited == 0) == (tiny_epoch == 0)
    assert {m.split("/")[0] for m in _published(store)} == set(packs)

    ens = Ensemble(large, bp, tok)
    ex = json.loads(Path(f"{DATA}/country_capital/split/country_capital_fixed-val.jsonl").read_text().splitlines()[0])
    prefix = tok.encode(ex["prefix"], add_special_tokens=False)
    cont = tok.encode(ex["suffix"], add_special_tokens=False)

    def ref(pack, beta=1.0):
        return PackRef(pack.name, pack.version, SenseEdits(pack.token_ids, pack.sense_ids, pack.deltas), beta)

    base = ens.score([prefix], [cont], [[]])[0]
    edited = ens.score([prefix], [cont], [[ref(big)]])[0]
    empty = ens.score([prefix], [cont], [[ref(none)]])[0]
    if tiny_epoch == 0:
        assert torch.equal(empty, base)  # the epoch-0 pack has no effect
    assert edited.sum() > base.sum() + 1e-3  # the trained pack raises the canonical suffix's log-prob


def _published(store: Path):
    return [str(p.relative_to(store)) for p in store.glob("*/*") if (p / "manifest.json").is_file()]


def test_custom_task_malformed_record_exit_2_before_models_load(tmp_path, corpora):
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"prefix": "a", "suffix": " b"}\n{"prefix": "c", "suffix": 7}\n')
    res = CliRunner().invoke(
        main,
        [
            "select",
            "--train",
            str(bad),
            "--loss-type",
            "good",
            "--threshold",
            "1.6",
            "--backpack",
            "tiny",
            "--r",
            str(corpora / "R.jsonl"),
            "--r-limit",
            "2",
            "--run-dir",
            str(tmp_path / "r"),
            "--no-progress",
        ],
    )
    assert res.exit_code == 2  # found by the preflight (train_edits/preflight.py), a usage error
    assert "mine.jsonl:2" in res.output and "'suffix'" in res.output


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--epsilon", "-1"], "train.epsilons"),
        (["--loss-type", "good"], "threshold"),
    ],
)
def test_bad_config_exit_2(tmp_path, extra, needle):
    res = CliRunner().invoke(
        main,
        ["select", "--train", "x.jsonl", "--run-dir", str(tmp_path / "r")]
        + extra
        + (["--threshold", "1"] if "--epsilon" in extra else [])
        + (["--loss-type", "good"] if "--epsilon" in extra else []),
    )
    assert res.exit_code == 2, res.output
    assert needle in res.output


def test_config_file_and_usage(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: {builtin: country_capital}\ntrain: {lr: 0.01, bogus: 1}\n")
    res = CliRunner().invoke(main, ["train", "--config", str(cfg), "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 2 and "train.bogus" in res.output
    assert CliRunner().invoke(main, ["train"]).exit_code == 2  # --run-dir missing
    out = subprocess.run([str(Path(sys.executable).parent / "train_edits"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("prepare-corpora", "select", "train", "calibrate", "eval", "sweep", "run"):
        assert cmd in out.stdout


def test_sweep_draws_in_paper_ranges_and_reproducible():
    for t in range(30):
        d = draw(4, t)
        assert 10**-4 <= d["lr"] <= 10**-1.5 and 0.1 <= d["kl_weight"] <= 1.0 and 5 <= d["k"] <= 11
        assert d == draw(4, t)
    assert draw(4, 0) != draw(5, 0)


def test_sweep_selects_on_one_split_and_caps_epochs(corpora, tmp_path):
    run_dir = tmp_path / "sw"
    res = CliRunner().invoke(
        main,
        [
            "sweep",
            "--task",
            "pronoun_gender_bias",
            "--data-dir",
            DATA,
            "--backpack",
            "tiny",
            "--large",
            "none",
            "--g",
            str(corpora / "G.jsonl"),
            "--r",
            str(corpora / "R.jsonl"),
            "--g-limit",
            "4",
            "--r-limit",
            "6",
            "--max-train",
            "3",
            "--max-eval",
            "4",
            "--epochs",
            "2",
            "--epsilon",
            "0.5",
            "--trials",
            "2",
            "--run-dir",
            str(run_dir),
            "--no-progress",
            "--seed",
            "11",
            "--cap-epochs",
        ],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    sw = json.loads((run_dir / "sweep.json").read_text())
    assert [t["hyperparameters"] for t in sw["trials"]] == [draw(11, 0), draw(11, 1)]
    best = max(sw["trials"], key=lambda t: (t["scores"]["0.5"]["success"], -t["trial"]))
    assert sw["best"]["0.5"]["trial"] == best["trial"]
    rep_cfg = json.loads((run_dir / "report-eps0.5" / "config.json").read_text())
    cap = best["scores"]["0.5"]["epoch"]
    assert rep_cfg["train"]["epoch_cap"] == {"0.5": cap} and rep_cfg["train"]["epochs"] == 2
    rep_tr = json.loads((run_dir / "report-eps0.5" / "training.json").read_text())
    assert len(rep_tr["history"]) - 1 == cap and rep_tr["chosen_epoch"]["0.5"] <= cap
    assert (
        rep_cfg["train"]["lr"] == best["hyperparameters"]["lr"]
        and rep_cfg["select"]["k"] == best["hyperparameters"]["k"]
    )
    assert (run_dir / "report.md").is_file() and "warning" in sw
