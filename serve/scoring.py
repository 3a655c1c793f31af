"""Score in bounded memory, interleaved with decoding: the vocabulary
projection in chunks of positions, each chunk its own engine job.

For the row r = prefix + continuation, the large model runs once to its last
hidden states h (L, d) (no logits); then, for each chunk of positions t,

    z_t        = lm_head(h_t)[:V]                     # (chunk, V) float32, V = |U| (50257 for GPT-2)
    z_t^pack   = z_t + δ_t · E[:V]ᵀ                   # the Backpack delta (rows with an edited token)
    log p(r_{t+1} | r_≤t) = z_t[r_{t+1}] - logsumexp(z_t)

so no (L, V) tensor exists: the peak is one chunk (``chunk · V · 4`` bytes,
~25 MB at 128 positions) besides the model's own activations. Rows past the
Backpack's window take the core's sliding-window path, one position at a time
(also bounded), WINDOW_STEP positions per engine job. `should_stop()` is called between chunks and raises to abandon
a cancelled or expired Score.

**Scorers.** Score, Generate's prompt log-probs, the activation gate and the A/B re-scoring all go
through a `Scorer` (`score`: one continuation's per-token log-probs; `paired_nll`: per-row summed
NLL under base and pack), which hands back a `ScoreJob` (a future and a way to abandon it):

* `EmbeddedScorer`: the chunked path above, one engine job per step, on the embedded ensemble;
* `serve.vllm.scoring.VLLMScorer`: forced decoding through the serving vLLM engine (no second copy
  of the large model; serve.vllm.core records the log-probs).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ensemble.delta import logit_delta, sequence_deltas
from ensemble.sense_model import uses_hidden

SCORE_CHUNK = 128
WINDOW_STEP = 16  # tokens per step past the Backpack's window (each is a decode step of its own)
FORWARD_CHUNK = 128  # the row's forward pass, in chunks of this many tokens (one engine job each): no stall
# (the server passes limits.prefill_chunk_tokens; None there: the whole row in one job)


class ScoreAbandoned(Exception):
    """Raised by `should_stop` when the Score was cancelled or its deadline passed."""


@dataclass
class TopLogprobs:
    """Per continuation position, under the served distribution (packed when packs are scored, else base):
    the rank of the scored token (1: the argmax) and the `k` most likely tokens with their log-probs
    (ties broken by token id). For OpenAI's echo / prompt_logprobs."""

    ranks: torch.Tensor  # (L,) int64
    ids: torch.Tensor  # (L, k) int64
    logprobs: torch.Tensor  # (L, k) float32


def top_of(lp: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ranks, top ids, top log-probs) of log-prob rows `lp` (n, V) at `targets` (n,)."""
    picked = lp.gather(1, targets[:, None])
    ranks = (lp > picked).sum(dim=1) + 1
    if k <= 0:
        empty = torch.empty(lp.shape[0], 0)
        return ranks.cpu(), empty.long(), empty.float()
    vals, ids = torch.topk(lp, min(k, lp.shape[1]), dim=1)
    return ranks.cpu(), ids.cpu(), vals.float().cpu()


def _tops(parts: list) -> TopLogprobs:
    return TopLogprobs(*(torch.cat([p[i] for p in parts]) for i in range(3)))


def _hidden_chunks(large, row: list[int], chunk: int):
    """The row's final hidden states (len, d), computed `chunk` tokens at a time on a KV cache (the same
    numbers as one forward); yields after each chunk, returns the hidden states."""
    from transformers import DynamicCache

    cache = DynamicCache(config=large.config)
    parts = []
    for s in range(0, len(row), chunk):
        ids = torch.tensor([row[s : s + chunk]], device=large.device)
        pos = torch.arange(s, s + ids.shape[1], device=large.device)[None]
        out = large.base_model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        parts.append(out.last_hidden_state[0])
        if s + chunk < len(row):
            yield
    return torch.cat(parts)


def score_row(
    ensemble,
    prefix: list[int],
    cont: list[int],
    packs: list,
    want_base: bool,
    want_packed: bool,
    should_stop: Callable[[], None] | None = None,
    chunk: int = SCORE_CHUNK,
    top_n: int | None = None,
):
    """(base, packed) float32 log-probs of each continuation token (None where not wanted), in one go;
    with `top_n` (0 for ranks alone), (base, packed, TopLogprobs)."""
    steps = score_steps(ensemble, prefix, cont, packs, want_base, want_packed, should_stop, chunk, top_n)
    while True:
        done, result = advance(steps)
        if done:
            return result


def advance(steps) -> tuple[bool, object]:
    """Run one step of `score_steps`: (False, None), or (True, (base, packed)) once finished."""
    try:
        next(steps)
        return False, None
    except StopIteration as e:
        return True, e.value


def score_steps(
    ensemble,
    prefix: list[int],
    cont: list[int],
    packs: list,
    want_base: bool,
    want_packed: bool,
    should_stop: Callable[[], None] | None = None,
    chunk: int = SCORE_CHUNK,
    top_n: int | None = None,
    forward_chunk: int | None = FORWARD_CHUNK,
):
    """`score_row` as a generator that yields after the forward pass and after every chunk, so that the
    engine can run each step as its own job (decode steps in between); returns what `score_row` does."""
    with torch.no_grad():
        return (
            yield from _score_steps(
                ensemble, prefix, cont, packs, want_base, want_packed, should_stop, chunk, top_n, forward_chunk
            )
        )


def _score_steps(ensemble, prefix, cont, packs, want_base, want_packed, should_stop, chunk, top_n, forward_chunk):
    row = prefix + cont
    large, bp = ensemble.large, ensemble.backpack
    stop = should_stop or (lambda: None)
    forward = _hidden_chunks(large, row, forward_chunk or len(row))
    while True:  # the forward pass, a chunk per engine job
        stop()
        try:
            next(forward)
        except StopIteration as done:
            hidden = done.value
            break
        yield
    head = large.get_output_embeddings()
    delta = None
    long_packed = False
    if want_packed:
        _, edits = ensemble.combined_edits(packs)
        bids = torch.tensor([row], device=bp.embedding.device)
        if len(edits) and bool(torch.isin(bids, edits.token_ids.to(bids.device)).any()):
            if len(row) <= bp.config.n_positions:
                # a sense head reads the same hidden states (no second forward of the large model)
                extra = {"hidden": hidden[None].to(bp.embedding.device)} if uses_hidden(bp) else {}
                alpha = bp.contextualize(bids, **extra)
                delta = sequence_deltas(alpha, bids, edits.to(bids.device, alpha.dtype))[0]
            else:
                long_packed = True
    stop()
    yield
    targets = torch.tensor(cont, device=hidden.device)
    n_vocab = ensemble.vocab.size
    base_parts, packed_parts, top_parts = [], [], []
    first = len(prefix) - 1  # position predicting cont[0]
    # the top tokens of the served distribution: the base's unless a pack changes this row
    base_tops = top_n is not None and not (want_packed and (delta is not None or long_packed))
    for s in range(first, len(row) - 1, chunk):
        stop()
        e = min(s + chunk, len(row) - 1)
        z = head(hidden[s:e]).float()[:, :n_vocab]
        tgt = targets[s - first : e - first, None]
        if want_base or base_tops or (want_packed and delta is None and not long_packed):
            lp_all = z - torch.logsumexp(z, dim=-1, keepdim=True)
            lp = lp_all.gather(1, tgt).squeeze(1)
            if want_base:
                base_parts.append(lp)
            if want_packed and delta is None and not long_packed:
                packed_parts.append(lp)  # no edited token: exactly the base (exact skip)
            if base_tops:
                top_parts.append(top_of(lp_all, tgt[:, 0], top_n or 0))
            del lp_all
        if delta is not None:
            z = z + logit_delta(delta[s:e], bp.embedding, n_vocab).float().to(z.device)
            lp_all = z - torch.logsumexp(z, dim=-1, keepdim=True)
            packed_parts.append(lp_all.gather(1, tgt).squeeze(1))
            if top_n is not None:
                top_parts.append(top_of(lp_all, tgt[:, 0], top_n))
            del lp_all
        del z
        yield
    base = torch.cat(base_parts) if want_base else None
    packed = torch.cat(packed_parts) if want_packed and not long_packed else None
    if long_packed:  # the core's sliding-window decode path, WINDOW_STEP tokens per engine job
        batch = ensemble.new_batch()
        batch.add(0, prefix, packs)
        out = []
        for k, t in enumerate(cont):
            if k % WINDOW_STEP == 0:
                stop()
                yield
            lp_all = batch.logprobs()[:1].float()
            out.append(lp_all[0, t])
            if top_n is not None:
                top_parts.append(top_of(lp_all, torch.tensor([t], device=lp_all.device), top_n))
            batch.append({0: t})
        packed = torch.stack(out)
    if top_n is not None:
        return base, packed, _tops(top_parts)
    return base, packed


def paired_nll(ensemble, rows: list[list[int]], pack_ref) -> tuple[list[float], list[float]]:
    """Per-row summed NLL (nats) of tokens 1.. under base and under the pack (engine thread only):
    `Ensemble.paired_nll`, one pass over the same large-model logits. Rows under 2 tokens are dropped."""
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        return [], []
    return ensemble.paired_nll(rows, [pack_ref])


class ScoreJob:
    """A scoring job in flight: `result(timeout)` waits for it; `cancel()` abandons it (best effort: the
    work already done stays done, the rest is not run)."""

    def __init__(self, future: Future, cancel: Callable[[], None] | None = None):
        self.future = future
        self._cancel = cancel

    def result(self, timeout: float | None = None) -> Any:
        return self.future.result(timeout=timeout)

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel()
        self.future.cancel()


class Scorer(Protocol):
    concurrent: bool  # takes several rows at once without more memory per row (vLLM batches them itself)

    def score(
        self,
        prefix: list[int],
        cont: list[int],
        packs: list,
        want_base: bool,
        want_packed: bool,
        high: bool = True,
        top_n: int | None = None,
    ) -> ScoreJob:
        """Result: (base, packed) float32 tensors of each continuation token's log-prob (None where not
        wanted); with `top_n` (0: ranks alone), (base, packed, TopLogprobs) of the served distribution."""
        ...

    def paired_nll(self, rows: list[list[int]], pack_ref, high: bool = True) -> ScoreJob:
        """Result: (base, packed) per-row summed NLL (nats) of tokens 1.. ; rows under 2 tokens are dropped."""
        ...


def settle(fut: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve `fut` unless it already is (whichever of two racing completions comes first wins)."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass


def _chain(fut: Future, into: Future) -> None:
    """A failed or cancelled engine job (the engine stopped) fails the outer future too."""

    def done(f: Future) -> None:
        if f.cancelled():
            settle(into, error=ScoreAbandoned())
        elif f.exception() is not None:
            settle(into, error=f.exception())

    fut.add_done_callback(done)


class EmbeddedScorer:
    """Scoring on the embedded ensemble, as engine jobs (decode steps run between them)."""

    concurrent = False  # one continuation at a time keeps Score's memory to one chunk

    def __init__(self, engine, ensemble):
        self.engine, self.ensemble = engine, ensemble

    def score(self, prefix, cont, packs, want_base, want_packed, high: bool = True, top_n=None) -> ScoreJob:
        outer: Future = Future()
        outer.set_running_or_notify_cancel()
        stopped = threading.Event()

        def should_stop() -> None:
            if stopped.is_set():
                raise ScoreAbandoned()

        steps = score_steps(
            self.ensemble,
            prefix,
            cont,
            packs,
            want_base,
            want_packed,
            should_stop,
            top_n=top_n,
            forward_chunk=self.engine.limits.prefill_chunk_tokens,
        )

        def step() -> None:  # one step of serve.scoring per engine job, then queue the next
            if outer.done():
                return
            try:
                done, out = advance(steps)
            except BaseException as e:  # noqa: BLE001 - reported to the waiter
                settle(outer, error=e)
                return
            if done:
                settle(outer, out)
            else:
                _chain(self.engine.run_job(step, high), outer)

        _chain(self.engine.run_job(step, high), outer)
        return ScoreJob(outer, stopped.set)

    def paired_nll(self, rows, pack_ref, high: bool = True) -> ScoreJob:
        return ScoreJob(self.engine.run_job(lambda: paired_nll(self.ensemble, rows, pack_ref), high))
