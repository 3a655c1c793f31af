"""Model Runner V2 adaptation of EnsembleLogitsCore (no vLLM import; the shim is processor_v2).

MRV2 differs from V1 (vllm/v1/worker/gpu/sample/logits_processor/interface.py, vLLM 0.32):
* state is keyed by request *slot*; slots are recycled and ``add_request(slot, params)`` is the
  only event (no remove / move): everything about a slot is reset there;
* ``add_request`` gets no prompt ids: the token history lives on the device in
  ``req_states.all_token_ids[slot, :total_len]``;
* ``apply(logits, ctx)`` rows are reordered every step: ``ctx.idx_mapping_np[i]`` is row i's slot
  (host array: no sync to find the rows), ``ctx.seq_lens_upper_bound_np[i]`` the number of tokens
  visible to the token being sampled (exact without speculative decoding), ``ctx.input_ids[i]`` the
  token at that row's position (the newest token).

A preempted request is re-added with ``add_request`` (MRV2 frees its slot without telling processors):
when its request id, packs and score spec match a row still held (its old slot not recycled yet), that row
moves to the new slot with its Backpack state and score record (``stats.resumed``), and the recompute's
chunks, which show tokens the tracker has already seen, neither feed it nor record a position.

So each step, for the tracked rows: tokens the tracker has not seen are the newest token
(``ctx.input_ids``: one batched device->host copy per step, the only sync, needed because the
tracker's bookkeeping is host-side) plus, on a slot's first step or after a resumption, a slice of
``all_token_ids``. A slot's first apply adds it to the tracker with the tokens visible so far
(a partial prefill chunk is fine: later tokens are appended; the tracker is incremental).

``add_request`` returns True for every request: the processor also masks the ids outside the
tokenizer, [|U|, vocab), for base rows, and MRV2 skips ``apply`` altogether when no request opted in.
Speculative decoding (several rows per request, draft tokens) is not supported: the Backpack
state would need to fork per draft; the shim refuses it at construction.
"""

from __future__ import annotations

import torch

from .args import RequestPacks, parse_extra_args
from .core import EnsembleLogitsCore


class V2Adapter:
    def __init__(self, core: EnsembleLogitsCore, req_states):
        self.core = core
        self.req_states = req_states
        self.pending: dict[int, RequestPacks] = {}  # slot -> packs, not yet in the tracker
        self.known: dict[int, int] = {}  # slot -> tokens fed to the tracker

    def add_request(self, slot: int, sampling_params) -> bool:
        slot = int(slot)
        req = parse_extra_args(getattr(sampling_params, "extra_args", None))
        prev = self._slot_of(req)
        if prev is not None:  # preempted and re-added (any slot): keep its Backpack state and score record
            if prev != slot:
                self.core.move(prev, slot)  # drops the slot's previous occupant
                self.pending.pop(slot, None)
                self.known[slot] = self.known.pop(prev, 0)
            self.core.stats.resumed += 1
            return True
        self.core.drop(slot)
        self.pending.pop(slot, None)
        self.known.pop(slot, None)
        if req is not None:
            self.pending[slot] = req
        return True

    def _slot_of(self, req: RequestPacks | None) -> int | None:
        """The slot still holding this request's row (MRV2 sends no removal: a preempted request's row stays
        until its slot is recycled), when its id and packs match."""
        if req is None or req.request_id is None:
            return None
        for s, r in self.core.rows.items():
            if r.rid == req.request_id and r.key == req.key and r.score == req.score:
                return s
        return None

    def _history(self, slot: int, start: int, end: int) -> list[int]:
        if end <= start:
            return []
        return self.req_states.all_token_ids.gpu[slot, start:end].tolist()

    @torch.no_grad()
    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        core = self.core
        slots = ctx.idx_mapping_np
        n = logits.shape[0]
        if n != len(slots):
            raise NotImplementedError(
                "sensepack MRV2 processor: speculative decoding (several logits rows per request) is not supported"
            )
        tracked = [(i, int(s)) for i, s in enumerate(slots.tolist()) if s in core.rows or s in self.pending]
        if not tracked:
            return core.add_deltas(logits, rows=[], sids=[], forced=[])
        lens = ctx.seq_lens_upper_bound_np
        newest = None
        rows, sids, forced = [], [], []
        for i, slot in tracked:
            target = int(lens[i])
            known = self.known.get(slot, 0)
            fresh = target > known  # False: a re-added request recomputing tokens the tracker has seen
            if fresh:
                if newest is None:
                    newest = ctx.input_ids[:n].to("cpu").tolist()  # the step's one device->host copy
                toks = self._history(slot, known, target - 1) + [int(newest[i])]
                if slot in self.pending:
                    req = self.pending.pop(slot)
                    if not core.add(slot, req, toks, None):
                        self.known[slot] = target
                        continue
                else:
                    core.push_tokens(slot, toks)
                self.known[slot] = target
            r = core.rows.get(slot)
            if r is None:
                continue
            if r.sid is not None:
                rows.append(i)
                sids.append(r.sid)
            if r.score is not None and fresh:  # position = visible - prompt (< 0 on a partial prefill chunk)
                forced.append((i, r, target - r.score.prefix_len))
        if not sids:
            return core.add_deltas(logits, rows=[], sids=[], forced=forced)
        dense = rows == list(range(len(rows)))
        index = None if dense else torch.tensor(rows, dtype=torch.long).to(logits.device, non_blocking=True)
        return core.add_deltas(logits, rows=rows, sids=sids, index=index, forced=forced)
