"""The commands that make edit packs: corpora, the run's steps, sweeps, the multi-seed protocol, tables.

    train_edits prepare-corpora val100-val.jsonl --out runs/corpora --chunk-len 500 [--tokenizer SPEC]
    train_edits run --task country_capital --g runs/corpora/G.jsonl --r runs/corpora/R.jsonl \\
        --backpack stanfordnlp/backpack-gpt2 --large EleutherAI/gpt-j-6b --run-dir runs/country
    train_edits select|train|calibrate|eval|pack --run-dir runs/country   (one step; reuses config.json)
    train_edits sweep --task company_ceo --trials 10 ... --run-dir runs/company-sweep

Exit codes: 0 success, 1 failure (bad data, missing files, runtime errors), 2 usage (bad options or config).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from ensemble.jsonl import MAX_RECORD_CHARS
from sensepack_common.errors import ConfigError

from ..config import load_config_file, set_path, validate
from ..pairings import apply_pairing_defaults
from ..preflight import preflight
from ..tasks import TASKS, LossType
from .common import guard

_OVERRIDES = [
    # (option, dest path, type, help)
    ("--task", "task.builtin", click.Choice(sorted(TASKS)), "one of the paper's six tasks"),
    ("--task-name", "task.name", str, "name of a custom task (default: the train file's stem)"),
    ("--data-dir", "task.data_dir", str, "folder of the canonical-examples data (builtin tasks)"),
    ("--split", "task.split", str, "split of the builtin task files (val, test)"),
    ("--train", "task.train", str, "JSONL of canonical examples (custom task)"),
    ("--eval", "task.eval", str, "JSONL evaluation set"),
    ("--hard-neg", "task.hard_neg", str, "JSONL hard negatives (single-suffix records)"),
    ("--unconditional", "task.unconditional", str, "JSONL {text} records for the rest-of-prompt loss"),
    ("--loss-type", "task.loss_type", click.Choice([t.value for t in LossType]), "loss type of a custom task"),
    ("--threshold", "task.threshold", float, "failure threshold of a custom task (fail if score > threshold)"),
    ("--max-eval", "task.max_eval", int, "use only the first N eval / hard-negative / unconditional records"),
    ("--max-train", "task.max_train", int, "use only the first N canonical examples"),
    (
        "--max-record-chars",
        "task.max_record_chars",
        int,
        "refuse (file, line) any data record longer than this many characters, before reading it whole",
    ),
    ("--backpack", "models.backpack", str, "Backpack checkpoint folder or hub id; 'tiny[:SEED]' for a random tiny one"),
    ("--large", "models.large", str, "large model for calibration/ensemble eval; 'tiny-gptj[:SEED]'; 'none'"),
    ("--large-dtype", "models.large_dtype", str, "dtype of the large model (float32, bfloat16, float16)"),
    (
        "--tokenizer",
        "models.tokenizer",
        str,
        "tokenizer folder, hub id or registry name (default: the Backpack folder's, else the packaged GPT-2 BPE)",
    ),
    ("--device", "models.device", str, "torch device"),
    ("--g", "corpora.g", str, "general corpus G (JSONL chunks from prepare-corpora)"),
    ("--r", "corpora.r", str, "regularisation corpus R (disjoint from G)"),
    ("--g-limit", "corpora.g_limit", int, "use only the first N chunks of G"),
    ("--r-limit", "corpora.r_limit", int, "use only the first N chunks of R"),
    ("-k", "select.k", int, "senses kept per example (Eq. 9)"),
    ("--lam", "select.lam", float, "λ: weight of the R background in sense selection"),
    ("--lr", "train.lr", float, "learning rate"),
    ("--kl-weight", "train.kl_weight", float, "weight of the KL regulariser"),
    (
        "--rest-scope",
        "train.rest_scope",
        click.Choice(["after", "around"]),
        "rest-of-example KL: positions after the answer only, or around it (before it too)",
    ),
    (
        "--rest-kl-weight",
        "train.rest_kl_weight",
        float,
        "weight of the KL on every position of each example but its answer's (the example, then R text); 0: off",
    ),
    ("--epochs", "train.epochs", int, "training epochs"),
    ("--grad-accum", "train.grad_accum", int, "examples per optimizer step"),
    ("--optimizer", "train.optimizer", click.Choice(["adamw", "adam8bit"]), "optimizer"),
    ("--seed", "train.seed", int, "random seed"),
    ("--store", "store", str, "edit-pack store to publish packs to"),
    (
        "--method",
        "method",
        click.Choice(["senses", "full-backpack", "lora-backpack", "full-large", "lora-large"]),
        "senses (packs), or a Table 3/4 baseline: full finetuning / LoRA of the Backpack / the large model",
    ),
    ("--lora-rank", "baseline.lora_rank", int, "LoRA baselines: adapter rank"),
    ("--lora-alpha", "baseline.lora_alpha", float, "LoRA baselines: adapter α"),
    ("--name", "name", str, "run / pack name"),
    (
        "--fluency-prompts",
        "eval.fluency_prompts",
        int,
        "greedy continuations of the first N eval prompts, base vs each pack, for repeated n-grams (0: off)",
    ),
]


def _common(f):
    @click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML or JSON config file")
    @click.option("--run-dir", type=click.Path(file_okay=False), required=True, help="run directory")
    @click.option("--epsilon", "epsilons", type=float, multiple=True, help="degradation ball ε (repeatable)")
    @click.option("--beta-grid", type=str, help="comma-separated β grid (default 1.0,0.9,...,0.0)")
    @click.option(
        "--lr-by-epsilon",
        type=str,
        help="per-ε learning rates, e.g. '1e-4=0.003,1e-5=0.003' (each distinct lr trains its own trajectory)",
    )
    @click.option(
        "--upstream-grad-bug/--no-upstream-grad-bug",
        default=None,
        help="reproduce the upstream accumulation bug (gradients zeroed every example)",
    )
    @click.option("--eval-every-epoch/--no-eval-every-epoch", default=None, help="success rate after every epoch")
    @click.option(
        "--recompute",
        is_flag=True,
        help="recompute earlier steps whose inputs changed (default: refuse them, naming what changed)",
    )
    @click.option(
        "--hard-neg-scoring",
        type=click.Choice(["suffix-sum", "hard-neg-config"]),
        default=None,
        help="hard negatives: summed suffix NLL (upstream's test configs) or, for verb_conjugation and "
        "stereoset, whole-text per-token mean (upstream's configs/hard_neg)",
    )
    @click.option("--no-progress", is_flag=True, help="no progress bars")
    @click.option("-v", "--verbose", is_flag=True, help="log to stderr too")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    for opt, dest, typ, hlp in reversed(_OVERRIDES):
        wrapper = click.option(opt, dest.replace(".", "__"), type=typ, default=None, help=hlp)(wrapper)
    return wrapper


def _resolve(kwargs: dict):
    """Config: run_dir/config.json (if any) < --config file < command-line options."""
    run_dir = Path(kwargs.pop("run_dir"))
    data: dict = {}
    existing = run_dir / "config.input.json"
    if existing.is_file():
        data = json.loads(existing.read_text())
    if kwargs.get("config_file"):
        file_data = load_config_file(kwargs["config_file"])
        for section, val in file_data.items():
            if isinstance(val, dict) and isinstance(data.get(section), dict):
                data[section].update(val)
            else:
                data[section] = val
    kwargs.pop("config_file", None)
    for _, dest, _, _ in _OVERRIDES:
        v = kwargs.pop(dest.replace(".", "__"), None)
        if v is not None:
            if dest == "models.large" and v == "none":
                v = None
            if dest == "task.builtin" and isinstance(data.get("task"), dict) and data["task"].get("builtin") != v:
                data["task"] = {k: data["task"][k] for k in ("data_dir", "split", "max_eval") if k in data["task"]}
            set_path(data, dest, v)
    if kwargs.get("epsilons"):
        set_path(data, "train.epsilons", list(kwargs["epsilons"]))
    if kwargs.get("beta_grid"):
        try:
            grid = [float(x) for x in kwargs["beta_grid"].split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--beta-grid: not a comma-separated list of numbers: {kwargs['beta_grid']!r}") from None
        set_path(data, "calibrate.grid", grid)
    if kwargs.get("lr_by_epsilon"):
        spec = kwargs["lr_by_epsilon"]
        try:
            pairs = [item.split("=") for item in spec.split(",") if item.strip()]
            set_path(data, "train.lr_by_epsilon", {k.strip(): float(v) for k, v in pairs})
        except ValueError:
            raise ConfigError(f"--lr-by-epsilon: expected 'EPS=LR,...', got {spec!r}") from None
    if kwargs.get("upstream_grad_bug") is not None:
        set_path(data, "train.upstream_grad_bug", kwargs["upstream_grad_bug"])
    if kwargs.get("hard_neg_scoring"):
        set_path(data, "eval.hard_neg_scoring", kwargs["hard_neg_scoring"])
    if kwargs.get("eval_every_epoch") is not None:
        set_path(data, "train.eval_every_epoch", kwargs["eval_every_epoch"])
    data.setdefault("task", {})
    filled = apply_pairing_defaults(data)  # a known large model's sense model, corpora and chosen settings
    cfg = validate(data)
    if filled:
        click.echo(f"pairing defaults for {cfg.models.large}: {json.dumps(filled)}", err=True)
    preflight(cfg, run_dir)  # before any model loads: run dir, store, data (ConfigError: exit 2)
    (run_dir / "config.input.json").write_text(json.dumps(data, indent=1))
    return run_dir, cfg, not kwargs.get("no_progress"), kwargs.get("verbose", False)


def _make_run(kwargs):
    from ..run import Run, log_to_run

    recompute = kwargs.pop("recompute", False)
    run_dir, cfg, progress, verbose = _resolve(kwargs)
    log_to_run(run_dir, verbose)
    return Run(run_dir, cfg, progress, recompute=recompute)


@click.command("prepare-corpora")
@click.argument("inputs", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True, help="output folder (G.jsonl, R.jsonl)")
@click.option("--chunk-len", type=click.IntRange(min=2), default=500, show_default=True, help="tokens per chunk")
@click.option(
    "--g-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.5,
    show_default=True,
    help="fraction of documents that go to G (the rest to R)",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--text-field", default="text", show_default=True, help="JSONL field holding the document text")
@click.option("--hf-dataset", help="a Hugging Face dataset name instead of files (needs network + datasets)")
@click.option("--hf-config", help="dataset config name")
@click.option("--hf-split", default="train", show_default=True)
@click.option("--hf-limit", type=int, help="read only the first N documents")
@click.option(
    "--tokenizer",
    "tokenizer_spec",
    default=None,
    help="tokenizer folder, hub id or registry name (e.g. smollm2-135m-instruct); default: the packaged "
    "GPT-2 BPE. Runs refuse corpora made with another tokenizer",
)
@click.option(
    "--max-record-chars",
    type=click.IntRange(min=1),
    default=MAX_RECORD_CHARS,
    show_default=True,
    help="refuse (file, line) a document longer than this, before reading it whole",
)
@guard
def prepare_corpora(
    inputs,
    out,
    chunk_len,
    g_fraction,
    seed,
    text_field,
    hf_dataset,
    hf_config,
    hf_split,
    hf_limit,
    tokenizer_spec,
    max_record_chars,
):
    """Split documents into disjoint corpora G and R of fixed-length token chunks."""
    from ensemble.tokenizer import load_tokenizer

    from ..corpora import prepare_corpora as prepare
    from ..corpora import read_documents, read_hf_documents

    if not inputs and not hf_dataset:
        raise click.UsageError("give input files or --hf-dataset")
    tok = load_tokenizer(tokenizer_spec)
    docs = (
        read_hf_documents(hf_dataset, hf_split, text_field, hf_config, hf_limit)
        if hf_dataset
        else read_documents(inputs, text_field, max_record_chars)
    )
    meta = prepare(tok, docs, out, chunk_len, g_fraction, seed, list(inputs) or [hf_dataset], tokenizer_spec)
    click.echo(json.dumps(meta))


STEPS: list[click.Command] = []  # select, train, calibrate, eval, pack, run


def _step(name, doc):
    def decorator(fn):
        @click.command(name, help=doc)
        @_common
        @guard
        def cmd(**kwargs):
            run = _make_run(kwargs)
            result = fn(run)
            click.echo(json.dumps(result, default=str)[:2000] if result is not None else "{}")

        STEPS.append(cmd)
        return cmd

    return decorator


@_step("select", "Choose the senses to finetune (Eq. 9): top k per example, union over examples.")
def _select(run):
    from ..pipeline import step_select

    s = step_select(run)
    return {"pairs": len(s["pairs"]), "run_dir": str(run.dir)}


@_step("train", "Sense-finetune the selected senses; keep the last in-ball epoch per ε.")
def _train(run):
    from ..pipeline import step_train

    t = step_train(run)
    return {"chosen_epoch": t["chosen_epoch"], "g_ratio": t["g_ratio"], "seconds_per_epoch": t["seconds_per_epoch"]}


@_step("calibrate", "Calibrate β per ε against the large model (one pass over G for the whole grid).")
def _calibrate(run):
    from ..pipeline import step_calibrate

    c = step_calibrate(run)
    if c is None:
        raise ConfigError("calibrate: no large model configured (--large)")
    return {k: {"beta": v["beta"], "ratio": v["ratio"]} for k, v in c["per_epsilon"].items()}


@_step("eval", "Evaluate before/after for the Backpack and the ensemble; write report.json and report.md.")
def _eval(run):
    from ..pipeline import step_eval

    step_eval(run)
    return {"report": str(run.dir / "report.md")}


@_step("pack", "Write one edit pack per ε (and publish to --store).")
def _pack(run):
    from ..pipeline import step_pack

    return {"packs": [str(p) for p in step_pack(run)]}


@_step("run", "select → train → calibrate → eval → pack, in one run directory.")
def _run(run):
    from ..pipeline import run_all

    run_all(run)
    packs = run.dir / "packs"
    return {
        "report": str(run.dir / "report.md"),
        "packs": sorted(str(p) for p in packs.iterdir()) if packs.is_dir() else [],
    }


@click.command("sweep")
@_common
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=25,
    show_default=True,
    help="random-search trials (upstream's SWEEP_SIZE)",
)
@click.option("--report-split", default=None, help="split for the report runs (default: the selection split)")
@click.option(
    "--report-data-dir",
    default=None,
    type=click.Path(file_okay=False, exists=True),
    help="canonical-examples folder of the report split when it is not --data-dir (e.g. test files "
    "kept apart from the val files)",
)
@click.option(
    "--cap-epochs",
    is_flag=True,
    help="report runs keep the last in-ball epoch only up to the epoch chosen on the selection split "
    "(default, as upstream: the last in-ball epoch of the full training)",
)
@click.option(
    "--fixed-lam",
    is_flag=True,
    help="use the config's λ for every task (default, as upstream: country_capital draws "
    "λ = floor(10^U(2, 3.5)), the others use λ = 1000)",
)
@guard
def sweep_cmd(trials, report_split, report_data_dir, cap_epochs, fixed_lam, **kwargs):
    """Random search (appendix C): select hyperparameters on one split, report on another."""
    from ..sweep import sweep

    run = _make_run(kwargs)
    out = sweep(run, trials, report_split, report_data_dir, cap_epochs, fixed_lam)
    click.echo(json.dumps({"best": out["best"], "report": str(run.dir / "report.md")}, default=str))


@click.command("protocol")
@_common
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="seeds per method (train.seed, train.seed + 1, ...); upstream's test protocol runs 10",
)
@click.option(
    "--methods",
    default="senses",
    show_default=True,
    help="comma-separated: senses, full-backpack, lora-backpack, full-large, lora-large",
)
@guard
def protocol_cmd(seeds, methods, **kwargs):
    """Run every method on every seed into RUN_DIR/<method>/seed-<s>/ and write Tables 3/4 with standard errors."""
    from ..config import METHODS
    from ..protocol import protocol

    ms = tuple(m.strip() for m in methods.split(",") if m.strip())
    bad = [m for m in ms if m not in METHODS]
    if bad or not ms:
        raise ConfigError(f"--methods: unknown {', '.join(bad) or '(none given)'} (known: {', '.join(METHODS)})")
    run = _make_run(kwargs)
    click.echo(json.dumps(protocol(run, seeds, ms)))


@click.command("table")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--out", type=click.Path(file_okay=False), required=True, help="folder for tables.{md,json,png}")
@click.option("--stem", default="tables", show_default=True, help="file name stem")
@click.option(
    "--sample-sd",
    is_flag=True,
    help="standard error from the sample SD (n − 1); default, as upstream's report: numpy's np.std (n)",
)
@guard
def table_cmd(run_dirs, out, stem, sample_sd):
    """Tables 3 and 4 across tasks, methods and seeds (mean ± standard error) from run or protocol folders."""
    from ..tables import find_reports, write_tables

    reports = find_reports(run_dirs)
    paths = write_tables(reports, out, stem, ddof=1 if sample_sd else 0)
    click.echo(json.dumps({k: str(v) for k, v in paths.items()} | {"runs": len(reports)}))
