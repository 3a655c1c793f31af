"""Benchmark: sense-finetuning time per epoch for each of the six val tasks, tiny Backpack.

Per task: all canonical examples of the val split (tokenized with the tiny
Backpack's 128-token context), sense selection with k=8 and λ=1000 over R,
then `--epochs` epochs with AdamW, batch 1, grad_accum 5, KL weight 0.3 on a
random R chunk per step, and the G ratio measured after every epoch (success
per epoch off). Reports the mean wall time per epoch (everything inside the
epoch loop: steps, KL, G ratio) and the setup time (α caches, base G loss).

Usage:
    .venv/bin/python bench/bench_train_epoch.py [--epochs 2] [--g-chunks 32] [--r-chunks 64] [--tasks a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from ensemble.backpack import BackpackConfig, BackpackLM
from ensemble.tokenizer import load_tokenizer
from train_edits.corpora import read_documents, split_corpora
from train_edits.evaluate import EncodedTask
from train_edits.finetune import EpochRecord, FinetuneParams, finetune
from train_edits.selection import background_table, select_senses
from train_edits.tasks import TASKS, TaskData

# the paper's canonical examples, beside the repo as in tests/conftest.py (or where the variable says)
DATA = os.environ.get(
    "SENSEPACK_CANONICAL_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "canonical-examples")
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--g-chunks", type=int, default=32)
    ap.add_argument("--r-chunks", type=int, default=64)
    ap.add_argument("--chunk-len", type=int, default=128)
    ap.add_argument("--tasks", default=",".join(TASKS))
    args = ap.parse_args()
    tok = load_tokenizer()
    docs = read_documents([f"{DATA}/val100-val.jsonl"])[:600]
    sp = split_corpora(tok, docs, chunk_len=args.chunk_len, seed=0)
    g = [torch.tensor(c) for c in sp.g[: args.g_chunks]]
    r = [torch.tensor(c) for c in sp.r[: args.r_chunks]]
    torch.manual_seed(0)
    bp = BackpackLM(BackpackConfig.tiny()).eval()
    bg = background_table(bp, r)
    for name in args.tasks.split(","):
        data = TaskData.builtin(name, DATA)
        task = EncodedTask.encode(tok, data, bp.config.n_positions)
        t0 = time.perf_counter()
        sel = select_senses(bp, task.train, bg, task.loss_type, 8, 1000.0)
        t_sel = time.perf_counter() - t0
        stamps: list[tuple[float, float]] = []
        params = FinetuneParams(lr=1e-2, kl_weight=0.3, epochs=args.epochs, grad_accum=5, eval_every_epoch=False)
        t0 = time.perf_counter()

        def on_epoch(_rec: EpochRecord, stamps: list[tuple[float, float]] = stamps) -> None:
            stamps.append((time.perf_counter(), time.process_time()))

        res = finetune(
            bp,
            task.train,
            task.loss_type,
            sel.pairs,
            g,
            r,
            params,
            progress=False,
            on_epoch=on_epoch,
        )
        total = time.perf_counter() - t0
        per_epoch = (stamps[-1][0] - stamps[0][0]) / args.epochs
        per_epoch_cpu = (stamps[-1][1] - stamps[0][1]) / args.epochs
        print(
            json.dumps(
                {
                    "bench": "train_epoch",
                    "task": name,
                    "loss_type": task.loss_type.value,
                    "examples": len(task.train),
                    "suffix_tokens": sum(s.n for e in task.train for s in e.seqs),
                    "senses": len(sel.pairs),
                    "epochs": args.epochs,
                    "seconds_per_epoch": round(per_epoch, 2),
                    "cpu_seconds_per_epoch": round(per_epoch_cpu, 2),
                    "setup_s": round(stamps[0][0] - t0, 2),
                    "select_s": round(t_sel, 2),
                    "total_s": round(total, 2),
                    "g_chunks": len(g),
                    "r_chunks": len(r),
                    "chunk_len": args.chunk_len,
                    "g_ratio_last": res.history[-1].g_ratio,
                    "threads": torch.get_num_threads(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
