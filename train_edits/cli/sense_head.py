"""``train_edits sense-head``: distil a sense head (ensemble.sense_head) from any causal LM.

    train_edits sense-head train --large smollm2-135m-instruct --out runs/sense-head --max-steps 600
    train_edits sense-head train corpus.jsonl.gz --large meta-llama/Llama-3.2-1B --out runs/llama-head

A run resumes from OUT/checkpoints/latest; the teacher pass is cached on disk and resumes by shard.
Exit codes: 0 success, 1 failure (bad data, missing file, runtime error), 2 usage (bad option).
"""

from __future__ import annotations

import json
from dataclasses import fields

import click

from ..sense_head_trainer import SAVE_DTYPES, SenseHeadTrainConfig
from .common import guard

# (option, config field, click type, help); every option defaults to the config's value.
_OPTIONS = [
    ("--out", "out", str, "output folder (SenseHeadLM.from_pretrained / --backpack loads it)"),
    ("--large", "large", str, "the large model: context and teacher (name, folder or hub id)"),
    ("--tokenizer", "tokenizer", str, "tokenizer (default: the large model's)"),
    ("--g-fraction", "g_fraction", float, "documents that go to G (held out), as prepare-corpora"),
    ("--split-seed", "split_seed", int, "seed of the G/R document split, as prepare-corpora --seed"),
    ("--block-len", "block_len", int, "tokens per training block"),
    ("--max-train-blocks", "max_train_blocks", int, "train on the first N blocks of R only"),
    ("--heldout-blocks", "heldout_blocks", int, "held-out blocks (the first of G)"),
    ("--num-senses", "num_senses", int, "sense vectors per token (k)"),
    ("--sense-intermediate-scale", "sense_intermediate_scale", int, "sense MLP width / d"),
    ("--max-distance", "max_distance", int, "relative-position bias buckets"),
    ("--n-positions", "n_positions", int, "sources α sees (a sliding window past it)"),
    ("--topk", "topk", int, "teacher log-probs kept per position"),
    ("--distill-weight", "distill_weight", float, "w in (1−w)·CE + w·KD"),
    ("--shard-blocks", "shard_blocks", int, "blocks per teacher-pass shard (the resume unit)"),
    ("--cache-dir", "cache_dir", str, "teacher-pass cache (default $SENSEPACK_CACHE/teacher)"),
    ("--batch-size", "batch_size", int, "blocks per optimizer step"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--min-lr-ratio", "min_lr_ratio", float, "final LR / peak LR (cosine floor)"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay"),
    ("--max-steps", "max_steps", int, "optimizer steps"),
    ("--eval-every", "eval_every", int, "steps between held-out evaluations (0: end only)"),
    ("--checkpoint-every", "checkpoint_every", int, "steps between checkpoints (0: none)"),
    ("--seed", "seed", int, "seed of the init and the block order"),
    ("--save-dtype", "save_dtype", click.Choice(sorted(SAVE_DTYPES)), "dtype of the written weights"),
    ("--threads", "threads", int, "torch threads (default: torch's)"),
    ("--device", "device", str, "torch device of the large model, the teacher pass and the head (e.g. cuda)"),
    ("--large-dtype", "large_dtype", str, "dtype of the large model (float32, bfloat16, float16)"),
]


@click.group("sense-head", context_settings={"help_option_names": ["-h", "--help"]})
def sense_head() -> None:
    """Distil a sense head: a Backpack whose α reads a frozen large model's hidden states."""


def _options(f):  # type: ignore[no-untyped-def]
    defaults = {fl.name: fl.default for fl in fields(SenseHeadTrainConfig)}
    for opt, dest, typ, hlp in reversed(_OPTIONS):
        default = defaults.get(dest)
        shown = f"{hlp} [default: {default}]" if default is not None else hlp
        f = click.option(opt, dest, type=typ, default=None, help=shown)(f)
    return f


@sense_head.command("train")
@click.argument("inputs", nargs=-1, type=click.Path(dir_okay=False))
@_options
@click.option("--drop-checkpoints", is_flag=True, help="remove OUT/checkpoints once the model is written")
@click.option("--no-progress", is_flag=True, help="no progress bars")
@guard
def train_cmd(inputs, drop_checkpoints, no_progress, **opts):  # type: ignore[no-untyped-def]
    """Distil on INPUTS (.jsonl / .jsonl.gz with a text field, .txt; default: the shipped OpenWebText sample).

    Writes OUT/config.json + model.safetensors (the head's weights only) + the large model's tokenizer files and
    training.json; prints one JSON line with the held-out NLL of the head and of the large model.
    """
    from ..sense_head_trainer import train_sense_head

    data = {k: v for k, v in opts.items() if v is not None}
    if inputs:
        data["inputs"] = list(inputs)
    if drop_checkpoints:
        data["keep_checkpoints"] = False
    cfg = SenseHeadTrainConfig(**data)
    out = train_sense_head(cfg, progress=not no_progress)
    rec = json.loads((out / "training.json").read_text())
    click.echo(
        json.dumps(
            {
                "out": str(out),
                "steps": rec["steps"],
                "parameters": rec["parameters"],
                "heldout_nll": rec["heldout_nll"],
                "large_heldout_nll": rec["large_heldout_nll"],
                "seconds": rec["total_seconds"],
            }
        )
    )
