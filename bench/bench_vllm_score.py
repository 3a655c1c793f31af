"""Score through the serving vLLM engine: one measured option, against the embedded engine.

    VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_ENABLE_V1_MULTIPROCESSING=0 \\
        .venv-vllm/bin/python bench/bench_vllm_score.py [--positions 32 128]

Option measured: vLLM's *full-vocabulary prompt log-probs* (`SamplingParams(prompt_logprobs=-1)`, engine
`max_logprobs=-1`) give the base model's log p over the whole vocabulary at every prompt position, from the
model vLLM already serves; the server adds the pack's β·E·δ with its own Backpack (already in memory) and
renormalises over U:

    base(t)   = z_t[x_{t+1}] - logsumexp_U(z_t)           z_t = vLLM's prompt log-probs at position t
    packed(t) = (z_t + β E δ_t)[x_{t+1}] - logsumexp_U(z_t + β E δ_t)

(the per-position constant of log p cancels). Printed per length: vLLM's time for the request (flat and
nested log-prob containers), the time to turn its Python lists into a tensor, the embedded engine's
`Ensemble.score` time for the same row, and the largest difference from `Ensemble.score` (base and packed);
then the base side alone with `prompt_logprobs=0` (each prompt token's own log-prob, no full vocabulary).
Tiny random GPT-J (n_embd 64, vocabulary 50400) and the tiny Backpack: the cost measured is vLLM's
per-position full-vocabulary output, which does not depend on the model's size.
Results: bench/RESULTS.md ("Score through vLLM").
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # sensepack_testing lives at the repo root

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch


def _dense(plp: Any, flat: bool, vocab: int) -> torch.Tensor:  # vLLM PromptLogprobs (flat or per position)
    """(positions - 1, vocab) log-probs from vLLM's prompt_logprobs (position 0 has none)."""
    n = len(plp)
    z = torch.full((n - 1, vocab), float("-inf"))
    for i in range(1, n):
        if flat:
            s, e = plp.start_indices[i], plp.end_indices[i]
            ids, vals = plp.token_ids[s:e], plp.logprobs[s:e]
        else:
            ids, vals = list(plp[i].keys()), [v.logprob for v in plp[i].values()]
        z[i - 1, torch.tensor(ids)] = torch.tensor(vals)
    return z


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--positions",
        type=int,
        nargs="+",
        default=[32, 128],
        help="row lengths to score (at most the tiny Backpack's 128 positions)",
    )
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from ensemble.delta import sequence_deltas
    from ensemble.demo import demo_pack, tiny_backpack
    from ensemble.ensemble import Ensemble
    from ensemble.tokenizer import load_tokenizer
    from sensepack_testing.vllm import save_tiny_gptj
    from serve.vllm import V1_PROCESSOR_FQCN
    from serve.vllm.resolver import REGISTRY, DictSource

    folder = tempfile.mkdtemp(prefix="bench-vllm-score-")
    large = save_tiny_gptj(folder, seed=0)
    tok, bp = load_tokenizer(), tiny_backpack(0)
    pack = demo_pack(bp, tok)
    ens = Ensemble(large, bp, tok)
    u = ens.vocab.size
    REGISTRY.configure(bp, DictSource({(pack.name, pack.version): pack.edits}), vocab_size=u)
    llm = LLM(
        model=folder,
        dtype="float32",
        enforce_eager=True,
        max_model_len=max(args.positions) + 8,
        max_logprobs=-1,
        seed=0,
        logits_processors=[V1_PROCESSOR_FQCN],
        logprobs_mode="processed_logprobs",
    )
    vocab = large.get_output_embeddings().weight.shape[0]
    print(f"# {platform.node()} torch {torch.__version__}, {os.cpu_count()} cpus, vocab {vocab}, |U| {u}")
    text = " ".join(["The capital of Mauritius is Port Louis, an island city by the sea."] * 40)
    for n in args.positions:
        if n > bp.config.n_positions:
            raise SystemExit(f"--positions: {n} is past the tiny Backpack's {bp.config.n_positions} positions")
        row = tok(text).input_ids[:n]
        prefix, cont = row[:1], row[1:]
        t0 = time.perf_counter()
        ref_base = ens.score([prefix], [cont], [[]])[0]
        ref_packed = ens.score([prefix], [cont], [[pack]])[0]
        t_emb = time.perf_counter() - t0
        for flat in (True, False):
            t0 = time.perf_counter()
            out = llm.generate(
                [TokensPrompt(prompt_token_ids=row)],
                [SamplingParams(max_tokens=1, prompt_logprobs=-1, flat_logprobs=flat, detokenize=False)],
                use_tqdm=False,
            )[0]
            t_vllm = time.perf_counter() - t0
            t0 = time.perf_counter()
            z = _dense(out.prompt_logprobs, flat, vocab)[:, :u]
            t_dense = time.perf_counter() - t0
            tgt = torch.tensor(cont)[:, None]
            base = (z.gather(1, tgt) - torch.logsumexp(z, -1, keepdim=True)).squeeze(1)
            ids = torch.tensor([row])
            with torch.no_grad():
                delta = sequence_deltas(bp.contextualize(ids), ids, pack.edits)[0][:-1] @ bp.embedding[:u].T
            zp = z + delta
            packed = (zp.gather(1, tgt) - torch.logsumexp(zp, -1, keepdim=True)).squeeze(1)
            print(
                f"positions {n:5d} {'flat  ' if flat else 'nested'}: vLLM {t_vllm:6.2f} s + to tensor {t_dense:5.2f} s"
                f" | embedded Ensemble.score (base + packed) {t_emb:5.2f} s"
                f" | max |diff| base {float((base - ref_base).abs().max()):.1e}"
                f" packed {float((packed - ref_packed).abs().max()):.1e}"
            )
        # the base side alone needs no full vocabulary: prompt_logprobs=0 is each prompt token's own log-prob
        t0 = time.perf_counter()
        out = llm.generate(
            [TokensPrompt(prompt_token_ids=row)],
            [SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)],
            use_tqdm=False,
        )[0]
        t_vllm = time.perf_counter() - t0
        own = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], cont, strict=True)])
        # over the model's whole vocabulary (50400 rows for GPT-J): equal to the base over U only when the
        # padding ids carry no mass, which a trained model's do not; the tiny random model's do
        full = torch.log_softmax(large(torch.tensor([row])).logits[0, :-1].float(), -1)
        want = full.gather(1, torch.tensor(cont)[:, None]).squeeze(1)
        print(
            f"positions {n:5d} base only (prompt_logprobs=0): vLLM {t_vllm:6.2f} s"
            f" | max |diff| vs log_softmax over the model's vocabulary {float((own - want).abs().max()):.1e}"
        )
    REGISTRY.clear()


if __name__ == "__main__":
    main()
