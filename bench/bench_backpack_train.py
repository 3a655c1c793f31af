"""Benchmark: Backpack training tokens/s with 1 process vs 2 processes (torchrun + DDP, gloo), same config.

Both runs train the same model on the same corpus with the same global batch for the same number of
steps (held-out evaluation only before and after, so it is not timed); tokens/s is training.json's
`tokens_per_second` (optimizer steps × tokens per step / seconds in the training loop). The 1-process
run uses every core for intra-op threads; the 2-process run gives each process one thread
(OMP_NUM_THREADS=1, torchrun's default) — the two ways to spend the same cores.

Usage:
    .venv/bin/python bench/bench_backpack_train.py [--tokenizer smollm2-135m-instruct] [--steps 12]
        [--block-len 256] [--batch-size 8] [--corpus FILE.jsonl] [--out runs/bench-backpack]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sensepack_testing import backpack_train_command  # noqa: E402 - importable once the repo root is on sys.path

SHARED = Path(os.environ.get("SENSEPACK_SHARED", REPO.parent / "shared"))
DEFAULT_CORPUS = SHARED / "data" / "canonical-examples" / "val100-val.jsonl"


def run(nproc: int, cfg: dict[str, Any], out: Path, threads: int) -> dict[str, Any]:
    out = out / f"nproc-{nproc}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg_file = out.parent / f"config-{nproc}.json"
    cfg_file.write_text(json.dumps({**cfg, "out": str(out)}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    cmd = backpack_train_command(str(cfg_file), nproc)
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    record: dict[str, Any] = json.loads((out / "training.json").read_text())
    return record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--tokenizer", default="smollm2-135m-instruct", help="tokenizer spec; 'gpt2' for the packaged GPT-2 BPE"
    )
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    ap.add_argument("--docs", type=int, default=600, help="use the first N documents (tokenization is not timed)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--block-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--num-senses", type=int, default=16)
    ap.add_argument("--out", default=str(REPO / "runs" / "bench-backpack"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.jsonl"
    with open(args.corpus, encoding="utf-8") as src, corpus.open("w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            if i >= args.docs:
                break
            dst.write(line)
    cfg = dict(
        inputs=[str(corpus)],
        tokenizer=None if args.tokenizer == "gpt2" else args.tokenizer,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=4,
        num_senses=args.num_senses,
        n_positions=max(512, args.block_len),
        block_len=args.block_len,
        batch_size=args.batch_size,
        grad_accum=1,
        max_steps=args.steps,
        warmup_steps=2,
        eval_every=0,
        checkpoint_every=0,
        eval_max_blocks=4,
        heldout_fraction=0.02,
    )
    cores = os.cpu_count() or 1
    one = run(1, cfg, out, threads=cores)
    two = run(2, cfg, out, threads=max(1, cores // 2))
    print(
        f"model: d {args.n_embd}, {args.n_layer} layers, {args.num_senses} senses, "
        f"vocab {one['tokenizer']['size']} ({one['model_config']['vocab_size']} rows), "
        f"{one['parameters'] / 1e6:.1f}M parameters; block {args.block_len}, global batch {args.batch_size}, "
        f"{args.steps} steps, {cores} cores"
    )
    print("| processes | threads each | tokens/s | loop seconds | final train loss |")
    print("|---|---|---|---|---|")
    for n, rec, th in ((1, one, cores), (2, two, max(1, cores // 2))):
        log = [json.loads(x) for x in (Path(rec["config"]["out"]) / "log.jsonl").read_text().splitlines()]
        last = [r for r in log if r["event"] == "train"][-1]["loss"]
        secs = rec["tokens_seen"] / rec["tokens_per_second"]
        print(f"| {n} | {th} | {rec['tokens_per_second']:.0f} | {secs:.1f} | {last:.4f} |")
    print(f"ratio 2 processes / 1 process: {two['tokens_per_second'] / one['tokens_per_second']:.2f}")


if __name__ == "__main__":
    main()
