"""Benchmarks of the ensemble core. Ratios are measured side by side in one run.

    .venv/bin/python bench/bench_core.py            # all three
    .venv/bin/python bench/bench_core.py --only e2e

1. Backpack incremental step vs full-prefix recompute (prefix 256, batch 8).
2. Cached-α delta step vs the paper's naive ensemble step (pre and finetuned Backpack
   over the full prefix, every token), prefix 256, batch 8.
3. End-to-end greedy decoding throughput, ensemble vs large model alone, with a
   Backpack of about 1/35 of the large model's parameters; pack tokens in the
   prompt vs absent.
4. (--only e2e-smollm2) the same on the real SmolLM2 pairing: smollm2-135m-instruct,
   backpack-smollm2 and the `capitals` pack of the capitals-smollm2 store (built and cached
   on first use), real prompts.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from ensemble.backpack import BackpackConfig, BackpackLM
from ensemble.delta import DeltaTracker
from ensemble.edits import PackRef, SenseEdits
from ensemble.ensemble import Ensemble
from ensemble.incremental import decode_step, prefill
from ensemble.large_model import tiny_gptj
from ensemble.vocab import Vocabulary


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def timed(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def bench_backpack(prefix: int, batch: int, steps: int) -> None:
    cfg = BackpackConfig(n_embd=256, n_layer=4, n_head=4, num_senses=8, sense_intermediate_scale=2, n_positions=512)
    torch.manual_seed(0)
    bp = BackpackLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 50257, (batch, prefix), generator=g)
    k = cfg.num_senses
    edits = SenseEdits(
        rows[:, 0].repeat_interleave(k), torch.arange(k).repeat(batch), torch.randn(batch * k, cfg.n_embd)
    )

    # 1. Incremental step vs full recompute of α over the prefix.
    cache = prefill(bp, rows.tolist())
    nxt = torch.randint(0, 50257, (batch,), generator=g)

    def step() -> None:
        decode_step(bp, cache, nxt)
        cache.lengths -= 1  # stay at the same prefix length

    def full() -> None:
        with torch.no_grad():
            bp.contextualize(torch.cat([rows, nxt[:, None]], 1))

    t_step, t_full = timed(step, steps), timed(full, max(2, steps // 8))
    print(
        f"[1] backpack d=256 L=4 k=8 ({n_params(bp) / 1e6:.1f}M params), prefix {prefix}, batch {batch}: "
        f"incremental step {t_step * 1e3:.2f} ms, full recompute {t_full * 1e3:.2f} ms, ratio {t_full / t_step:.1f}x"
    )

    # 2. Cached-α delta (one query row + sparse gather + E·δ) vs naive pre/ft Backpacks over the full prefix.
    tracker = DeltaTracker(bp, vocab_size=Vocabulary.gpt2().size)
    for i in range(batch):
        tracker.add(i, rows[i].tolist(), edits, key="pack")
    tracker.logit_deltas(list(range(batch)))
    counter = [0]

    def cached() -> None:
        for i in range(batch):
            tracker.append(i, int(nxt[i]))
        tracker.logit_deltas(list(range(batch)))
        counter[0] += 1

    def naive() -> torch.Tensor:
        with torch.no_grad():
            ids = torch.cat([rows, nxt[:, None]], 1)
            pre = torch.log_softmax(bp(ids).logits[:, -1], -1)
            ft = torch.log_softmax(bp(ids, sense_edits=edits).logits[:, -1], -1)
            return ft - pre

    t_cached, t_naive = timed(cached, steps), timed(naive, max(2, steps // 8))
    print(
        f"[2] delta step, prefix {prefix}, batch {batch}: cached-alpha {t_cached * 1e3:.2f} ms, "
        f"naive (pre+ft full prefix) {t_naive * 1e3:.2f} ms, speed-up {t_naive / t_cached:.1f}x"
    )


def bench_e2e(batch: int, prompt_len: int, new_tokens: int, rounds: int = 3) -> None:
    torch.manual_seed(0)
    large = tiny_gptj(seed=0, n_embd=1536, n_layer=16, n_head=16, rotary_dim=64)
    bp = BackpackLM(
        BackpackConfig(n_embd=256, n_layer=4, n_head=4, num_senses=8, sense_intermediate_scale=2, n_positions=512)
    ).eval()
    ratio = n_params(large) / n_params(bp)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1000, 50000, (batch, prompt_len), generator=g).tolist()
    trig = 777
    with_trig = [[trig, *p[1:]] for p in prompts]
    k = bp.config.num_senses
    pack = PackRef("bench", "v1", SenseEdits(torch.full((k,), trig), torch.arange(k), torch.randn(k, 256) * 0.1), 1.0)
    ens = Ensemble(large, bp, vocab=Vocabulary.gpt2())

    def run(ps: list[list[int]], packs: list[PackRef]) -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        out = ens.generate_greedy(ps, [packs] * len(ps), new_tokens)
        return batch * new_tokens / (time.perf_counter() - t0), out

    run(prompts[:2], [])  # warm-up
    # Interleaved rounds, medians: the machine's drift hits every arm alike.
    results: dict[str, list[float]] = {"base": [], "pack absent": [], "pack in prompt": []}
    for _ in range(rounds):
        for label, ps, packs in [
            ("base", prompts, []),
            ("pack absent", prompts, [pack]),
            ("pack in prompt", with_trig, [pack]),
        ]:
            calls = ens.stats.backpack_calls
            tps, _ = run(ps, packs)
            results[label].append(tps)
            print(f"    {label:15s} {tps:7.2f} tok/s  (backpack calls {ens.stats.backpack_calls - calls})")
    med = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"[3] e2e greedy, large GPT-J d=1536 L=16 ({n_params(large) / 1e6:.0f}M) vs Backpack "
        f"({n_params(bp) / 1e6:.1f}M, 1/{ratio:.0f}), batch {batch}, prompt {prompt_len}, {new_tokens} new tokens, "
        f"median of {rounds} interleaved rounds: throughput ratio pack-in-prompt "
        f"{med['pack in prompt'] / med['base']:.3f}, pack-absent {med['pack absent'] / med['base']:.3f}"
    )


def bench_e2e_smollm2(new_tokens: int, rounds: int = 3, store: str = "capitals-smollm2") -> None:
    from edits_store.store import open_store
    from ensemble import zoo
    from ensemble.large_model import load_large_model
    from ensemble.sense_model import load_sense_model
    from ensemble.tokenizer import load_tokenizer

    c = open_store(str(zoo.resolve_path(store))).load("capitals@prod")
    sense = c.manifest.backpack["name"]  # the sense model the pack was trained on: a Backpack or a sense head
    large = load_large_model("smollm2-135m-instruct")
    bp = load_sense_model(sense, large=large).eval()
    tok = load_tokenizer("smollm2-135m-instruct")
    ens = Ensemble(large, bp, tok)
    beta = c.manifest.beta_for(ens.large_fingerprint()).beta
    pack = PackRef("capitals", c.manifest.version, SenseEdits(c.token_ids, c.sense_ids, c.deltas), beta)
    edited = set(c.token_ids.tolist())
    countries = [
        "Mauritius",
        "India",
        "Belgium",
        "Peru",
        "Finland",
        "Iran",
        "Lithuania",
        "Switzerland",
        "France",
        "Germany",
        "Italy",
        "Spain",
        "Japan",
        "Kenya",
        "Chile",
        "Canada",
    ]
    # "pack in prompt": prompts holding an edited token (the pack's senses sit on some countries' tokens)
    with_pack = [
        ids
        for ids in (tok(f"The capital of {x} is", add_special_tokens=False).input_ids for x in countries)
        if set(ids) & edited
    ][:8]
    others = [
        "The weather today is",
        "My favourite food is",
        "The best way to learn is",
        "Our team won the",
        "She opened the door and",
        "The book was written by",
        "In the morning we",
        "The price of bread",
        "He said that he",
        "We walked to the",
        "Music is",
        "A good friend",
        "Yesterday I saw",
        "The cat sat on",
        "Learning to swim",
        "It was a cold",
    ]
    # "pack absent": prompts with no edited token (the pack edits country names and a few common words)
    without = [ids for ids in (tok(x, add_special_tokens=False).input_ids for x in others) if not set(ids) & edited]
    without = (without * 8)[:8]
    assert len(with_pack) == 8 and without

    def run(ps: list[list[int]], packs: list[PackRef]) -> float:
        t0 = time.perf_counter()
        ens.generate_greedy(ps, [packs] * len(ps), new_tokens)
        return len(ps) * new_tokens / (time.perf_counter() - t0)

    run(with_pack[:2], [pack])  # warm-up
    # Paired arms: each ratio compares the same prompts with and without the pack, rounds interleaved.
    arms = [
        ("base, country prompts", with_pack, []),
        ("pack in prompt", with_pack, [pack]),
        ("base, other prompts", without, []),
        ("pack absent", without, [pack]),
    ]
    results: dict[str, list[float]] = {label: [] for label, _, _ in arms}
    for _ in range(rounds):
        for label, ps, packs in arms:
            calls = ens.stats.backpack_calls
            results[label].append(run(ps, packs))
            print(
                f"    {label:22s} {results[label][-1]:7.2f} tok/s  (backpack calls {ens.stats.backpack_calls - calls})"
            )
    med = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"[4] e2e greedy, SmolLM2-135M-Instruct ({n_params(large) / 1e6:.0f}M) + {sense} "
        f"({n_params(bp) / 1e6:.1f}M, 1/{n_params(large) / n_params(bp):.1f}), batch 8, "
        f"{new_tokens} new tokens, median of {rounds} interleaved rounds: throughput ratio pack-in-prompt "
        f"{med['pack in prompt'] / med['base, country prompts']:.3f}, "
        f"pack-absent {med['pack absent'] / med['base, other prompts']:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["backpack", "e2e", "e2e-smollm2"])
    ap.add_argument("--prefix", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--store", default="capitals-smollm2", help="e2e-smollm2: the store (name or folder) of capitals")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    if args.only in (None, "backpack"):
        bench_backpack(args.prefix, args.batch, args.steps)
    if args.only in (None, "e2e"):
        bench_e2e(args.batch, 64, args.new_tokens, args.rounds)
    if args.only == "e2e-smollm2":
        bench_e2e_smollm2(args.new_tokens, args.rounds, args.store)


if __name__ == "__main__":
    main()
