"""Multi-process mode: vLLM's engine core and worker in their own processes (the default, and the
layout of tensor parallelism), the processor loading the Backpack folder and `name@version` from
the edits store named in `additional_config`. Greedy output == the embedded engine's.

Runs vLLM in a subprocess (multiprocessing spawn needs a `__main__` guard). Skipped where vLLM is
not installed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.vllm_gate import require_vllm

require_vllm(in_process=False)

SCRIPT = textwrap.dedent('''
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from serve.vllm import V1_PROCESSOR_FQCN

    def main():
        cfg = json.load(open(sys.argv[1]))
        llm = LLM(model=cfg["model"], dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8,
                  seed=0, logits_processors=[V1_PROCESSOR_FQCN], logprobs_mode="processed_logprobs",
                  additional_config={"sensepack": {"backpack": cfg["backpack"], "store": cfg["store"]}})
        params = [SamplingParams(temperature=0.0, max_tokens=cfg["n"], ignore_eos=True, extra_args=ea)
                  for ea in cfg["extra_args"]]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in cfg["prompts"]], params, use_tqdm=False)
        json.dump([list(o.outputs[0].token_ids) for o in outs], open(cfg["out"], "w"))

    if __name__ == "__main__":
        main()
''')


def test_multiprocess_store_resolver_greedy_equals_embedded(tmp_path):
    from edits_store import build_pack, open_store
    from ensemble.demo import demo_pack, tiny_backpack
    from ensemble.edits import PackRef, SenseEdits
    from ensemble.ensemble import Ensemble
    from ensemble.tokenizer import load_tokenizer, tokenizer_fingerprint
    from serve.vllm.args import build_extra_args
    from serve.vllm.testing import save_tiny_gptj

    model_dir, bp_dir, store_dir = tmp_path / "gptj", tmp_path / "backpack", tmp_path / "store"
    large = save_tiny_gptj(model_dir, seed=0)
    tok = load_tokenizer()
    bp = tiny_backpack(0)
    bp.save_pretrained(bp_dir)
    demo = demo_pack(bp, tok)
    store = open_store(str(store_dir))
    contents = build_pack("capitals", demo.edits.token_ids, demo.edits.sense_ids, demo.edits.deltas,
                          backpack_name="tiny", backpack_fingerprint=bp.fingerprint(),
                          tokenizer_fingerprint=tokenizer_fingerprint(tok), vocab_size=bp.config.vocab_size,
                          num_senses=bp.config.num_senses, epsilon=0.01)
    version = store.publish(contents)
    loaded = store.load(f"capitals@{version}")
    pack = PackRef("capitals", version, SenseEdits(loaded.token_ids, loaded.sense_ids, loaded.deltas), 0.8)

    prompts = [tok(p).input_ids for p in ["The capital of Mauritius is", "In Mauritius, people say", "Hello there"]]
    packs = [[pack], [pack], [pack]]
    n = 8
    cfg = dict(model=str(model_dir), backpack=str(bp_dir), store=str(store_dir), n=n, prompts=prompts + prompts,
               extra_args=[None] * 3 + [build_extra_args(p) for p in packs], out=str(tmp_path / "out.json"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "run.py").write_text(SCRIPT)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CPU_OMP_THREADS_BIND="nobind",
               PYTHONPATH=os.pathsep.join([str(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
                                          + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "cfg.json")], env=env,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / "out.json").read_text())

    ens = Ensemble(large, bp.eval(), tok)
    ref_base = ens.generate_greedy(prompts, [[]] * 3, n)
    ref = ens.generate_greedy(prompts, packs, n)
    assert ref[0] != ref_base[0]                          # the pack matters
    assert got[:3] == ref_base
    assert got[3:] == ref
