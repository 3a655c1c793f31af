"""``train_edits backpack``: train a Backpack from scratch for any tokenizer.

    train_edits backpack train corpus.jsonl --tokenizer smollm2-135m-instruct --out runs/bp --max-minutes 30
    torchrun --nproc_per_node 4 -m train_edits backpack train corpus.jsonl --out runs/bp ...

Exit codes: 0 success, 1 failure (bad data, missing file, runtime error), 2 usage (bad option or config).
"""

from __future__ import annotations

import json

import click

from ..backpack_trainer.config import INIT_CHOICES, BackpackTrainConfig
from .common import guard

# (option, config field, click type, help); every option defaults to the config's value.
_OPTIONS = [
    ("--out", "out", str, "output folder (BackpackLM.from_pretrained loads it)"),
    ("--tokenizer", "tokenizer", str, "tokenizer: folder, hub id or registry name (default: packaged GPT-2)"),
    ("--text-field", "text_field", str, "JSONL field holding the document text"),
    ("--hf-dataset", "hf_dataset", str, "stream a Hugging Face dataset instead of files (needs network + datasets)"),
    ("--hf-config", "hf_config", str, "dataset config name"),
    ("--hf-split", "hf_split", str, "dataset split"),
    ("--hf-limit", "hf_limit", int, "read only the first N documents"),
    ("--heldout-fraction", "heldout_fraction", float, "fraction of documents held out"),
    ("--eval-max-blocks", "eval_max_blocks", int, "held-out blocks scored at each evaluation"),
    ("--seed", "seed", int, "seed of the split, the block order and the init"),
    ("--n-embd", "n_embd", int, "model width d"),
    ("--n-layer", "n_layer", int, "transformer layers"),
    ("--n-head", "n_head", int, "attention heads"),
    ("--num-senses", "num_senses", int, "sense vectors per token (k)"),
    ("--n-positions", "n_positions", int, "context length"),
    ("--sense-intermediate-scale", "sense_intermediate_scale", int, "sense MLP width / d"),
    ("--pad-vocab-multiple", "pad_vocab_multiple", int, "round the vocab rows up to a multiple of this"),
    ("--block-len", "block_len", int, "tokens per training block (default: n_positions)"),
    ("--batch-size", "batch_size", int, "blocks per optimizer step (global: all processes, all micro-steps)"),
    ("--grad-accum", "grad_accum", int, "micro-steps per optimizer step"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--min-lr-ratio", "min_lr_ratio", float, "final LR / peak LR (cosine floor)"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps"),
    ("--decay-steps", "decay_steps", int, "cosine length in steps (default: the step budget)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (2-D weights only)"),
    ("--grad-clip", "grad_clip", float, "max global gradient norm (0: off)"),
    ("--max-steps", "max_steps", int, "budget: optimizer steps"),
    ("--max-tokens", "max_tokens", int, "budget: training tokens"),
    ("--max-minutes", "max_minutes", float, "budget: wall-clock minutes"),
    ("--init-embeddings", "init_embeddings", click.Choice(INIT_CHOICES), "E from the large model's embedding"),
    ("--init-from", "init_from", str, "large model for --init-embeddings (default: --distill-from)"),
    ("--distill-from", "distill_from", str, "teacher large model (same tokenizer) for distillation"),
    ("--distill-weight", "distill_weight", float, "w in (1−w)·CE + w·KD"),
    ("--distill-topk", "distill_topk", int, "teacher log-probs kept per position"),
    ("--distill-cache", "distill_cache", click.Choice(["on", "off"]), "teacher top-k cached on disk or on the fly"),
    ("--cache-dir", "cache_dir", str, "distillation cache folder (default ~/.cache/sensepack/distill)"),
    ("--large-dtype", "large_dtype", str, "dtype of the teacher / init model"),
    ("--device", "device", str, "torch device (auto: cuda:LOCAL_RANK if available)"),
    ("--eval-every", "eval_every", int, "steps between held-out evaluations (0: start and end)"),
    ("--checkpoint-every", "checkpoint_every", int, "steps between checkpoints (0: end only)"),
    ("--keep-checkpoints", "keep_checkpoints", int, "checkpoints kept (0: deleted after a successful end)"),
]


def _dropout_and_flags(f):
    f = click.option("--dropout", type=float, default=None, help="attn/embd/resid dropout (default 0)")(f)
    f = click.option("--amp/--no-amp", default=None, help="bf16 autocast on CUDA (default on)")(f)
    f = click.option("--resume", is_flag=True, help="continue from OUT/checkpoints/latest")(f)
    f = click.option("--no-progress", is_flag=True, help="no progress bar")(f)
    f = click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, exists=True),
        help="JSON or YAML file of BackpackTrainConfig fields (options override it)",
    )(f)
    return f


def _options(f):
    for opt, dest, typ, hlp in reversed(_OPTIONS):
        default = getattr(BackpackTrainConfig, dest, None)
        shown = f"{hlp} [default: {default}]" if default is not None else hlp
        f = click.option(opt, dest, type=typ, default=None, help=shown)(f)
    return f


def config_from_options(inputs, config_file, dropout, amp, resume, **opts) -> BackpackTrainConfig:
    data: dict = {}
    if config_file:
        from ..config import load_config_file

        data = load_config_file(config_file)
    if inputs:
        data["inputs"] = list(inputs)
    for key, value in opts.items():
        if value is not None:
            data[key] = value
    if dropout is not None:
        data.update(attn_pdrop=dropout, embd_pdrop=dropout, resid_pdrop=dropout)
    if amp is not None:
        data["amp"] = amp
    if resume:
        data["resume"] = True
    return BackpackTrainConfig.from_dict(data)


@click.group("backpack", context_settings={"help_option_names": ["-h", "--help"]})
def backpack():
    """Train a Backpack LM from scratch for any tokenizer (single process or torchrun)."""


@backpack.command("train")
@click.argument("inputs", nargs=-1, type=click.Path(dir_okay=False))
@_options
@_dropout_and_flags
@guard
def train_cmd(inputs, no_progress, **kwargs):
    """Train on INPUTS (.jsonl / .jsonl.gz with a text field, .txt) or --hf-dataset.

    Writes OUT/config.json + model.safetensors + tokenizer files (BackpackLM.from_pretrained
    loads OUT), training.json (the recipe and results), log.jsonl, loss.png and checkpoints/.
    Under torchrun every process runs this same command; only rank 0 writes.
    """
    from ..backpack_trainer.trainer import train_backpack

    cfg = config_from_options(inputs, **kwargs)
    out = train_backpack(cfg, progress=not no_progress)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        rec = json.loads((out / "training.json").read_text())
        click.echo(
            json.dumps(
                {
                    "out": str(out),
                    "steps": rec["steps"],
                    "tokens_seen": rec["tokens_seen"],
                    "heldout_nll": rec["heldout"]["nll"],
                    "heldout_ppl": rec["heldout"]["ppl"],
                    "seconds": round(rec["seconds"], 1),
                }
            )
        )
