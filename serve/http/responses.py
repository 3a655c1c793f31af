"""One admitted HTTP request from the engine's events to OpenAI's response: the JSON body, or the SSE
stream with its chunks, usage and [DONE].
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from serve import engine as eng
from serve import scheduler as sched
from serve.errors import (
    Cancelled,
    status_of,
)
from serve.http.bodies import FINISH_REASONS, AnyBody
from serve.service import GenerationService, PromptScores, finish_error

log = logging.getLogger("sensepack.http")


@dataclass
class Prompt:
    """A completion choice's prompt as echo and prompt_logprobs show it (scores: None when not asked)."""

    text: str
    ids: list[int]
    scores: PromptScores | None


class PromptOnly:
    """A choice that generates nothing (echo with max_tokens 0): it finishes at once, with its prompt."""

    def __init__(self, req, packs: list):
        self.req, self.packs, self.seed = req, packs, None

    def cancel(self, reason: str | None = None) -> None:
        pass

    def events(self, is_active=None):
        yield eng.FinishEvent(sched.MAX_TOKENS, "", "", [])


class Reply:
    """One admitted HTTP request: its generations' events, fanned in to the event loop."""

    def __init__(
        self,
        service: GenerationService,
        count: Callable[[str, str], None],
        body: AnyBody,
        method: str,
        rid: str,
        gens: list[tuple[int, Any]],
        prompts: dict[int, Prompt],
        loop: asyncio.AbstractEventLoop,
    ):
        self.service, self.count = service, count  # count(method, status): the front-end's request counter
        self.body, self.method, self.rid, self.gens = body, method, rid, gens
        self.prompts = prompts  # choice -> its prompt, for echo / prompt_logprobs
        self.chat = method == "chat.completions"
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished: set[int] = set()
        self.gone = threading.Event()
        self._checked = time.monotonic()
        for i, g in gens:
            threading.Thread(target=self._forward, args=(i, g, loop), name="sensepack-http-events", daemon=True).start()

    def _forward(self, i: int, g: Any, loop) -> None:
        for ev in g.events(lambda: not self.gone.is_set()):
            loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))

    def cancel_all(self) -> None:
        self.gone.set()
        for i, g in self.gens:
            if i not in self.finished:
                g.cancel(sched.CANCELLED)

    async def _next(self, request):
        """The next (choice, event); cancels everything when the client has gone (checked at least every
        0.5 s, also while tokens keep coming: a non-streaming request sends nothing until the end)."""
        while True:
            now = time.monotonic()
            if now - self._checked >= 0.5:
                self._checked = now
                if await request.is_disconnected():
                    self.cancel_all()
                    raise Cancelled("", "client disconnected")
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except TimeoutError:
                continue

    # ---- pieces
    def _token_text(self, tid: int) -> str:
        if self.body.return_tokens_as_token_ids:
            return f"token_id:{tid}"
        return self.service.token_text(tid, self.body.skip_special_tokens)

    def _sensepack(self, g: Any) -> dict:
        out: dict[str, Any] = {
            "request_id": g.req.request_id,
            "packs": [
                {"ref": p.ref, "name": p.name, "version": p.version, "beta": p.beta, "arm": p.arm} for p in g.packs
            ],
        }
        if g.seed is not None:
            out["seed"] = g.seed
        return out

    def _logprobs(self, evs: list[eng.TokenEvent], offset: int = 0):
        """OpenAI's logprobs object for these tokens (chat: `content` entries; completions: parallel lists)."""
        if self.chat:
            content = []
            for ev in evs:
                t = self._token_text(ev.token_id)
                content.append(
                    {
                        "token": t,
                        "logprob": ev.logprob,
                        "bytes": list(t.encode()),
                        "top_logprobs": [
                            {"token": self._token_text(i), "logprob": lp, "bytes": list(self._token_text(i).encode())}
                            for i, lp in ev.top
                        ],
                    }
                )
            return {"content": content}
        tokens, lps, tops, offs = [], [], [], []
        for ev in evs:
            t = self._token_text(ev.token_id)
            tokens.append(t)
            lps.append(ev.logprob)
            tops.append({self._token_text(i): lp for i, lp in ev.top} if self.body.logprobs else None)
            offs.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    def _echo_logprobs(self, p: Prompt) -> dict:
        """The prompt's part of a completion's logprobs (echo): the first token has none, as in OpenAI's API."""
        tokens: list[str] = []
        lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offs: list[int] = []
        offset = 0
        sc = p.scores
        for k, tid in enumerate(p.ids):
            t = self._token_text(tid)
            tokens.append(t)
            offs.append(offset)
            offset += len(t)
            if k == 0 or sc is None:
                lps.append(None)
                tops.append(None)
                continue
            lp = sc.logprobs[k - 1]
            lps.append(lp)
            if not self.body.logprobs or sc.top is None:
                tops.append(None)
                continue
            top = {t: lp}  # the token itself, then the top n (as vLLM)
            n = self.body.logprobs
            for j, v in zip(sc.top.ids[k - 1, :n].tolist(), sc.top.logprobs[k - 1, :n].tolist(), strict=True):
                top.setdefault(self._token_text(j), v if j != tid else lp)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    def _prompt_logprobs(self, p: Prompt) -> list | None:
        """vLLM's prompt_logprobs: None, then per prompt token {id: {logprob, rank, decoded_token}} for the
        token itself and the top n."""
        n = getattr(self.body, "prompt_logprobs", None)
        if n is None or p.scores is None or p.scores.top is None:
            return None
        out: list = [None]
        top = p.scores.top
        for k, tid in enumerate(p.ids[1:]):
            lp = p.scores.logprobs[k]
            entry = {str(tid): {"logprob": lp, "rank": int(top.ranks[k]), "decoded_token": self._token_text(tid)}}
            ids, vals = top.ids[k, :n].tolist(), top.logprobs[k, :n].tolist()
            for rank, (j, v) in enumerate(zip(ids, vals, strict=True), start=1):
                if j != tid:
                    entry[str(j)] = {"logprob": v, "rank": rank, "decoded_token": self._token_text(j)}
            out.append(entry)
        return out

    def _text_and_logprobs(self, i: int, text: str, evs: list[eng.TokenEvent], first: bool) -> tuple[str, Any]:
        """A completion choice's text and logprobs, the echoed prompt first (`first`: this is its first piece)."""
        p = self.prompts.get(i) if first and getattr(self.body, "echo", False) else None
        want = self._want_logprobs
        if p is None:
            return text, (self._logprobs(evs) if want and (evs or not first) else None)
        if not want:
            return p.text + text, None
        lp = self._echo_logprobs(p)
        gen = self._logprobs(evs, offset=len(p.text))
        return p.text + text, {k: lp[k] + gen[k] for k in lp}

    @property
    def _want_logprobs(self) -> bool:
        return bool(self.body.logprobs) if self.chat else self.body.logprobs is not None

    def _usage(self, n_completion: int) -> dict:
        seen, prompt = set(), 0
        for _, g in self.gens:  # each prompt counted once, as OpenAI does with n > 1
            key = tuple(g.req.prompt_ids)
            if key not in seen:
                seen.add(key)
                prompt += len(g.req.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": n_completion, "total_tokens": prompt + n_completion}

    def _object(self, chunk: bool) -> str:
        if self.chat:
            return "chat.completion.chunk" if chunk else "chat.completion"
        return "text_completion"

    # ---- non-streaming
    async def collect(self, request) -> dict:
        tokens: dict[int, list[eng.TokenEvent]] = {i: [] for i, _ in self.gens}
        done: dict[int, eng.FinishEvent] = {}
        try:
            while len(done) < len(self.gens):
                i, ev = await self._next(request)
                if isinstance(ev, eng.TokenEvent):
                    tokens[i].append(ev)
                    continue
                self.finished.add(i)
                err = finish_error(ev)
                if err is not None:
                    raise err
                if ev.last is not None:
                    tokens[i].append(ev.last)
                done[i] = ev
        except BaseException:
            self.cancel_all()
            raise
        choices, completion = [], 0
        for i, g in self.gens:
            ev = done[i]
            completion += len(ev.output_ids)
            c: dict[str, Any] = {
                "index": i,
                "finish_reason": FINISH_REASONS.get(ev.reason, "stop"),
                "stop_reason": ev.stop_sequence or None,
                "sensepack": self._sensepack(g),
            }
            if self.chat:
                c["message"] = {"role": "assistant", "content": ev.text}
                c["logprobs"] = self._logprobs(tokens[i]) if self._want_logprobs else None
            else:
                c["text"], c["logprobs"] = self._text_and_logprobs(i, ev.text, tokens[i], True)
                if i in self.prompts and getattr(self.body, "prompt_logprobs", None) is not None:
                    c["prompt_logprobs"] = self._prompt_logprobs(self.prompts[i])
            choices.append(c)
        g0 = self.gens[0][1]
        return {
            "id": self.rid,
            "object": self._object(False),
            "created": self.created,
            "model": self.body.model,
            "choices": choices,
            "usage": self._usage(completion),
            "sensepack": self._sensepack(g0),
        }

    # ---- streaming
    def _chunk(self, i: int, text: str, evs: list[eng.TokenEvent], finish: str | None, first: bool) -> dict:
        c: dict[str, Any] = {"index": i, "finish_reason": finish}
        if self.chat:
            c["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
            c["logprobs"] = self._logprobs(evs) if self._want_logprobs and evs else None
        else:
            c["text"], c["logprobs"] = self._text_and_logprobs(i, text, evs, first)
            if first and i in self.prompts and getattr(self.body, "prompt_logprobs", None) is not None:
                c["prompt_logprobs"] = self._prompt_logprobs(self.prompts[i])
        out = {
            "id": self.rid,
            "object": self._object(True),
            "created": self.created,
            "model": self.body.model,
            "choices": [c],
        }
        if first:
            out["sensepack"] = self._sensepack(dict(self.gens)[i])
        return out

    async def sse(self, request: Request) -> AsyncIterator[str]:
        method = self.method
        started: set[int] = set()
        completion = 0
        opts = self.body.stream_options
        try:
            while len(self.finished) < len(self.gens):
                i, ev = await self._next(request)
                first = i not in started
                started.add(i)
                if isinstance(ev, eng.TokenEvent):
                    completion += 1
                    yield _sse(self._chunk(i, ev.text_delta, [ev], None, first))
                    continue
                self.finished.add(i)
                err = finish_error(ev)
                if err is not None:
                    self.cancel_all()
                    st = status_of(err)
                    self.count(method, st.grpc)
                    yield _sse(
                        {
                            "error": {
                                "message": err.message,
                                "type": st.openai_type,
                                "param": err.field or None,
                                "code": st.grpc,
                            }
                        }
                    )
                    yield "data: [DONE]\n\n"
                    return
                evs = [ev.last] if ev.last is not None else []
                completion += len(evs)
                yield _sse(self._chunk(i, ev.text_delta, evs, FINISH_REASONS.get(ev.reason, "stop"), first))
            if opts is not None and opts.include_usage:
                yield _sse(
                    {
                        "id": self.rid,
                        "object": self._object(True),
                        "created": self.created,
                        "model": self.body.model,
                        "choices": [],
                        "usage": self._usage(completion),
                    }
                )
            yield "data: [DONE]\n\n"
            self.count(method, "OK")
        except Cancelled:
            self.count(method, "CANCELLED")
        finally:
            if len(self.finished) < len(self.gens):  # the client went away mid-stream: free the slots now
                if not self.gone.is_set():
                    self.count(method, "CANCELLED")
                self.cancel_all()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
