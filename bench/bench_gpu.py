"""Ensemble/base throughput at the paper's real shapes: GPT-J-6B + backpack-gpt2, random weights.

    python bench/bench_gpu.py                          # GPU: GPT-J-6B architecture, bf16, batch 1, 8, 32
    python bench/bench_gpu.py --shapes small --device cpu --batches 1 4   # the CPU check of this script
    python bench/bench_gpu.py --shapes cpu --batches 1 8 --prompt-len 64 --new-tokens 16   # CPU column

Weights do not change speed, so both models are random and built directly on the device (no 12 GB download,
no disk): GPT-J-6B's architecture (n_embd 4096, 28 layers, 16 heads, rotary 64, vocab 50400; 6.05B
parameters) and backpack-gpt2's (n_embd 768, 12 layers, 16 senses, vocab 50264; 170M). Three arms per batch,
interleaved over --rounds rounds so clock drift hits each alike, reported as generated tokens/s (median):

  base             the large model alone (Ensemble with no pack: the Backpack never runs)
  pack absent      a pack is named but none of its tokens occur (exact skip: the Backpack never runs)
  pack in prompt   every prompt starts with an edited token (the Backpack runs every step for every row)

Targets: ≥ 0.97 with edits active, ≥ 0.99 with exact skip; the physical limit is ≈ 0.98, since
the Backpack's serving side reads ~0.25 GB per token against GPT-J's ~12 GB.

The vLLM arm of the same comparison is `bench/bench_vllm.py --shapes gptj-6b` on a host with vLLM's CUDA
build (it does not fit through the device tool's 64 MiB transfer; see bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import GPTJConfig, GPTJForCausalLM

from ensemble.backpack import BackpackConfig, BackpackLM
from ensemble.edits import PackRef, SenseEdits
from ensemble.ensemble import Ensemble
from ensemble.vocab import Vocabulary

SHAPES = {
    # (GPT-J config, Backpack config)
    "gptj-6b": (
        GPTJConfig(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, n_positions=2048, vocab_size=50400),
        BackpackConfig(),
    ),  # the defaults are backpack-gpt2's
    # bench_core.py's end-to-end case (608M vs 18M): the CPU column beside the GPU numbers
    "cpu": (
        GPTJConfig(n_embd=1536, n_layer=16, n_head=16, rotary_dim=64, n_positions=2048, vocab_size=50400),
        BackpackConfig(n_embd=256, n_layer=4, n_head=4, num_senses=8, sense_intermediate_scale=2),
    ),
    "small": (
        GPTJConfig(n_embd=256, n_layer=4, n_head=4, rotary_dim=32, n_positions=512, vocab_size=50400),
        BackpackConfig(n_embd=64, n_layer=2, n_head=2, num_senses=4, sense_intermediate_scale=2),
    ),
}


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def build(shapes: str, device: torch.device, dtype: torch.dtype) -> tuple[GPTJForCausalLM, BackpackLM]:
    large_cfg, bp_cfg = SHAPES[shapes]
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the serving dtype: no float32 copy of 6B parameters
    try:
        with device:
            large = GPTJForCausalLM(large_cfg).eval()
            bp = BackpackLM(bp_cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    return large, bp


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="gptj-6b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="default: bfloat16 on cuda, float32 on cpu",
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    t0 = time.perf_counter()
    large, bp = build(args.shapes, device, dtype)
    sync(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"machine: {name}, torch {torch.__version__}, dtype {dtype}, built in {time.perf_counter() - t0:.1f} s")
    print(
        f"large GPT-J {n_params(large) / 1e9:.2f}B params, Backpack {n_params(bp) / 1e6:.0f}M "
        f"(1/{n_params(large) / n_params(bp):.0f}), prompt {args.prompt_len}, {args.new_tokens} new tokens"
    )

    ens = Ensemble(large, bp, vocab=Vocabulary.gpt2())
    k, d = bp.config.num_senses, bp.config.n_embd
    trig = 777
    g = torch.Generator().manual_seed(1)
    pack = PackRef(
        "bench", "v1", SenseEdits(torch.full((k,), trig), torch.arange(k), torch.randn(k, d, generator=g)), 1.0
    )

    def run(ps: list[list[int]], packs: list[PackRef]) -> float:
        sync(device)
        t = time.perf_counter()
        out = ens.generate_greedy(ps, [packs] * len(ps), args.new_tokens)
        sync(device)
        assert all(len(o) == args.new_tokens for o in out), "greedy stopped early"
        return len(ps) * args.new_tokens / (time.perf_counter() - t)

    summary = []
    for batch in args.batches:
        prompts = torch.randint(1000, 50000, (batch, args.prompt_len), generator=g).tolist()
        with_trig = [[trig, *p[1:]] for p in prompts]
        arms = [("base", prompts, []), ("pack absent", prompts, [pack]), ("pack in prompt", with_trig, [pack])]
        run(with_trig, [pack])  # warm-up: kernels, allocator
        res: dict[str, list[float]] = {a: [] for a, _, _ in arms}
        for _ in range(args.rounds):
            for label, ps, packs in arms:
                calls = ens.stats.backpack_calls
                res[label].append(run(ps, packs))
                print(
                    f"  batch {batch:3d}  {label:15s} {res[label][-1]:9.1f} tok/s "
                    f"(backpack calls {ens.stats.backpack_calls - calls})",
                    flush=True,
                )
        med = {a: statistics.median(v) for a, v in res.items()}
        edited, skip = med["pack in prompt"] / med["base"], med["pack absent"] / med["base"]
        summary.append((batch, med["base"], edited, skip))
    print(f"\nsummary ({args.shapes}, {dtype}, {name}; median of {args.rounds} interleaved rounds)")
    print("| batch | base tok/s | ensemble/base, pack in prompt | ensemble/base, pack absent |")
    print("|---:|---:|---:|---:|")
    for batch, base, edited, skip in summary:
        print(f"| {batch} | {base:.1f} | {edited:.3f} | {skip:.3f} |")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
