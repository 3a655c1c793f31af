"""vLLM throughput with the sensepack logits processor vs without (same model, same batch).

    VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_ENABLE_V1_MULTIPROCESSING=0 \
        .venv-vllm/bin/python bench/bench_vllm.py [--batch 8 --prompt-len 64 --new-tokens 32 --repeat 3]

Three runs of the same greedy batch (ignore_eos, fixed lengths), each timed end to end with
`LLM.generate` and reported as generated tokens/s (best of --repeat, interleaved; the share of each run spent
inside the processor is the median):

  plain   vLLM without any custom logits processor
  skip    vLLM with the processor, requests naming a pack none of whose tokens occur (exact skip:
          the processor only masks padding ids; the Backpack never runs)
  edited  vLLM with the processor, every request's prompt carries edited tokens (the Backpack
          runs every step for every row)

Model sizes (--shapes): `cpu` (default) follows bench/bench_core.py's end-to-end case, a GPT-J with n_embd 1024,
16 layers, head_dim 64 (random weights, float32) and a Backpack of n_embd 256, 4 layers, 8 senses; `small` is a
smoke run; `gptj-6b` is the paper's pairing at its real shapes for a GPU host with vLLM's CUDA build:
GPT-J-6B's architecture in bfloat16 with vLLM's dummy (random) weights, so only config.json and the tokenizer
are written, and backpack-gpt2's architecture on the same GPU:

    .venv-vllm/bin/python bench/bench_vllm.py --shapes gptj-6b --batch 32 --prompt-len 128 --new-tokens 64
Results: bench/RESULTS.md (vLLM section).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # sensepack_testing lives at the repo root

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--shapes",
        choices=["cpu", "small", "gptj-6b", "dummy-small"],
        default="cpu",
        help="dummy-small: the gptj-6b code path (dummy weights, config only) at tiny sizes, for a CPU check",
    )
    ap.add_argument("--small", action="store_true", help="same as --shapes small")
    args = ap.parse_args()

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from ensemble.backpack import BackpackConfig, BackpackLM
    from ensemble.vocab import Vocabulary
    from sensepack_testing.vllm import random_pack, save_tiny_gptj
    from serve.vllm import V1_PROCESSOR_FQCN
    from serve.vllm.args import build_extra_args
    from serve.vllm.resolver import REGISTRY, DictSource

    folder = tempfile.mkdtemp(prefix="bench-vllm-")
    shapes = "small" if args.small else args.shapes
    dtype, load_format, max_len = "float32", "auto", 512
    if shapes == "small":
        large = save_tiny_gptj(folder, seed=0)
        bp = BackpackLM(BackpackConfig.tiny()).eval()
    elif shapes in ("gptj-6b", "dummy-small"):
        from transformers import GPTJForCausalLM

        from sensepack_testing.vllm import save_dummy_gptj

        big = shapes == "gptj-6b"
        cfg = save_dummy_gptj(folder, big)
        with torch.device("meta"):  # parameter count only; vLLM makes the random weights itself
            large = GPTJForCausalLM(cfg)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        bp = (
            BackpackLM(BackpackConfig() if big else BackpackConfig.tiny())
            .to(dev, torch.bfloat16 if dev == "cuda" else torch.float32)
            .eval()
        )
        dtype, load_format, max_len = ("bfloat16" if dev == "cuda" else "float32"), "dummy", 2048 if big else 512
    else:
        large = save_tiny_gptj(folder, seed=0, n_embd=1024, n_layer=16, n_head=16, rotary_dim=64)
        torch.manual_seed(0)
        bp = BackpackLM(
            BackpackConfig(n_embd=256, n_layer=4, n_head=4, num_senses=8, sense_intermediate_scale=2, n_positions=512)
        ).eval()
    n_large, n_bp = n_params(large), n_params(bp)
    del large

    g = torch.Generator().manual_seed(0)
    # prompts draw ids from [1000, 50000); edited tokens are 100..107 (present only in the "edited" prompts)
    prompts = [torch.randint(1000, 50000, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    edited_prompts = [[100 + i % 8, *p[1:]] for i, p in enumerate(prompts)]
    pack = random_pack(bp, list(range(100, 108)), name="bench", version="v1", beta=1.0, seed=0)
    REGISTRY.configure(bp, DictSource({(pack.name, pack.version): pack.edits}), vocab_size=Vocabulary.gpt2().size)

    def params(with_pack: bool) -> Any:
        return SamplingParams(
            temperature=0.0,
            max_tokens=args.new_tokens,
            ignore_eos=True,
            extra_args=build_extra_args([pack]) if with_pack else None,
        )

    def batch(ps: list[list[int]], with_pack: bool) -> tuple[list[Any], list[Any]]:
        return [TokensPrompt(prompt_token_ids=p) for p in ps], [params(with_pack) for _ in ps]

    # time spent inside the processor (update_state + apply), to report its share of each run
    from serve.vllm.processor import SensepackLogitsProcessor as P

    inside = [0.0]
    orig_apply, orig_update = P.apply, P.update_state

    def apply(self: P, logits: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        try:
            return orig_apply(self, logits)
        finally:
            inside[0] += time.perf_counter() - t

    def update_state(self: P, bu: Any) -> None:
        t = time.perf_counter()
        try:
            return orig_update(self, bu)
        finally:
            inside[0] += time.perf_counter() - t

    mock.patch.object(P, "apply", apply).start()  # for the rest of this process
    mock.patch.object(P, "update_state", update_state).start()

    def timed(llm: Any, ps: list[list[int]], with_pack: bool) -> tuple[float, float]:
        prompts_, sp = batch(ps, with_pack)
        inside[0] = 0.0
        t0 = time.perf_counter()
        outs = llm.generate(prompts_, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        assert sum(len(o.outputs[0].token_ids) for o in outs) == len(ps) * args.new_tokens
        return dt, inside[0]

    common = dict(
        model=folder,
        dtype=dtype,
        load_format=load_format,
        enforce_eager=load_format != "dummy",
        max_model_len=max_len,
        max_num_seqs=max(args.batch, 1),
        seed=0,
    )
    if shapes == "gptj-6b" and torch.cuda.is_available():
        common["gpu_memory_utilization"] = 0.4  # two engines (plain, with the processor) share one GPU
    plain = LLM(**common)
    llm = LLM(**common, logits_processors=[V1_PROCESSOR_FQCN], logprobs_mode="processed_logprobs")
    proc = REGISTRY.processors[-1]
    cases = {"plain": (plain, prompts, False), "skip": (llm, prompts, True), "edited": (llm, edited_prompts, True)}
    for llm_, ps, wp in cases.values():  # warm-up
        timed(llm_, ps, wp)
    times: dict[str, list[float]] = {k: [] for k in cases}
    share: dict[str, list[float]] = {k: [] for k in cases}
    calls = {k: 0 for k in cases}
    for _ in range(args.repeat):  # interleaved, so drift on a shared box hits all three alike
        for k, (llm_, ps, wp) in cases.items():
            c0 = proc.core.tracker.stats.backpack_calls
            dt, ins = timed(llm_, ps, wp)
            times[k].append(dt)
            share[k].append(ins / dt)
            calls[k] += proc.core.tracker.stats.backpack_calls - c0
    # best-of-N: on a shared machine the fastest run is the least disturbed one
    tps = {k: args.batch * args.new_tokens / min(v) for k, v in times.items()}
    st = proc.core.tracker.stats
    tps_plain, tps_skip, tps_edit = tps["plain"], tps["skip"], tps["edited"]
    calls_after_skip = calls["skip"]

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch "
        f"{torch.__version__}, vllm {vllm.__version__}, threads {torch.get_num_threads()}"
    )
    print(
        f"large {n_large / 1e6:.1f}M params, backpack {n_bp / 1e6:.1f}M ({n_large / n_bp:.0f}x smaller); "
        f"batch {args.batch}, prompt {args.prompt_len}, new tokens {args.new_tokens}, best of {args.repeat}"
    )
    print(f"plain  : {tps_plain:8.1f} tok/s")
    print(
        f"skip   : {tps_skip:8.1f} tok/s   ratio {tps_skip / tps_plain:.3f}  (backpack calls {calls_after_skip}, "
        f"time inside the processor {statistics.median(share['skip']):.1%})"
    )
    print(
        f"edited : {tps_edit:8.1f} tok/s   ratio {tps_edit / tps_plain:.3f}  (backpack calls "
        f"{calls['edited']}, time inside the processor {statistics.median(share['edited']):.1%}, "
        f"backpack seconds in all runs {st.backpack_seconds:.2f})"
    )
    print("per-run seconds:", {k: [round(t, 3) for t in v] for k, v in times.items()})


if __name__ == "__main__":
    main()
