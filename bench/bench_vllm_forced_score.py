"""Score through the serving vLLM engine by forced decoding (the adopted option).

    VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_ENABLE_V1_MULTIPROCESSING=0 \\
        .venv-vllm/bin/python bench/bench_vllm_forced_score.py [--positions 32 128 512] [--clients 8]
    # on a CUDA host with vLLM's CUDA build (GPT-J-6B's architecture, bf16, vLLM's dummy weights):
    python bench/bench_vllm_forced_score.py --shapes gptj-6b --positions 128 512 1024 --clients 32

Two measurements, side by side in one run, on `serve.vllm.engine.VLLMEngine` + `serve.vllm.scoring.VLLMScorer`
(what the server runs with `engine: vllm`). `--shapes tiny` (default): tiny random GPT-J (n_embd 64,
vocabulary 50400) + tiny Backpack, saved weights; `gptj-6b` / `dummy-small`: GPT-J-6B's architecture (or the
same code path at toy size, for a CPU check) with vLLM's dummy weights and backpack-gpt2's architecture:

1. **Score of one continuation** of N tokens (base and packed) through vLLM, and the time of one prefill of
   the same row (prefix + continuation, one new token): the lower bound a prefill-based Score (a
   `compute_logits` wrapper, docs/vllm.md option 4) would approach. With `--shapes tiny` also the embedded
   engine's `Ensemble.score` on the same weights and the largest difference (vLLM's kernels against
   transformers'). N = 512 runs past the tiny Backpack's 128 positions (the sliding-window path).
2. **Decoding while a Score runs**: `--clients` greedy generations of 64 tokens alone, then again with a
   256-token Score submitted at the same time. Printed: generation tokens/s (ratio with/alone) and the
   largest gap between two tokens of one stream (a Score must never stall decoding for longer than a step).

Results: bench/RESULTS.md ("Score through vLLM: forced decoding").
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # sensepack_testing lives at the repo root


def _generate(engine: Any, prompts: list[list[int]], pack: Any, n_tokens: int) -> tuple[float, float, int]:
    """(seconds, largest inter-token gap in any stream, tokens) for greedy generations run together."""
    from serve import engine as eng
    from serve.params import GenerationRequest
    from serve.sampling_params import SamplingParams

    seqs = [
        engine.submit(
            GenerationRequest(
                request_id=f"b{i}",
                prompt_ids=p,
                packs=[],
                sampling=SamplingParams(max_new_tokens=n_tokens, ignore_eos=True, greedy=True),
            ),
            [pack] if i % 2 == 0 else [],
        )
        for i, p in enumerate(prompts)
    ]
    t0 = time.perf_counter()
    gap, tokens = 0.0, 0
    for seq in seqs:
        last = None
        while True:
            ev = seq.events.get(timeout=600)
            now = time.perf_counter()
            if last is not None:
                gap = max(gap, now - last)
            last = now
            if isinstance(ev, eng.FinishEvent):
                tokens += len(ev.output_ids)
                break
    return time.perf_counter() - t0, gap, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, nargs="+", default=[32, 128, 512], help="continuation lengths to score")
    ap.add_argument("--clients", type=int, default=8, help="concurrent generations in part 2")
    ap.add_argument("--shapes", choices=["tiny", "dummy-small", "gptj-6b"], default="tiny", help="model sizes")
    args = ap.parse_args()

    from ensemble.backpack import BackpackConfig, BackpackLM
    from ensemble.demo import demo_pack, tiny_backpack
    from ensemble.ensemble import Ensemble
    from ensemble.tokenizer import load_tokenizer
    from sensepack_testing.vllm import save_dummy_gptj, save_tiny_gptj
    from serve.config import LimitsConfig
    from serve.metrics import Metrics
    from serve.vllm.engine import VLLMEngine
    from serve.vllm.resolver import REGISTRY, DictSource
    from serve.vllm.scoring import VLLMScorer

    folder = tempfile.mkdtemp(prefix="bench-vllm-forced-")
    tok = load_tokenizer()
    max_len = max(*args.positions, 256) + 72  # prefix 8 + the longest continuation (part 2 scores 256 tokens)
    # no prefix caching: the prefill timed after a Score of the same row must not hit its cached blocks
    engine_args: dict[str, Any] = dict(
        model=folder, max_model_len=max_len, max_num_seqs=max(32, args.clients + 2), seed=0, enable_prefix_caching=False
    )
    ens = None
    if args.shapes == "tiny":
        large = save_tiny_gptj(folder, seed=0)
        bp = tiny_backpack(0)
        ens = Ensemble(large, bp, tok)
        engine_args.update(dtype="float32", enforce_eager=True)
    else:  # config only: vLLM makes random weights itself (as bench/bench_vllm.py --shapes gptj-6b)
        big = args.shapes == "gptj-6b"
        save_dummy_gptj(folder, big)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        bp = BackpackLM(BackpackConfig() if big else BackpackConfig.tiny()).eval()
        bp = bp.to(dev, torch.bfloat16 if dev == "cuda" else torch.float32)
        engine_args.update(
            dtype="bfloat16" if dev == "cuda" else "float32", load_format="dummy", enforce_eager=dev != "cuda"
        )
    pack = demo_pack(bp, tok)
    engine = VLLMEngine(
        engine_args,
        tok,
        LimitsConfig(max_running=32, max_waiting=64, max_prompt_tokens=max_len, max_new_tokens=max_len),
        Metrics(),
        backpack=bp,
        pack_source=DictSource({(pack.name, pack.version): pack.edits}),
    )
    engine.start()
    scorer = VLLMScorer(engine)
    print(f"# {platform.node()} torch {torch.__version__}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")
    text = " ".join(["The capital of Mauritius is Port Louis, an island city by the sea."] * 80)
    ids = tok(text).input_ids
    try:
        print("part 1: one continuation, base + packed")
        _generate(engine, [ids[:8]], pack, 2)  # warm
        for n in args.positions:
            prefix, cont = ids[:8], ids[8 : 8 + n]
            t0 = time.perf_counter()
            base, packed = scorer.score(prefix, cont, [pack], True, True).result(timeout=600)
            t_vllm = time.perf_counter() - t0
            t_prefill, _, _ = _generate(engine, [prefix + cont], pack, 1)  # one prefill of the same row
            line = (
                f"  positions {n:4d}: vLLM forced {t_vllm:6.2f} s ({1e3 * t_vllm / n:5.1f} ms/token)"
                f" | one prefill of the row {t_prefill:5.2f} s (forced / prefill {t_vllm / t_prefill:5.1f})"
            )
            if ens is not None:
                t0 = time.perf_counter()
                ref_b = ens.score([prefix], [cont], [[]])[0]
                ref_p = ens.score([prefix], [cont], [[pack]])[0]
                t_emb = time.perf_counter() - t0
                d_base, d_packed = float((base - ref_b).abs().max()), float((packed - ref_p).abs().max())
                line += (
                    f" | embedded Ensemble.score {t_emb:5.2f} s | max |diff| base {d_base:.1e} packed {d_packed:.1e}"
                )
            print(line)
        print(f"part 2: {args.clients} greedy generations of 64 tokens, alone and beside a 256-token Score")
        prompts = [ids[i : i + 6] for i in range(args.clients)]  # half carry the pack (its tokens are in `ids`)
        _generate(engine, prompts, pack, 8)  # warm
        secs, gap, n_tok = _generate(engine, prompts, pack, 64)
        done = threading.Event()
        job = scorer.score(ids[:8], ids[8:264], [pack], True, True)
        job.future.add_done_callback(lambda f: done.set())
        secs2, gap2, n_tok2 = _generate(engine, prompts, pack, 64)
        job.result(timeout=600)
        print(f"  alone:        {n_tok / secs:7.1f} tok/s, largest inter-token gap {1e3 * gap:6.1f} ms")
        print(f"  beside Score: {n_tok2 / secs2:7.1f} tok/s, largest inter-token gap {1e3 * gap2:6.1f} ms")
        print(f"  ratio (beside / alone): {(n_tok2 / secs2) / (n_tok / secs):.2f}; Score done: {done.is_set()}")
    finally:
        engine.stop(0)
        REGISTRY.clear()


if __name__ == "__main__":
    main()
