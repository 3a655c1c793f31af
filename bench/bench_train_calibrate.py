"""Benchmark: β calibration over an 11-point grid in one G pass vs one plain G pass of the large model.

The plain pass is what measuring the large model's own G loss costs: its forward
on every G batch plus the log-softmax NLL over the shared vocabulary. The
calibration pass does that too, plus, for rows holding an edited token, the
Backpack's α, δ, E·δ and one log-sum-exp per β at positions with δ ≠ 0.

Usage:
    .venv/bin/python bench/bench_train_calibrate.py [--chunks 24] [--chunk-len 128] [--repeats 3]

Writes one JSON line per configuration to stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ensemble.backpack import BackpackConfig, BackpackLM
from ensemble.edits import SenseEdits
from ensemble.large_model import tiny_gptj
from ensemble.tokenizer import load_tokenizer
from train_edits.calibrate import DEFAULT_GRID, CalibrationResult, calibrate, large_logits
from train_edits.compute import chunk_batches
from train_edits.corpora import read_documents, split_corpora

# the paper's canonical examples, beside the repo as in tests/conftest.py (or where the variable says)
DATA = os.environ.get(
    "SENSEPACK_CANONICAL_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "canonical-examples")
)
U = len(load_tokenizer())  # the tiny pairing shares GPT-2's tokenizer


@torch.no_grad()
def plain_pass(large: PreTrainedModel, g: Sequence[torch.Tensor], bs: int) -> float:
    tot = cnt = 0.0
    for _, ids, mask in chunk_batches(g, bs):
        z = large_logits(large, ids, U)[:, :-1]
        nll = torch.logsumexp(z, -1) - z.gather(-1, ids[:, 1:, None]).squeeze(-1)
        m = mask[:, :-1].bool()
        tot += float(nll[m].double().sum())
        cnt += int(m.sum())
    return tot / cnt


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time is less disturbed by other jobs on a shared box."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=24)
    ap.add_argument("--chunk-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--large-embd", type=int, default=512)
    ap.add_argument("--large-layers", type=int, default=6)
    ap.add_argument("--n-eps", type=int, nargs="+", default=[1], help="ε values calibrated in the same pass")
    ap.add_argument("--only", default=None, help="substring of the edit set names to run")
    ap.add_argument("--pack", default=None, help="an edit pack folder (else: a synthetic rare-token pack)")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    tok = load_tokenizer()
    docs = read_documents([f"{DATA}/val100-val.jsonl"])[:400]
    g = [torch.tensor(c) for c in split_corpora(tok, docs, chunk_len=args.chunk_len, seed=0).g[: args.chunks]]
    torch.manual_seed(0)
    bp = BackpackLM(BackpackConfig.tiny()).eval()
    large = tiny_gptj(seed=0, n_embd=args.large_embd, n_layer=args.large_layers, n_head=8, rotary_dim=16)
    n_params = sum(p.numel() for p in large.parameters())
    packs = {}
    if args.pack:
        from edits_store.format import read_pack

        p = read_pack(args.pack)
        packs["trained pack"] = SenseEdits(p.token_ids, p.sense_ids, p.deltas)
    else:
        # country-capital-like edits: senses of country and city names (rare in G)
        words = [" Afghanistan", " Kabul", " Albania", " Tirana", " Algeria", " Algiers", " capital", " Peru", " Lima"]
        tids = sorted({tok.encode(w, add_special_tokens=False)[0] for w in words})
        torch.manual_seed(1)
        packs["rare tokens (country names)"] = SenseEdits(
            torch.tensor(tids), torch.zeros(len(tids), dtype=torch.long), torch.randn(len(tids), 64)
        )
    frequent = sorted({tok.encode(w, add_special_tokens=False)[0] for w in (" the", ",", ".", " of", " and")})
    torch.manual_seed(2)
    packs["worst case (frequent tokens: the , . of and)"] = SenseEdits(
        torch.tensor(frequent), torch.zeros(len(frequent), dtype=torch.long), torch.randn(len(frequent), 64)
    )
    configs = [
        (name, edits, n) for name, edits in packs.items() for n in args.n_eps if not args.only or args.only in name
    ]

    def run(edits: SenseEdits, n_eps: int) -> CalibrationResult:
        eps_list = (1e-3, 1e-4, 1e-5)[:n_eps]
        return calibrate(
            large,
            bp,
            ((ids, m) for _, ids, m in chunk_batches(g, args.batch_size)),
            {e: edits for e in eps_list},
            DEFAULT_GRID,
            vocab_size=U,
        )

    plain_pass(large, g, args.batch_size)  # warm-up
    results = {i: run(edits, n) for i, (_, edits, n) in enumerate(configs)}
    plain_t: list[tuple[float, float]] = []
    cal_t: dict[int, list[tuple[float, float]]] = {i: [] for i in results}
    # interleaved repeats: the machine is shared, so each ratio pairs runs taken close together
    for _ in range(args.repeats):
        plain_t.append(timed(lambda: plain_pass(large, g, args.batch_size)))
        for i, (_, edits, n) in enumerate(configs):
            cal_t[i].append(timed(functools.partial(run, edits, n)))  # bind this iteration's values
    for i, (name, _, n_eps) in enumerate(configs):
        res = results[i]
        wall = [c[0] / p[0] for c, p in zip(cal_t[i], plain_t, strict=True)]
        cpu = [c[1] / p[1] for c, p in zip(cal_t[i], plain_t, strict=True)]
        print(
            json.dumps(
                {
                    "bench": "calibrate_one_pass_vs_plain_g_pass",
                    "edits": name,
                    "grid_points": len(DEFAULT_GRID),
                    "epsilons": n_eps,
                    "g_chunks": len(g),
                    "chunk_len": args.chunk_len,
                    "g_tokens": res.tokens,
                    "edited_positions_fraction": round(res.positions_computed / n_eps / res.tokens, 4),
                    "large_model": (
                        f"GPT-J arch n_embd={args.large_embd} n_layer={args.large_layers} "
                        f"({n_params / 1e6:.1f}M params)"
                    ),
                    "backpack": "tiny (n_embd=64, 2 layers, 4 senses)",
                    "plain_wall_s_median": round(statistics.median(p[0] for p in plain_t), 3),
                    "calibrate_wall_s_median": round(statistics.median(c[0] for c in cal_t[i]), 3),
                    "plain_cpu_s_median": round(statistics.median(p[1] for p in plain_t), 3),
                    "calibrate_cpu_s_median": round(statistics.median(c[1] for c in cal_t[i]), 3),
                    "cpu_ratio_median": round(statistics.median(cpu), 3),
                    "cpu_ratios": [round(x, 3) for x in cpu],
                    "wall_ratio_median": round(statistics.median(wall), 3),
                    "wall_ratios": [round(x, 3) for x in wall],
                    "beta": res.beta,
                    "threads": torch.get_num_threads(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
