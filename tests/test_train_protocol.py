"""train_edits: the paper's protocol (upstream differences, stale steps, multi-seed tables, baselines)."""

import importlib.util
import json

import pytest
import torch


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adam8bit_without_bitsandbytes_names_the_extra():
    from train_edits.finetune import FinetuneParams, _make_optimizer

    with pytest.raises(RuntimeError, match=r"sensepack\[adam8bit\]"):
        _make_optimizer([torch.nn.Parameter(torch.zeros(2))], FinetuneParams(optimizer="adam8bit"))


# --------------------------------------------------------------------------- stale steps (provenance)

from click.testing import CliRunner  # noqa: E402

from tests.conftest import SHARED  # noqa: E402

DATA = str(SHARED / "data" / "canonical-examples")
needs_data = pytest.mark.skipif(
    not (SHARED / "data" / "canonical-examples").is_dir(),
    reason=f"the canonical-examples data is not at {DATA} (set SENSEPACK_SHARED)",
)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    from train_edits.cli import main

    d = tmp_path_factory.mktemp("corp")
    src = d / "docs.jsonl"
    with open(f"{DATA}/val100-val.jsonl") as fh:
        src.write_text("".join(next(fh) for _ in range(40)))
    res = CliRunner().invoke(main, ["prepare-corpora", str(src), "--out", str(d), "--chunk-len", "64", "--seed", "3"])
    assert res.exit_code == 0, res.output
    return d


def _cli(*args):
    from train_edits.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _base(corpora, run_dir, task="country_capital"):
    return [
        "--task",
        task,
        "--data-dir",
        DATA,
        "--backpack",
        "tiny",
        "--large",
        "tiny-gptj",
        "--g",
        corpora / "G.jsonl",
        "--g-limit",
        "6",
        "--r",
        corpora / "R.jsonl",
        "--r-limit",
        "6",
        "--max-train",
        "4",
        "--max-eval",
        "4",
        "--epochs",
        "2",
        "--lr",
        "0.5",
        "--grad-accum",
        "1",
        "-k",
        "3",
        "--epsilon",
        "0.5",
        "--run-dir",
        run_dir,
        "--no-progress",
        "--no-eval-every-epoch",
    ]


@needs_data
def test_stale_steps_refused_as_in_the_issue(corpora, tmp_path):
    """The issue's sequence: a full run, then `train -k 2 --epochs 1` in it, then `pack`, then `eval --large
    tiny-gptj:7`: each refuses the stale earlier step, naming it and what changed; --recompute recomputes."""
    run_dir = tmp_path / "run"
    res = _cli("run", *_base(corpora, run_dir))
    assert res.exit_code == 0, res.output + repr(res.exception)
    steps = json.loads((run_dir / "steps.json").read_text())
    assert set(steps) == {"select", "train", "calibrate", "eval"}

    # 1. train with another k: the old selection.json (k 3) is refused, not silently reused
    res = _cli("train", "--run-dir", run_dir, "-k", "2", "--epochs", "1", "--no-progress")
    assert res.exit_code == 2, res.output
    assert "step `select`" in res.output and "select.k: 3 -> 2" in res.output and "--recompute" in res.output
    # with --recompute: selection recomputed (k 2), then train
    res = _cli("train", "--run-dir", run_dir, "--recompute", "--no-progress")
    assert res.exit_code == 0, res.output + repr(res.exception)
    sel = json.loads((run_dir / "selection.json").read_text())
    assert sel["k"] == 2 and all(len(p) <= 2 for p in sel["per_example"])
    assert len(json.loads((run_dir / "training.json").read_text())["history"]) == 2  # epochs 0 and 1

    # 2. pack now would mix generations (old calibration and report): refused, naming calibrate
    res = _cli("pack", "--run-dir", run_dir, "--no-progress")
    assert res.exit_code == 2, res.output
    assert "step `calibrate`" in res.output and "another `train` output" in res.output

    # 3. eval for another large model would apply β calibrated for tiny-gptj
    res = _cli("eval", "--run-dir", run_dir, "--large", "tiny-gptj:7", "--no-progress")
    assert res.exit_code == 2, res.output
    assert "step `calibrate`" in res.output and "models.large: tiny-gptj (default dtype) -> tiny-gptj:7" in res.output

    # --recompute: calibrate (for tiny-gptj:7) and eval recomputed, the pack records exactly those steps
    res = _cli("pack", "--run-dir", run_dir, "--recompute", "--no-progress")
    assert res.exit_code == 0, res.output + repr(res.exception)
    steps = json.loads((run_dir / "steps.json").read_text())
    cal = json.loads((run_dir / "calibration.json").read_text())
    assert cal["target_model"] == "tiny-gptj:7"
    from edits_store.format import read_pack

    pack = read_pack(next((run_dir / "packs").iterdir()))
    assert pack.manifest.training["steps"] == {s: steps[s]["fingerprint"] for s in ("train", "calibrate", "eval")}
    assert steps["eval"]["earlier"] == {
        "train": steps["train"]["fingerprint"],
        "calibrate": steps["calibrate"]["fingerprint"],
    }
    assert steps["train"]["earlier"] == {"select": steps["select"]["fingerprint"]}


@needs_data
def test_pack_refuses_a_large_checkpoint_changed_since_calibration(corpora, tmp_path):
    """`pack` does not load the large model, yet a checkpoint folder rewritten after `calibrate` (same name,
    same dtype, other weights) is refused: its fingerprint is read from the safetensors without loading it."""
    from sensepack_testing.vllm import save_tiny_gptj

    large = tmp_path / "gptj"
    save_tiny_gptj(large, seed=0)
    run_dir = tmp_path / "run"
    args = _base(corpora, run_dir)
    args[args.index("tiny-gptj")] = str(large)
    res = _cli("run", *args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert _cli("pack", "--run-dir", run_dir, "--no-progress").exit_code == 0  # unchanged: fresh
    save_tiny_gptj(large, seed=1)  # same folder, same config, other weights
    res = _cli("pack", "--run-dir", run_dir, "--no-progress")
    assert res.exit_code == 2, res.output
    assert "step `calibrate`" in res.output and "models.large.fingerprint" in res.output


@needs_data
def test_changed_data_file_or_edited_output_is_refused(corpora, tmp_path):
    run_dir = tmp_path / "run"
    data = tmp_path / "mine.jsonl"
    data.write_text(
        '{"prefix": "The capital of Peru is", "suffix": " Lima"}\n'
        '{"prefix": "The capital of Chile is", "suffix": " Santiago"}\n'
    )
    args = [
        "--train",
        data,
        "--loss-type",
        "good",
        "--threshold",
        "1.6",
        "--backpack",
        "tiny",
        "--large",
        "none",
        "--g",
        corpora / "G.jsonl",
        "--g-limit",
        "4",
        "--r",
        corpora / "R.jsonl",
        "--r-limit",
        "4",
        "--epochs",
        "1",
        "-k",
        "2",
        "--run-dir",
        run_dir,
        "--no-progress",
    ]
    assert _cli("select", *args).exit_code == 0
    with data.open("a") as fh:
        fh.write('{"prefix": "The capital of France is", "suffix": " Paris"}\n')
    res = _cli("train", "--run-dir", run_dir, "--no-progress")
    assert res.exit_code == 2 and "step `select`" in res.output and "task.train: sha256:" in res.output, res.output
    assert _cli("train", "--run-dir", run_dir, "--recompute", "--no-progress").exit_code == 0
    # an output edited by hand after its step wrote it
    p = run_dir / "selection.json"
    p.write_text(p.read_text().replace('"k": 2', '"k": 2 '))
    res = _cli("train", "--run-dir", run_dir, "--no-progress")
    assert res.exit_code == 2 and "selection.json was changed after the step wrote it" in res.output, res.output


# --------------------------------------------------------------------------- sweeps as upstream


def test_country_sweep_draws_lambda_as_upstream():
    """λ = floor(10^U(2, 3.5)) for country_capital (upstream make_sweep.py), drawn after lr, KL weight and k
    from the trial's own generator; the other tasks draw no λ (1000 from the config), nor with fixed_lam."""
    import math
    import random

    from train_edits.sweep import draw

    lams = []
    for t in range(200):
        d = draw(3, t, "country_capital")
        rng = random.Random(3 * 100003 + t)
        lr, kl, k = 10 ** -rng.uniform(1.5, 4), 10 ** rng.uniform(-1, 0), rng.randint(5, 11)
        expect = math.floor(10 ** rng.uniform(2, 3.5))
        assert (d["lr"], d["kl_weight"], d["k"]) == (lr, kl, k) and d["lam"] == expect
        lams.append(d["lam"])
    assert all(100 <= x <= 10**3.5 and x == int(x) for x in lams)
    logs = sorted(math.log10(x) for x in lams)
    assert logs[0] < 2.1 and logs[-1] > 3.4 and 2.6 < logs[len(logs) // 2] < 2.9  # log-uniform: median ≈ 2.75
    for task in ("company_ceo", "stereoset", "pronoun_gender_bias", "temporal", "verb_conjugation", None):
        assert "lam" not in draw(3, 0, task)
    assert "lam" not in draw(3, 0, "country_capital", fixed_lam=True)


@needs_data
def test_sweep_lambda_report_data_dir_and_uncapped_last_in_ball_epoch(corpora, tmp_path):
    import shutil

    from train_edits.sweep import draw

    # the "test" files kept in their own folder (here: the val files under test names)
    test_dir = tmp_path / "test-data"
    (test_dir / "country_capital" / "split").mkdir(parents=True)
    for f in (SHARED / "data" / "canonical-examples" / "country_capital" / "split").glob("*-val.jsonl"):
        shutil.copy(f, test_dir / "country_capital" / "split" / f.name.replace("-val.jsonl", "-test.jsonl"))
    run_dir = tmp_path / "sw"
    res = _cli(
        "sweep",
        *_base(corpora, run_dir),
        "--large",
        "none",
        "--trials",
        "2",
        "--seed",
        "5",
        "--report-split",
        "test",
        "--report-data-dir",
        test_dir,
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    sw = json.loads((run_dir / "sweep.json").read_text())
    assert [t["hyperparameters"] for t in sw["trials"]] == [
        draw(5, 0, "country_capital"),
        draw(5, 1, "country_capital"),
    ]
    for t in sw["trials"]:
        cfg = json.loads((run_dir / "trials" / f"trial-{t['trial']:02d}" / "config.json").read_text())
        assert cfg["select"]["lam"] == t["hyperparameters"]["lam"]
    assert "warning" not in sw and sw["report_data_dir"] == str(test_dir)
    rep_cfg = json.loads((run_dir / "report-eps0.5" / "config.json").read_text())
    assert rep_cfg["task"]["train"].startswith(str(test_dir)) and rep_cfg["task"]["train"].endswith("-test.jsonl")
    assert rep_cfg["train"]["epoch_cap"] is None and rep_cfg["select"]["lam"] == sw["best"]["0.5"]["lam"]
    tr = json.loads((run_dir / "report-eps0.5" / "training.json").read_text())
    ratios = [h["g_ratio"] for h in tr["history"]]
    assert len(ratios) == 3  # trained to the end: epochs 0..2, whatever the selection split chose
    assert tr["chosen_epoch"]["0.5"] == max(e for e, r in enumerate(ratios) if r < 1.5)


# --------------------------------------------------------------------------- baselines


@pytest.fixture(scope="module")
def small_task():
    from ensemble.tokenizer import load_tokenizer
    from train_edits.encoding import encode_example
    from train_edits.tasks import SingleExample

    tok = load_tokenizer()
    train = [
        encode_example(tok, SingleExample(p, s))
        for p, s in (
            ("The capital of Peru is", " Lima"),
            ("The capital of Chile is", " Santiago"),
            ("The capital of Kenya is", " Nairobi"),
        )
    ]
    text = (
        " The city council met on Tuesday to discuss the budget for the coming year, and the mayor said"
        " that the capital of the region would need new roads, schools and a larger hospital soon."
    )
    ids = tok.encode(text * 3, add_special_tokens=False)
    g = [torch.tensor(ids[i : i + 24]) for i in range(0, 96, 24)]
    r = [torch.tensor(ids[i + 5 : i + 29]) for i in range(0, 72, 24)]
    return train, g, r


@pytest.mark.parametrize("side", ["backpack", "large"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_baseline_keeps_g_inside_the_ball_it_was_selected_for(small_task, side, kind):
    if kind == "lora":
        pytest.importorskip("peft", reason="LoRA baselines need peft (sensepack[train])")
    from train_edits.baselines import BaselineParams, finetune_baseline, g_ratio_naive
    from train_edits.run import load_backpack, load_large
    from train_edits.tasks import LossType

    train, g, r = small_task
    orig = load_backpack("tiny") if side == "backpack" else load_large("tiny-gptj")
    vocab = None if side == "backpack" else 50257
    before = {k: v.clone() for k, v in orig.state_dict().items()}
    eps = (10.0, 2e-2, 1e-12)
    lr = {"full": 3e-3, "lora": 3e-2}[kind]
    p = BaselineParams(kind=kind, lr=lr, kl_weight=0.1, epochs=3, grad_accum=2, epsilons=eps, lora_rank=4)
    res = finetune_baseline(orig, train, LossType.GOOD, g, r, p, vocab_size=vocab, progress=False)
    assert all(torch.equal(v, orig.state_dict()[k]) for k, v in before.items())  # the original never changes
    ratios = [h.g_ratio for h in res.history]
    assert ratios[0] == 1.0 and res.history[-1].train_loss != res.history[0].train_loss
    assert any(x != 1.0 for x in ratios[1:])  # it trained
    n_all = sum(prm.numel() for prm in orig.parameters())
    assert (res.trainable == n_all) if kind == "full" else (0 < res.trainable < n_all // 10)
    for e in eps:
        expect = max(ep for ep, x in enumerate(ratios) if x < 1 + e)  # the last in-ball epoch
        assert res.chosen_epoch[e] == expect
        model = res.load(e)
        naive = g_ratio_naive(orig, model, g, vocab)  # recomputed by a plain loop over G
        assert naive < 1 + e and naive == pytest.approx(ratios[expect], rel=1e-5)
    assert res.chosen_epoch[10.0] == 3
    if res.chosen_epoch[1e-12] != 0:  # training lowered G below the original's: nothing more to check
        return
    m0 = res.load(1e-12)  # epoch 0 is the original function
    ids = g[0][None]
    with torch.no_grad():
        f = (lambda m: m(ids).logits) if side == "backpack" else (lambda m: m(input_ids=ids).logits)
        assert torch.allclose(f(m0), f(orig), atol=1e-5)


# --------------------------------------------------------------------------- tables across seeds


def _report(task, method, seed, before, afters, side="backpack"):
    s = {
        "name": "bp",
        "before": {"success": before, "hard_neg": 10.0, "rest_of_prompt": 3.0},
        "after": {
            e: {"success": a, "hard_neg": 9.0 + seed, "rest_of_prompt": 3.0, "epoch": 1, "g_ratio": 1.0}
            for e, a in afters.items()
        },
    }
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "loss_type": "good",
        "threshold": 1.0,
        "backpack": s if side == "backpack" else None,
        "ensemble": s if side == "ensemble" else None,
    }


def test_table_mean_and_standard_error_against_hand_computation(tmp_path):
    # SE as upstream's report: np.std (divides by n) / sqrt(n); with --sample-sd: n - 1
    # country, senses, 3 seeds: Δ success 0.1, 0.2, 0.4 at ε 1e-3 -> mean 0.23333, sd 0.124722, SE 0.072008
    #                                                    (n - 1: sd 0.152753, SE 0.088192)
    # company, senses, 3 seeds: Δ 0.0, 0.0, 0.3                  -> mean 0.1,     sd 0.141421, SE 0.081650
    #                                                    (n - 1: sd 0.173205, SE 0.1)
    # Avg: (0.23333 + 0.1) / 2 = 0.166667, SE sqrt(0.072008² + 0.081650²) / 2 = 0.054433
    # country, lora-backpack, 1 seed: Δ -0.05 -> no SE
    runs = []
    for seed, (dc, dk) in enumerate([(0.1, 0.0), (0.2, 0.0), (0.4, 0.3)]):
        runs.append(_report("country_capital", "senses", seed, 0.5, {"0.001": 0.5 + dc}))
        runs.append(_report("company_ceo", "senses", seed, 0.2, {"0.001": 0.2 + dk}))
    runs.append(_report("country_capital", "lora-backpack", 0, 0.5, {"0.001": 0.45}))
    for i, r in enumerate(runs):  # protocol layout: DIR/<method>/seed-<s>/report.json
        d = tmp_path / "proto" / r["task"] / r["method"] / f"seed-{i}"
        d.mkdir(parents=True)
        (d / "report.json").write_text(json.dumps(r))
    res = _cli("table", tmp_path / "proto", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = json.loads((tmp_path / "out" / "tables.json").read_text())["rows"]
    cell = {(r["method"], r["task"], r["metric"]): r for r in rows}
    c = cell[("senses", "country_capital", "success")]
    assert c["n"] == 3 and c["mean"] == pytest.approx(0.233333, abs=1e-6)
    assert c["se"] == pytest.approx(0.072008, abs=1e-6)
    k = cell[("senses", "company_ceo", "success")]
    assert k["mean"] == pytest.approx(0.1, abs=1e-9) and k["se"] == pytest.approx(0.081650, abs=1e-6)
    hn = cell[("senses", "country_capital", "hard_neg")]  # Δ -1, 0, +1 -> mean 0, sd sqrt(2/3), SE sqrt(2)/3
    assert hn["mean"] == pytest.approx(0.0, abs=1e-12) and hn["se"] == pytest.approx(0.471405, abs=1e-6)
    lo = cell[("lora-backpack", "country_capital", "success")]
    assert lo["n"] == 1 and lo["mean"] == pytest.approx(-0.05) and lo["se"] is None
    md = (tmp_path / "out" / "tables.md").read_text()
    assert "| senses (n=3) | 0.001 | +23.3 ± 7.2 | +10.0 ± 8.2 | +16.7 ± 5.4 |" in md
    assert "| lora-backpack (n=1) | 0.001 | -5.0 | – | -5.0 |" in md
    assert (tmp_path / "out" / "tables.png").stat().st_size > 1000
    res = _cli("table", tmp_path / "proto", "--out", tmp_path / "out1", "--sample-sd")
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "out1" / "tables.json").read_text())["rows"]
    cell = {(r["method"], r["task"], r["metric"]): r for r in rows}
    assert cell[("senses", "country_capital", "success")]["se"] == pytest.approx(0.088192, abs=1e-6)
    assert cell[("senses", "company_ceo", "success")]["se"] == pytest.approx(0.1, abs=1e-9)
    md1 = (tmp_path / "out1" / "tables.md").read_text()
    assert "| senses (n=3) | 0.001 | +23.3 ± 8.8 | +10.0 ± 10.0 | +16.7 ± 6.7 |" in md1


@needs_data
def test_protocol_runs_methods_and_seeds_into_one_table(corpora, tmp_path):
    pytest.importorskip("peft", reason="LoRA baselines need peft (sensepack[train])")
    run_dir = tmp_path / "proto"
    res = _cli(
        "protocol",
        *_base(corpora, run_dir),
        "--seeds",
        "2",
        "--methods",
        "senses,lora-backpack,full-large",
        "--epochs",
        "1",
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    for m in ("senses", "lora-backpack", "full-large"):
        for s in (0, 1):
            rep = json.loads((run_dir / m / f"seed-{s}" / "report.json").read_text())
            assert rep["method"] == m and rep["seed"] == s
    rows = json.loads((run_dir / "tables.json").read_text())["rows"]
    got = {(r["side"], r["method"]) for r in rows if r["metric"] == "success"}
    assert got == {
        ("backpack", "senses"),
        ("backpack", "lora-backpack"),
        ("ensemble", "senses"),
        ("ensemble", "full-large"),
    }
    assert all(r["n"] == 2 and r["seeds"] == [0, 1] for r in rows)
    md = (run_dir / "tables.md").read_text()
    assert "## Table 3: the Backpack" in md and "## Table 4: the large model" in md


# --------------------------------------------------------------------------- hard negatives as upstream configs


def test_hard_negatives_whole_text_per_token_mean_against_naive():
    """hard-neg-config scoring (upstream configs/hard_neg for verb/stereoset): each record is one text
    prefix+suffix, every token but the first scored, per-token mean over all records; suffix-sum: the mean over
    records of the summed suffix NLL."""
    from ensemble.tokenizer import load_tokenizer
    from train_edits.evaluate import BackpackScorer, EncodedTask, task_metrics
    from train_edits.run import load_backpack
    from train_edits.tasks import LossType, SingleExample, TaskData

    tok, bp = load_tokenizer(), load_backpack("tiny")
    hn = [
        SingleExample("The definition of mover is ", "workman employed to move furniture"),
        SingleExample("The", " senator presented a compelling argument."),
    ]
    data = TaskData("stereoset", LossType.BAD, -6.9, [SingleExample("A", " b")], [SingleExample("A", " b")], hn, [])

    def nll(ids, start):
        with torch.no_grad():
            lp = torch.log_softmax(bp(torch.tensor([ids])).logits[0].float(), -1)
        return -sum(float(lp[p - 1, ids[p]]) for p in range(start, len(ids))), len(ids) - start

    text = [nll(tok.encode(e.prefix + e.suffix, add_special_tokens=False), 1) for e in hn]
    suffix = []
    for e in hn:
        p, s = tok.encode(e.prefix, add_special_tokens=False), tok.encode(e.suffix, add_special_tokens=False)
        suffix.append(nll(p + s, len(p))[0])
    for flag, expect in ((True, sum(x for x, _ in text) / sum(n for _, n in text)), (False, sum(suffix) / 2)):
        task = EncodedTask.encode(tok, data, 128, hard_neg_text=flag)
        got = task_metrics(BackpackScorer(bp), task)["hard_neg"]
        assert got == pytest.approx(expect, rel=1e-5)


def test_table_skips_unfinished_runs_and_refuses_an_empty_folder(tmp_path):
    d = tmp_path / "proto" / "senses"
    (d / "seed-0").mkdir(parents=True)
    (d / "seed-0" / "report.json").write_text(json.dumps(_report("country_capital", "senses", 0, 0.5, {"0.001": 0.6})))
    (d / "seed-1" / "edits").mkdir(parents=True)  # still running: no report yet
    res = _cli("table", tmp_path / "proto", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "tables.json").read_text())["runs"] == 1
    (tmp_path / "empty").mkdir()
    res = _cli("table", tmp_path / "empty", "--out", tmp_path / "out2")
    assert res.exit_code == 1 and "report.json: missing" in res.output


@needs_data
def test_inputs_added_later_keep_older_records_fresh_at_their_neutral_value(corpora, tmp_path):
    """A train record written before train.rest_kl_weight existed (no such key) stays fresh while the run keeps
    the value that reproduces it (0: off); another value makes it stale, naming the key."""
    run_dir = tmp_path / "run"
    assert _cli("run", *_base(corpora, run_dir)).exit_code == 0
    steps = json.loads((run_dir / "steps.json").read_text())
    for key in ("train.rest_kl_weight", "train.rest_tokens", "train.rest_scope", "train.lr_by_epsilon"):
        del steps["train"]["inputs"][key]  # as an older sensepack recorded it
    (run_dir / "steps.json").write_text(json.dumps(steps))
    res = _cli("pack", "--run-dir", run_dir, "--no-progress")
    assert res.exit_code == 0, res.output + repr(res.exception)
    res = _cli("calibrate", "--run-dir", run_dir, "--rest-kl-weight", "0.5", "--no-progress")
    assert res.exit_code == 2 and "train.rest_kl_weight: null -> 0.5" in res.output, res.output
