"""Batch bookkeeping of the sensepack vLLM processor core (adds, removes, moves, swaps, re-adds).

Runs in every venv: against vLLM's own `BatchUpdate` / `MoveDirectionality` when vLLM imports,
against a stand-in of the same shape otherwise. After every step the logits the core produces are
checked against an independent expectation: the teacher-forced delta of each row's full token
sequence (`ensemble.delta.sequence_deltas` on a full-sequence α), and exact equality for rows
that carry no edited token.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ensemble.delta import sequence_deltas
from ensemble.demo import tiny_backpack
from ensemble.edits import PackRef, combine_packs
from ensemble.vocab import Vocabulary
from sensepack_testing.vllm import random_pack
from serve.vllm.args import ArgsError, ScoreSpec, build_extra_args, parse_extra_args
from serve.vllm.core import EnsembleLogitsCore
from serve.vllm.resolver import DictSource

U = Vocabulary.gpt2().size  # the tiny pairing shares GPT-2's tokenizer

try:
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    USING_VLLM = True
except Exception:  # noqa: BLE001 - main CI (no vLLM, or one that fails to import): a stand-in of the same shape
    USING_VLLM = False

    class _MoveDirectionality(enum.Enum):
        UNIDIRECTIONAL = enum.auto()
        SWAP = enum.auto()

    @dataclass(frozen=True)
    class _BatchUpdate:
        batch_size: int
        removed: Sequence[int]
        added: Sequence[tuple]
        moved: Sequence[tuple]

    # bound by assignment, not by `class BatchUpdate`: mypy sees vLLM's names (Any while it is not installed)
    MoveDirectionality, BatchUpdate = _MoveDirectionality, _BatchUpdate


UNI, SWAP = MoveDirectionality.UNIDIRECTIONAL, MoveDirectionality.SWAP
VOCAB = 50400


@dataclass
class Params:  # what the core reads from vllm.SamplingParams
    extra_args: dict | None = None
    max_tokens: int | None = 8


def _params(packs, rid=None):
    extra = build_extra_args(packs, request_id=rid) if packs else None
    if USING_VLLM:
        from vllm import SamplingParams

        return SamplingParams(max_tokens=8, extra_args=extra)
    return Params(extra)


@pytest.fixture(scope="module")
def world():
    bp = tiny_backpack(0)
    a = random_pack(bp, [11, 12, 13], name="a", version="1", beta=1.0, seed=1)
    b = random_pack(bp, [20, 21, 12], name="b", version="2", beta=0.5, seed=2)
    return bp, a, b, DictSource({(a.name, a.version): a.edits, (b.name, b.version): b.edits})


def _parse(params):
    return parse_extra_args(params.extra_args)


class Sim:
    """Drives the core like vLLM's persistent batch and keeps the expected state independently."""

    def __init__(self, world):
        self.bp, self.a, self.b, source = world
        self.core = EnsembleLogitsCore(self.bp, source, vocab_size=U)
        self.batch: dict[int, dict] = {}  # row -> {"prompt", "out" (live list), "packs"}

    def update(self, removed=(), added=(), moved=()):
        ups = []
        added = [a if len(a) == 5 else (*a, None) for a in added]  # (row, prompt, packs, out[, request_id])
        for row, prompt, packs, out, rid in added:
            ups.append((row, _params(packs, rid), prompt, out))
        for r in removed:
            self.batch.pop(r, None)
        for row, prompt, packs, out, _ in added:
            self.batch[row] = {"prompt": prompt, "out": out, "packs": packs}
        for a, b, d in moved:
            ea, eb = self.batch.pop(a, None), self.batch.pop(b, None)
            if ea is not None:
                self.batch[b] = ea
            if eb is not None and d == SWAP:
                self.batch[a] = eb
        self.core.update(BatchUpdate(len(self.batch), list(removed), ups, list(moved)), _parse)

    def expected_delta(self, row) -> torch.Tensor | None:
        e = self.batch[row]
        if not e["packs"]:
            return None
        edits = combine_packs(e["packs"], self.bp.config.n_embd)
        ids = torch.tensor([e["prompt"] + [t for t in e["out"] if t >= 0]])
        if not torch.isin(ids, edits.token_ids).any():
            return None
        alpha = self.bp.contextualize(ids)
        delta = sequence_deltas(alpha, ids, edits)[0, -1]
        return (delta @ self.bp.embedding[:U].T).detach()

    def step(self, seed=0):
        n = max(self.batch) + 1 if self.batch else 0
        assert sorted(self.batch) == list(range(n)), "test bug: vLLM keeps the batch dense"
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, VOCAB, generator=g)
        logits = z.clone()
        self.core.sync()
        out = self.core.add_deltas(logits)
        assert out.data_ptr() == logits.data_ptr()  # in place
        assert torch.isinf(out[:, U:]).all() and (out[:, U:] < 0).all()
        for row in range(n):
            exp = self.expected_delta(row)
            if exp is None:
                assert torch.equal(out[row, :U], z[row, :U]), row  # exact skip
            else:
                torch.testing.assert_close(out[row, :U] - z[row, :U], exp, atol=2e-4, rtol=1e-4)
        # no leaked tracker sequences: exactly the rows carrying edits are tracked
        tracked = {r for r in self.batch if self.batch[r]["packs"]}
        assert set(self.core.rows) == tracked
        assert all(self.core.rows[r].sid in self.core.tracker for r in tracked)
        return out


def test_adds_outputs_removes_moves_swaps(world):
    s = Sim(world)
    a, b = s.a, s.b
    outs = [[], [], [], []]
    s.update(
        added=[
            (0, [5, 11, 7], [a], outs[0]),  # edited token in the prompt
            (1, [5, 6, 7], [], outs[1]),  # base request
            (2, [30, 31], [a, b], outs[2]),  # packs, no edited token yet
            (3, [20, 9], [b], outs[3]),
        ]
    )
    s.step(0)
    for o, t in zip(outs, [40, 41, 12, 42], strict=True):  # row 2 now sees token 12 (edited in a and b)
        o.append(t)
    s.step(1)
    gone = s.core.rows[1].sid if 1 in s.core.rows else None
    assert gone is None  # base rows are never tracked
    # row 1 finishes; vLLM compacts: 3 -> 1 (one-way move)
    sid3 = s.core.rows[3].sid
    s.update(removed=[1], moved=[(3, 1, UNI)])
    assert s.core.rows[1].sid == sid3  # moved, not rebuilt
    for o in (outs[0], outs[2], outs[3]):
        o.append(43)
    s.step(2)
    # swap rows 0 and 2 (vLLM reorders the persistent batch)
    sid0, sid2 = s.core.rows[0].sid, s.core.rows[2].sid
    s.update(moved=[(0, 2, SWAP)])
    assert (s.core.rows[0].sid, s.core.rows[2].sid) == (sid2, sid0)
    s.step(3)
    # row 0 finishes with no removal event: the move 2 -> 0 overwrites it (implied finish)
    old0 = s.core.rows[0].sid
    s.update(moved=[(2, 0, UNI)])
    assert old0 not in s.core.tracker
    s.step(4)


def test_readd_after_preemption_rebuilds_from_prompt_and_outputs(world):
    s = Sim(world)
    out = [12, 40, 41]  # the request had produced 3 tokens
    s.update(added=[(0, [5, 6], [s.a], out)])
    s.step(0)
    sid = s.core.rows[0].sid
    s.update(removed=[0])
    assert sid not in s.core.tracker
    out.append(44)
    s.update(added=[(0, [5, 6], [s.a], out)])  # re-added later with all its outputs
    s.step(1)


@pytest.fixture
def prefills(monkeypatch):
    """Counts Backpack prefills (ensemble.delta.prefill calls), the work a resumed request must not redo."""
    import ensemble.delta as delta

    calls = []
    real = delta.prefill

    def counting(model, windows):
        calls.append(len(windows))
        return real(model, windows)

    monkeypatch.setattr(delta, "prefill", counting)
    return calls


def test_unscheduled_request_readded_resumes_without_prefill(world, prefills):
    """vLLM removes a running request it does not schedule this step and adds it back later (same request
    id, same live output list, maybe at another row): its Backpack state is parked and resumed, no prefill."""
    s = Sim(world)
    out0, out1 = [], []
    s.update(added=[(0, [5, 11, 7], [s.a], out0, "sp-1"), (1, [20, 9], [s.b], out1, "sp-2")])
    s.step(0)
    assert sum(prefills) == 2
    sid = s.core.rows[0].sid
    out0.append(40)
    out1.append(41)
    s.step(1)
    s.update(removed=[0], moved=[(1, 0, UNI)])  # sp-1 not scheduled; sp-2 compacted to row 0
    assert s.core.parked == 1 and sid in s.core.tracker and not s.core.tracker.is_active(sid)
    out1.append(42)
    s.step(2)  # the parked request costs no Backpack work
    out0.append(43)  # (a resumed request may bring a token)
    s.update(added=[(1, [5, 11, 7], [s.a], out0, "sp-1")])
    assert s.core.rows[1].sid == sid and s.core.parked == 0
    s.step(3)  # deltas == teacher-forced (Sim checks)
    assert sum(prefills) == 2  # no new prefill
    assert s.core.stats.resumed == 1 and s.core.tracker.stats.resumes == 1


def test_parked_states_are_bounded_and_evicted_on_finish(world, prefills):
    s = Sim(world)
    s.core.max_parked = 2
    outs = [[] for _ in range(4)]
    s.update(added=[(i, [11, 5 + i], [s.a], outs[i], f"sp-{i}") for i in range(4)])
    s.step(0)
    sids = [s.core.rows[i].sid for i in range(4)]
    s.update(removed=[3, 2, 1])  # three unscheduled: only two are kept
    assert s.core.parked == 2 and s.core.stats.parked_evicted == 1
    assert sids[3] not in s.core.tracker and sids[2] in s.core.tracker and sids[1] in s.core.tracker
    assert s.core.forget("sp-2") and sids[2] not in s.core.tracker  # the server saw sp-2 finish
    # finished by max_tokens (8): removed, never parked
    outs[0].extend([40] * 8)
    s.update(removed=[0])
    assert s.core.parked == 1 and sids[0] not in s.core.tracker
    # aborted by the server before vLLM removed it: forget first, then the removal parks nothing
    s.update(added=[(0, [11, 9], [s.a], [], "sp-9")])
    s.step(1)
    assert not s.core.forget("sp-9")
    s.update(removed=[0])
    assert s.core.parked == 1
    # a re-add whose prompt differs from the parked one's (another request reusing the id) starts afresh
    before = sum(prefills)
    s.update(added=[(0, [11, 5, 5], [s.a], [], "sp-1")])
    s.step(2)
    assert sum(prefills) == before + 1 and s.core.parked == 0 and sids[1] not in s.core.tracker


def test_readd_on_occupied_row_replaces_the_occupant(world):
    s = Sim(world)
    s.update(added=[(0, [11], [s.a], [])])
    old = s.core.rows[0].sid
    s.update(added=[(0, [21, 3], [s.b], [])])  # added onto the same index, no removal event
    assert old not in s.core.tracker
    s.step(0)


def test_async_placeholders_are_not_fed(world):
    s = Sim(world)
    out = []
    s.update(added=[(0, [11, 5], [s.a], out)])
    s.step(0)
    out.append(-1)  # async scheduling placeholder
    s.step(1)
    assert s.core.rows[0].seen == 0
    out[-1] = 40  # filled in before the sampler runs
    s.step(2)
    assert s.core.rows[0].seen == 1


def test_base_only_batches_touch_nothing_but_padding(world):
    s = Sim(world)
    s.update(added=[(0, [1, 2, 3], [], []), (1, [4, 5], [s.a], [])])  # a's tokens absent
    before = s.core.tracker.stats.backpack_calls
    s.step(0)
    assert s.core.tracker.stats.backpack_calls == before
    assert s.core.stats.delta_applies == 0 and s.core.stats.skipped == 1


def test_many_rows_sparse_index_add(world):
    """Tracked rows that are not 0..k-1 go through one index_add over the batch."""
    s = Sim(world)
    outs = [[] for _ in range(6)]
    s.update(added=[(i, [3 + i, 11 if i % 2 else 4], [s.a] if i % 2 else [], outs[i]) for i in range(6)])
    s.step(0)
    for i, o in enumerate(outs):
        o.append(12 if i == 4 else 50 + i)
    s.step(1)


# ---------------------------------------------------------------- forced scoring


def _score_params(packs, rid, cont, prefix_len, top_n=None):
    extra = build_extra_args(packs, request_id=rid, score=ScoreSpec(tuple(cont), prefix_len, top_n))
    if USING_VLLM:
        from vllm import SamplingParams

        return SamplingParams(max_tokens=len(cont), extra_args=extra)
    return Params(extra, max_tokens=len(cont))


def _expected_logprob(bp, z_row, prompt, out, packs, t) -> tuple[float, float]:
    """Independent: log_softmax over U of the raw row, and of the row plus the teacher-forced delta of the
    whole sequence so far (ensemble.delta.sequence_deltas on a full α)."""
    base = torch.log_softmax(z_row[:U].double(), -1)[t].item()
    if not packs:
        return base, base
    edits = combine_packs(packs, bp.config.n_embd)
    ids = torch.tensor([prompt + out])
    if not torch.isin(ids, edits.token_ids).any():
        return base, base
    delta = sequence_deltas(bp.contextualize(ids), ids, edits)[0, -1] @ bp.embedding[:U].T
    return base, torch.log_softmax((z_row[:U] + delta.detach()).double(), -1)[t].item()


def test_forced_scoring_records_base_and_packed_and_forces_the_token(world):
    """A generation row, a packed score row and a base-only score row in one batch: each score row's record
    equals the hand computation from its raw logits; its logits keep only the forced token; the generation
    row gets its delta as before. A partial-prefill apply is overwritten, a re-add continues the record,
    and take_scores hands it over once."""
    bp, a, _, source = world
    core = EnsembleLogitsCore(bp, source, vocab_size=U)
    gen_out, s1_out, s2_out = [], [], []
    c1, c2 = [12, 40, 11, 41, 42], [7, 8, 9]
    p1, p2 = [5, 11, 6], [30, 31]
    core.update(
        BatchUpdate(
            3,
            [],
            [
                (0, _params([a], "g"), [5, 11, 7], gen_out),
                (1, _score_params([a], "s1", c1, len(p1)), p1, s1_out),
                (2, _score_params([], "s2", c2, len(p2)), p2, s2_out),
            ],
            [],
        ),
        _parse,
    )
    assert core.rows[2].sid is None  # base-only score: no Backpack state at all
    want1, want2 = [], []
    g = torch.Generator().manual_seed(7)
    core.add_deltas(torch.randn(3, VOCAB, generator=g))  # a partial prefill chunk's apply: overwritten below
    for k in range(len(c1)):
        if k == 2:  # row 1 is preempted and re-added with its output so far: same record, by index
            core.update(BatchUpdate(2, [1], [], []), _parse)
            core.update(BatchUpdate(3, [], [(1, _score_params([a], "s1", c1, len(p1)), p1, s1_out)], []), _parse)
        z = torch.randn(3, VOCAB, generator=g)
        core.sync()
        out = core.add_deltas(z.clone())
        want1.append(_expected_logprob(bp, z[1], p1, s1_out, [a], c1[k]))
        assert out[1].argmax().item() == c1[k] and out[1, c1[k]] == 0 and torch.isinf(out[1]).sum() == VOCAB - 1
        if k < len(c2):
            want2.append(_expected_logprob(bp, z[2], p2, s2_out, [], c2[k]))
            assert out[2].argmax().item() == c2[k] and torch.isinf(out[2]).sum() == VOCAB - 1
            s2_out.append(c2[k])
        # the generation row is untouched by the forcing
        assert not torch.isinf(out[0, :U]).any()
        s1_out.append(c1[k])
        gen_out.append(50 + k)
    got = core.take_scores(["s1", "s2", "nobody"])
    assert set(got) == {"s1", "s2"}
    assert got["s1"]["base"] == pytest.approx([w[0] for w in want1], abs=1e-4)
    assert got["s1"]["packed"] == pytest.approx([w[1] for w in want1], abs=1e-4)
    assert any(abs(b - p) > 1e-3 for b, p in want1)  # the pack changed row 1's numbers
    assert got["s2"]["base"] == got["s2"]["packed"] == pytest.approx([w[0] for w in want2], abs=1e-4)
    assert core.take_scores(["s1"]) == {}  # handed over once


def test_forced_scoring_with_top_n_records_ranks_and_top_tokens_of_the_packed_row(world):
    """score.top_n (OpenAI's echo / prompt_logprobs): each position's rank of the forced token and the top n
    tokens, from the row after the delta, equal to a hand computation on the same logits."""
    bp, a, _, source = world
    core = EnsembleLogitsCore(bp, source, vocab_size=U)
    prompt, cont, out = [5, 11, 6], [12, 40, 11], []
    core.update(BatchUpdate(1, [], [(0, _score_params([a], "t", cont, len(prompt), top_n=3), prompt, out)], []), _parse)
    g = torch.Generator().manual_seed(3)
    want = []
    for t in cont:
        z = torch.randn(1, VOCAB, generator=g)
        core.sync()
        edited = core.add_deltas(z.clone())  # forced: the record was taken from the row before the mask
        _, packed = _expected_logprob(bp, z[0], prompt, out, [a], t)
        full = z[0, :U].double()
        edits = combine_packs([a], bp.config.n_embd)
        ids = torch.tensor([prompt + out])
        if torch.isin(ids, edits.token_ids).any():
            full = full + (sequence_deltas(bp.contextualize(ids), ids, edits)[0, -1] @ bp.embedding[:U].T).double()
        lp = torch.log_softmax(full, -1)
        want.append((int((lp > lp[t]).sum()) + 1, torch.topk(lp, 3).indices.tolist(), packed))
        assert edited[0].argmax().item() == t
        out.append(t)
    got = core.take_scores(["t"])["t"]
    assert [r for r, _, _ in got["top"]] == [w[0] for w in want]
    assert [ids for _, ids, _ in got["top"]] == [w[1] for w in want]
    assert got["packed"] == pytest.approx([w[2] for w in want], abs=1e-4)
    for (_, _, lps), p in zip(got["top"], got["packed"], strict=True):
        assert lps[0] >= p - 1e-6 and lps == sorted(lps, reverse=True)


def test_score_records_are_bounded_incomplete_ones_say_so_and_forget_drops_them(world):
    bp, _, _, source = world
    core = EnsembleLogitsCore(bp, source, vocab_size=U, max_scores=2)
    for i in range(3):
        core.add(i, parse_extra_args(build_extra_args([], request_id=f"s{i}", score=ScoreSpec((1, 2), 1))), [5], [])
    assert core.stats.scores_evicted == 1 and core.take_scores(["s0"]) == {}  # the oldest went
    core.add_deltas(torch.randn(3, VOCAB))  # position 0 of s1 and s2 recorded, position 1 never
    assert "not scored" in core.take_scores(["s1"])["s1"]["error"]
    core.forget("s2")  # an abandoned score: its record goes with it
    assert core.take_scores(["s2"]) == {}
    # an id outside U is never forced (it would index past the logits): no row, no record, counted
    bad = parse_extra_args(build_extra_args([], request_id="s9", score=ScoreSpec((1, U), 1)))
    assert core.add(5, bad, [5], []) is False and core.stats.score_refused == 1
    assert core.take_scores(["s9"]) == {}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_forced_score_records_survive_any_batch_history(world, data):
    """Random V1 batch histories (adds, preemptions and re-adds with the output so far, swaps, compaction
    moves, repeated applies at one position as partial prefill chunks do), score rows with and without a
    pack beside a generation row: every record equals the hand computation of the last apply at each
    position, whatever happened to the row in between."""
    bp, a, _, source = world
    core = EnsembleLogitsCore(bp, source, vocab_size=U, max_parked=2)
    reqs = []
    for i in range(3):
        prefix = data.draw(st.lists(st.sampled_from([5, 6, 11, 12, 30]), min_size=1, max_size=3), label=f"prefix{i}")
        cont = data.draw(st.lists(st.sampled_from([7, 11, 12, 40]), min_size=1, max_size=4), label=f"cont{i}")
        packs = [a] if data.draw(st.booleans(), label=f"packed{i}") else []
        reqs.append({"rid": f"s{i}", "prefix": prefix, "cont": cont, "packs": packs, "out": [], "want": {}})
    batch: dict[int, dict | None] = {}  # row -> request (dense 0..n-1, as vLLM keeps it); generation rows: None
    waiting = list(reqs)
    gen_out: list[int] = []
    core.update(BatchUpdate(1, [], [(0, _params([a], "g"), [5, 11], gen_out)], []), _parse)
    batch[0] = None
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000), label="seed"))

    def add(q):
        row = len(batch)
        params = _score_params(q["packs"], q["rid"], q["cont"], len(q["prefix"]))
        core.update(BatchUpdate(row + 1, [], [(row, params, q["prefix"], q["out"])], []), _parse)
        batch[row] = q

    def remove(row):  # the last row moves into the gap (vLLM's compaction)
        last = len(batch) - 1
        moved = [(last, row, UNI)] if row != last else []
        core.update(BatchUpdate(last, [row], [], moved), _parse)
        batch[row] = batch.pop(last)
        if row == last:
            batch.pop(row, None)

    for _ in range(40):
        if not waiting and all(q is None for q in batch.values()):
            break
        op = data.draw(st.sampled_from(["add", "preempt", "swap", "apply", "apply", "apply"]), label="op")
        scoring = [r for r, q in batch.items() if q is not None]
        if op == "add" and waiting:
            add(waiting.pop(0))
        elif op == "preempt" and scoring:
            row = data.draw(st.sampled_from(scoring), label="preempted")
            waiting.append(batch[row])
            remove(row)
        elif op == "swap" and len(batch) >= 2:
            r1, r2 = data.draw(st.lists(st.sampled_from(sorted(batch)), min_size=2, max_size=2, unique=True))
            core.update(BatchUpdate(len(batch), [], [], [(r1, r2, SWAP)]), _parse)
            batch[r1], batch[r2] = batch[r2], batch[r1]
        elif op == "apply":
            z = torch.randn(len(batch), VOCAB, generator=g)
            core.sync()
            out = core.add_deltas(z.clone())
            sample = data.draw(st.booleans(), label="sampled")  # False: a partial prefill chunk (no token)
            for row, q in sorted(batch.items()):
                if q is None:
                    if sample:
                        gen_out.append(50)
                    continue
                k = len(q["out"])
                t = q["cont"][k]
                q["want"][k] = _expected_logprob(bp, z[row], q["prefix"], q["out"], q["packs"], t)
                assert out[row].argmax().item() == t and torch.isinf(out[row]).sum() == VOCAB - 1
                if sample:
                    q["out"].append(t)
            if sample:  # finished score rows leave the batch at the next update
                for row in sorted(
                    (r for r, q in batch.items() if q is not None and len(q["out"]) == len(q["cont"])), reverse=True
                ):
                    remove(row)
    done = [q for q in reqs if len(q["out"]) == len(q["cont"])]
    got = core.take_scores([q["rid"] for q in done])
    for q in done:
        want = [q["want"][k] for k in range(len(q["cont"]))]
        assert got[q["rid"]]["base"] == pytest.approx([w[0] for w in want], abs=1e-4)
        assert got[q["rid"]]["packed"] == pytest.approx([w[1] for w in want], abs=1e-4)
    assert core._forced == sum(1 for q in batch.values() if q is not None)


# ---------------------------------------------------------------- extra_args validation


@pytest.mark.parametrize(
    "extra,field",
    [
        ({"sensepack": []}, "extra_args.sensepack"),
        ({"sensepack": {"packs": "a"}}, "extra_args.sensepack.packs"),
        ({"sensepack": {"packs": [{"name": "a", "version": "1"}]}}, "extra_args.sensepack.packs[0].beta"),
        ({"sensepack": {"packs": [{"name": "a", "version": "1", "beta": -1.0}]}}, "extra_args.sensepack.packs[0].beta"),
        (
            {"sensepack": {"packs": [{"name": "a", "version": "1", "beta": math.inf}]}},
            "extra_args.sensepack.packs[0].beta",
        ),
        ({"sensepack": {"packs": [{"name": "a", "version": "1", "beta": True}]}}, "extra_args.sensepack.packs[0].beta"),
        ({"sensepack": {"packs": [{"name": "", "version": "1", "beta": 1}]}}, "extra_args.sensepack.packs[0].name"),
        (
            {"sensepack": {"packs": [{"name": "a", "version": "x@y", "beta": 1}]}},
            "extra_args.sensepack.packs[0].version",
        ),
        (
            {"sensepack": {"packs": [{"name": "a", "version": "1", "beta": 1, "x": 2}]}},
            "extra_args.sensepack.packs[0].x",
        ),
        ({"sensepack": {"packs": [], "base_only": "yes"}}, "extra_args.sensepack.base_only"),
        (
            {"sensepack": {"packs": [{"name": "a", "version": "1", "beta": 1}], "base_only": True}},
            "extra_args.sensepack.base_only",
        ),
        ({"sensepack": {"pack": []}}, "extra_args.sensepack.pack"),
        ({"sensepack": {"score": [1, 2], "request_id": "s"}}, "extra_args.sensepack.score"),
        (
            {"sensepack": {"score": {"tokens": [], "prefix_len": 1}, "request_id": "s"}},
            "extra_args.sensepack.score.tokens",
        ),
        (
            {"sensepack": {"score": {"tokens": [3, -1], "prefix_len": 1}, "request_id": "s"}},
            "extra_args.sensepack.score.tokens[1]",
        ),
        (
            {"sensepack": {"score": {"tokens": [3], "prefix_len": 0}, "request_id": "s"}},
            "extra_args.sensepack.score.prefix_len",
        ),
        (
            {"sensepack": {"score": {"tokens": [3], "prefix_len": 1, "x": 1}, "request_id": "s"}},
            "extra_args.sensepack.score.x",
        ),
        ({"sensepack": {"score": {"tokens": [3], "prefix_len": 1}}}, "extra_args.sensepack.request_id"),
        (
            {"sensepack": {"score": {"tokens": [3], "prefix_len": 1, "top_n": -1}, "request_id": "s"}},
            "extra_args.sensepack.score.top_n",
        ),
        (
            {
                "sensepack": {
                    "packs": [{"name": "a", "version": "1", "beta": 1}, {"name": "a", "version": "1", "beta": 2}]
                }
            },
            "extra_args.sensepack.packs[1].name",
        ),
    ],
)
def test_invalid_args_name_the_field(extra, field):
    with pytest.raises(ArgsError) as ei:
        parse_extra_args(extra)
    assert ei.value.field == field
    assert str(ei.value).startswith(field)


def test_valid_args_roundtrip():
    p = PackRef("cap", "v3", None, 0.25)
    parsed = parse_extra_args(build_extra_args([p], request_id="r1"))
    assert parsed.key == (("cap", "v3", 0.25),) and parsed.request_id == "r1"
    assert parse_extra_args(None) is None
    assert parse_extra_args({"other": 1}) is None
    assert parse_extra_args(build_extra_args([], base_only=True)) is None
    # forced scoring: base-only is still a request the processor handles (it records and forces)
    spec = ScoreSpec((5, 6), 3)
    scored = parse_extra_args(build_extra_args([], request_id="sc-1", score=spec))
    assert scored is not None and scored.packs == () and scored.score == spec and scored.request_id == "sc-1"


@pytest.mark.skipif(not USING_VLLM, reason="vLLM is not installed: its validation-error type is not available")
def test_vllm_validate_params_raises_vllm_validation_error():
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from serve.vllm.processor import SensepackLogitsProcessor

    bad = SamplingParams(extra_args={"sensepack": {"packs": [{"name": "a", "version": "1", "beta": -2}]}})
    with pytest.raises(VLLMValidationError) as ei:
        SensepackLogitsProcessor.validate_params(bad)
    assert ei.value.parameter == "extra_args.sensepack.packs[0].beta"
    SensepackLogitsProcessor.validate_params(SamplingParams(extra_args=build_extra_args([PackRef("a", "1", None, 1)])))


def test_engine_args_from_config():
    """Server config -> vllm.EngineArgs fields (no vLLM needed)."""
    from types import SimpleNamespace

    from serve.config import Config
    from serve.vllm.engine import engine_args_from_config

    cfg = Config()
    with pytest.raises(ValueError, match="profile: demo"):  # demo Backpack: in-process only
        engine_args_from_config(cfg, store_uri="/tmp/store")
    cfg.model.profile = "pretrained"
    cfg.model.large_model = "/models/gpt-j-6b"
    args = engine_args_from_config(cfg, store_uri="s3://packs")
    assert args["model"] == "/models/gpt-j-6b" and args["dtype"] == "float32"
    assert args["max_num_seqs"] == cfg.limits.max_running
    assert args["additional_config"]["sensepack"] == {
        "backpack": cfg.model.backpack,
        "store": "s3://packs",
        "dtype": "float32",
    }
    args = engine_args_from_config(cfg, store_uri="s3://packs", vocab=Vocabulary(size=400, eos_id=2, doc_sep_id=0))
    assert args["additional_config"]["sensepack"]["vocab_size"] == 400  # |U| reaches the worker processes
    with pytest.raises(ValueError, match=r"store\.uri"):
        engine_args_from_config(cfg, store_uri=None)
    shaped = SimpleNamespace(
        model=cfg.model,
        limits=cfg.limits,
        vllm=SimpleNamespace(
            tensor_parallel_size=4,
            multiprocessing=True,
            model="/m",
            gpu_memory_utilization=0.8,
            engine_args={"enforce_eager": True},
        ),
    )
    args = engine_args_from_config(shaped, store_uri="/store")
    assert (args["tensor_parallel_size"], args["model"], args["gpu_memory_utilization"], args["enforce_eager"]) == (
        4,
        "/m",
        0.8,
        True,
    )


def test_supported_version_range():
    from serve.vllm import check_vllm_version

    assert check_vllm_version("0.32.0") and check_vllm_version("0.32.3+cpu")
    assert not check_vllm_version("0.31.9") and not check_vllm_version("0.33.0") and not check_vllm_version("1.0")


def test_engine_args_resolve_registry_names():
    """serve/configs/smollm2.yaml names its model and tokenizer by registry name: vLLM gets their cached folders
    (it would look for a hub repository called smollm2-135m-instruct)."""
    from ensemble import zoo
    from serve.config import CONFIG_DIR, load_config
    from serve.vllm.engine import engine_args_from_config

    try:
        folder = zoo.resolve(zoo.SMOLLM2_NAME)
    except zoo.ZooError as e:
        pytest.skip(f"SmolLM2 could not be fetched: {e}")
    cfg = load_config(CONFIG_DIR / "smollm2.yaml")
    args = engine_args_from_config(cfg, store_uri="/store")
    assert args["model"] == str(folder) and args["tokenizer"] == str(folder)
