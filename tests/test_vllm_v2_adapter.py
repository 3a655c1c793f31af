"""Model Runner V2 adapter logic with stand-ins of vLLM's LogitsProcRequestState / LogitsContext.

MRV2 cannot run on the CPU dev box (needs Triton), so this checks the adapter's slot bookkeeping
(recycled slots, rows reordered every step, tokens read from the on-device history, partial
prefill chunks) against the teacher-forced delta of each request's visible tokens. Where vLLM is
installed it also checks that vLLM's loaders accept each shim and reject the other one.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ensemble.delta import sequence_deltas
from ensemble.demo import tiny_backpack
from ensemble.edits import combine_packs
from ensemble.vocab import Vocabulary
from sensepack_testing.vllm import random_pack
from serve.vllm.args import ScoreSpec, build_extra_args
from serve.vllm.core import EnsembleLogitsCore
from serve.vllm.resolver import DictSource
from serve.vllm.v2_adapter import V2Adapter

U = Vocabulary.gpt2().size  # the tiny pairing shares GPT-2's tokenizer

VOCAB, MAX_REQS, MAX_LEN = 50400, 6, 64


@dataclass
class Params:
    extra_args: dict | None = None


class Runner:
    """The parts of MRV2's request state the adapter reads, plus an independent expectation."""

    def __init__(self):
        self.bp = tiny_backpack(0)
        self.a = random_pack(self.bp, [11, 12], name="a", version="1", seed=1)
        self.b = random_pack(self.bp, [20, 12], name="b", version="2", beta=0.5, seed=2)
        source = DictSource({("a", "1"): self.a.edits, ("b", "2"): self.b.edits})
        self.req_states = SimpleNamespace(
            device=torch.device("cpu"),
            max_num_reqs=MAX_REQS,
            vocab_size=VOCAB,
            all_token_ids=SimpleNamespace(gpu=torch.zeros(MAX_REQS, MAX_LEN, dtype=torch.int32)),
        )
        self.ad = V2Adapter(EnsembleLogitsCore(self.bp, source, vocab_size=U), self.req_states)
        self.reqs: dict[int, dict] = {}  # slot -> {"tokens", "packs"}

    def add(self, slot, prompt, packs):
        self.reqs[slot] = {"tokens": list(prompt), "packs": packs}
        self.req_states.all_token_ids.gpu[slot].zero_()
        self.req_states.all_token_ids.gpu[slot, : len(prompt)] = torch.tensor(prompt)
        assert self.ad.add_request(slot, Params(build_extra_args(packs) if packs else None)) is True

    def sample(self, slot, tok):
        r = self.reqs[slot]
        self.req_states.all_token_ids.gpu[slot, len(r["tokens"])] = tok
        r["tokens"].append(tok)

    def expected(self, tokens, packs):
        if not packs:
            return None
        edits = combine_packs(packs, self.bp.config.n_embd)
        ids = torch.tensor([tokens])
        if not torch.isin(ids, edits.token_ids).any():
            return None
        return (sequence_deltas(self.bp.contextualize(ids), ids, edits)[0, -1] @ self.bp.embedding[:U].T).detach()

    def step(self, order, visible=None, seed=0):
        """One apply over `order` (slots, in this step's row order); visible[slot] = tokens seen (chunking)."""
        visible = visible or {}
        lens = [visible.get(s, len(self.reqs[s]["tokens"])) for s in order]
        ctx = SimpleNamespace(
            idx_mapping_np=np.array(order, dtype=np.int32),
            idx_mapping=torch.tensor(order, dtype=torch.int32),
            expanded_idx_mapping=torch.tensor(order, dtype=torch.int32),
            seq_lens_upper_bound_np=np.array(lens, dtype=np.int32),
            pos=torch.tensor([n - 1 for n in lens]),
            input_ids=torch.tensor([self.reqs[s]["tokens"][n - 1] for s, n in zip(order, lens, strict=True)]),
        )
        z = torch.randn(len(order), VOCAB, generator=torch.Generator().manual_seed(seed))
        logits = z.clone()
        out = self.ad.apply(logits, ctx)
        assert (out[:, U:] == float("-inf")).all()
        for i, s in enumerate(order):
            exp = self.expected(self.reqs[s]["tokens"][: lens[i]], self.reqs[s]["packs"])
            if exp is None:
                assert torch.equal(out[i, :U], z[i, :U])
            else:
                torch.testing.assert_close(out[i, :U] - z[i, :U], exp, atol=2e-4, rtol=1e-4)
        return out


def test_reordered_rows_recycled_slots_and_history():
    r = Runner()
    r.add(0, [5, 11, 7], [r.a])
    r.add(3, [1, 2], [])
    r.add(4, [30, 31, 32], [r.a, r.b])
    r.step([0, 3, 4])
    for s, t in ((0, 40), (3, 12), (4, 12)):
        r.sample(s, t)
    r.step([4, 0, 3], seed=1)  # rows reordered
    r.sample(4, 41)
    r.step([4], seed=2)  # only slot 4 scheduled this step
    r.sample(0, 42)
    r.step([3, 0], seed=3)  # slot 0 catches up on its own history
    old = r.ad.core.rows[0].sid
    r.add(0, [20, 21], [r.b])  # slot 0 recycled for a new request
    assert old not in r.ad.core.tracker
    r.step([0, 4], seed=4)


def test_partial_prefill_chunks_then_decode():
    r = Runner()
    prompt = [3, 4, 11, 6, 7, 8, 9, 10]
    r.add(2, prompt, [r.a])
    r.step([2], visible={2: 2})  # first chunk: no edited token yet (exact zero)
    r.step([2], visible={2: 5})  # second chunk reaches token 11
    r.step([2])  # last chunk
    r.sample(2, 44)
    r.step([2])


def test_base_requests_only_padding_masked():
    r = Runner()
    r.add(1, [1, 2, 3], [])
    r.add(5, [7, 8], [r.a])  # a's tokens absent
    r.step([1, 5])
    assert r.ad.core.tracker.stats.backpack_calls == 0


def _ctx(r, order, visible):
    lens = [visible.get(s, len(r.reqs[s]["tokens"])) for s in order]
    return SimpleNamespace(
        idx_mapping_np=np.array(order, dtype=np.int32),
        seq_lens_upper_bound_np=np.array(lens, dtype=np.int32),
        input_ids=torch.tensor([r.reqs[s]["tokens"][n - 1] for s, n in zip(order, lens, strict=True)]),
    )


def _move_history(r, old, new):
    """MRV2 preempts the request in `old` (its slot is freed, processors are not told) and re-adds it in `new`
    with its whole history (prompt and outputs), recomputed."""
    r.reqs[new] = r.reqs.pop(old)
    toks = r.reqs[new]["tokens"]
    r.req_states.all_token_ids.gpu[new].zero_()
    r.req_states.all_token_ids.gpu[new, : len(toks)] = torch.tensor(toks)


def test_forced_scoring_rows_by_slot_and_position():
    """A score request in a recycled, reordered slot: position = visible tokens - prefix length; partial
    prefill chunks record nothing (negative position); each record equals the hand computation from the
    raw row, and the forced token is the only one left. Preempted after two positions and re-added in
    another slot, it keeps its state and record; the recompute's chunk overwrites nothing."""
    r = Runner()
    prefix, cont = [5, 11, 6], [40, 12, 41, 43]
    r.add(3, [1, 2], [r.a])  # a generation beside it
    r.reqs[1] = {"tokens": list(prefix), "packs": [r.a]}
    r.req_states.all_token_ids.gpu[1, : len(prefix)] = torch.tensor(prefix)
    extra = build_extra_args([r.a], request_id="s", score=ScoreSpec(tuple(cont), len(prefix)))
    assert r.ad.add_request(1, Params(extra)) is True
    want, slot = [], 1
    for k in range(-1, len(cont)):
        if k == 2:  # preempted; re-added in slot 5, a recompute chunk first (its logits are discarded)
            _move_history(r, 1, 5)
            slot = 5
            assert r.ad.add_request(5, Params(extra)) is True and r.ad.core.stats.resumed == 1
            r.ad.apply(torch.randn(2, VOCAB), _ctx(r, [3, 5], {3: len(r.reqs[3]["tokens"]), 5: 4}))
        visible = {slot: 2} if k < 0 else {}  # k = -1: a partial prefill chunk of the prefix
        order = [slot, 3] if k % 2 else [3, slot]
        z = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(10 + k))
        out = r.ad.apply(z.clone(), _ctx(r, order, visible))
        i = order.index(slot)
        if k >= 0:
            toks = r.reqs[slot]["tokens"]
            exp = r.expected(toks, [r.a])
            zu = z[i, :U].double()
            packed = zu if exp is None else zu + exp.double()
            want.append((torch.log_softmax(zu, -1)[cont[k]].item(), torch.log_softmax(packed, -1)[cont[k]].item()))
            assert out[i].argmax().item() == cont[k] and torch.isinf(out[i]).sum() == VOCAB - 1
            r.sample(slot, cont[k])
        r.sample(3, 50 + k + 1)
    assert r.ad.core.stats.rows_added == 2  # the score row and the generation: the re-add built nothing
    got = r.ad.core.take_scores(["s"])["s"]
    assert got["base"] == pytest.approx([w[0] for w in want], abs=1e-4)
    assert got["packed"] == pytest.approx([w[1] for w in want], abs=1e-4)


def test_preempted_request_readded_in_another_slot_keeps_its_state():
    """MRV2 frees a preempted request's slot without telling processors and re-adds it elsewhere: its row
    (Backpack state) moves there, no new tracker sequence, and its deltas stay the teacher-forced ones. A
    different request with the same packs in a recycled slot starts afresh."""
    r = Runner()
    extra = build_extra_args([r.a], request_id="g1")
    prompt = [5, 11, 7]
    r.reqs[0] = {"tokens": list(prompt), "packs": [r.a]}
    r.req_states.all_token_ids.gpu[0, : len(prompt)] = torch.tensor(prompt)
    r.ad.add_request(0, Params(extra))
    r.step([0])
    r.sample(0, 40)
    r.step([0], seed=1)
    r.sample(0, 41)
    sid = r.ad.core.rows[0].sid
    _move_history(r, 0, 4)
    r.ad.add_request(4, Params(extra))
    assert r.ad.core.rows[4].sid == sid and 0 not in r.ad.core.rows and r.ad.core.stats.resumed == 1
    r.ad.apply(torch.randn(1, VOCAB), _ctx(r, [4], {4: 2}))  # a recompute chunk: feeds nothing
    r.step([4], seed=2)  # the full recompute: the newest token is fed, deltas as teacher-forced
    r.sample(4, 42)
    r.step([4], seed=3)
    assert r.ad.core.stats.rows_added == 1
    r.add(4, [20, 21], [r.a])  # slot recycled for another request: not a resumption
    assert sid not in r.ad.core.tracker and r.ad.core.stats.resumed == 1


def test_speculative_rows_refused():
    r = Runner()
    r.add(0, [11, 2], [r.a])
    ctx = SimpleNamespace(
        idx_mapping_np=np.array([0], dtype=np.int32),
        seq_lens_upper_bound_np=np.array([2]),
        input_ids=torch.tensor([2, 3]),
    )
    with pytest.raises(NotImplementedError, match="speculative"):
        r.ad.apply(torch.zeros(2, VOCAB), ctx)


def test_vllm_loaders_accept_each_shim_and_reject_the_other():
    pytest.importorskip("vllm", reason="vLLM is not installed: its processor loaders are not available")
    from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns

    from serve.vllm import V1_PROCESSOR_FQCN, V2_PROCESSOR_FQCN
    from serve.vllm.processor import SensepackLogitsProcessor
    from serve.vllm.processor_v2 import SensepackLogitsProcessorV2

    assert _load_logitsprocs_by_fqcns([V1_PROCESSOR_FQCN]) == [SensepackLogitsProcessor]
    assert _load_v2_logitsprocs_by_fqcns([V2_PROCESSOR_FQCN]) == [SensepackLogitsProcessorV2]
    with pytest.raises(Exception):  # noqa: B017 - vLLM's loader error type differs between releases
        _load_logitsprocs_by_fqcns([V2_PROCESSOR_FQCN])
    with pytest.raises(Exception):  # noqa: B017 - vLLM's loader error type differs between releases
        _load_v2_logitsprocs_by_fqcns([V1_PROCESSOR_FQCN])
