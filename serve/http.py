"""The OpenAI-compatible HTTP front-end: /v1/completions, /v1/chat/completions (SSE streaming),
/v1/models, /health; FastAPI on uvicorn, in the server's process, over the same
serve.service.GenerationService (engine, pack manager) as gRPC.

Each request body is validated into OpenAI's fields (unknown fields are refused, naming them), mapped
onto serve.params.GenerateInput and validated by the same `validate_generation` as gRPC, with
OpenAI's field names in the errors. Packs: `packs` / `base_only` in the body (the openai client's
`extra_body`), or the model-name form `model="capitals@prod"` (several: comma-separated) for clients
that cannot send extra fields. Responses carry a `sensepack` object: request id, the pinned pack
versions, βs and A/B arms, and the seed. Errors use OpenAI's shape, with the status from
serve.errors.STATUS.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from serve import engine as eng
from serve.auth import check_api_key
from serve.errors import Cancelled, InternalError, InvalidRequest, PackNotFound, ServeError, status_of
from serve.metrics import HTTP, Metrics
from serve.params import MAX_REQUEST_ID, GenerateInput, parse_pack_ref, validate_generation
from serve.service import Generation, GenerationService, finish_error

log = logging.getLogger("sensepack.http")

# proto field paths (serve.params) -> OpenAI's names, for error messages
OPENAI_FIELDS = {
    "request_id": "x-request-id", "text": "prompt", "token_ids.ids": "prompt", "input": "prompt",
    "sampling.temperature": "temperature", "sampling.top_k": "top_k", "sampling.top_p": "top_p",
    "sampling.seed": "seed", "stopping.max_new_tokens": "max_tokens", "stopping.min_new_tokens": "min_tokens",
    "stopping.stop_sequences": "stop", "stopping.stop_token_ids": "stop_token_ids",
    "response.top_n_tokens": "logprobs", "sampling.repetition_penalty": "repetition_penalty",
    "sampling.presence_penalty": "presence_penalty", "sampling.frequency_penalty": "frequency_penalty",
    "sampling.min_p": "min_p", "sampling.logit_bias": "logit_bias", "packs": "packs", "ab_key": "ab_key",
}
_FINISH = {eng.MAX_TOKENS: "length", eng.EOS_TOKEN: "stop", eng.STOP_SEQUENCE: "stop", eng.STOP_TOKEN: "stop"}


# ------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class PackSpec(_Body):
    ref: str
    beta: Optional[float] = None


class _Common(_Body):
    """Fields both endpoints share: OpenAI's, then sensepack's and vLLM's extensions (extra_body)."""
    model: str
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = None      # None: 1.0 (OpenAI's default); 0: greedy
    top_p: Optional[float] = None
    max_tokens: Optional[int] = Field(None, ge=0)
    stop: Union[str, list[str], None] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[int] = None
    user: Optional[str] = None               # also the A/B key when ab_key is not given
    # extensions
    packs: Optional[list[Union[str, PackSpec]]] = None
    base_only: bool = False
    ab_key: Optional[str] = None
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False


class CompletionBody(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0)
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0)
    add_generation_prompt: bool = True


AnyBody = Union[CompletionBody, ChatBody]


def _loc(err: Any) -> str:
    out = ""
    for part in err["loc"]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = str(part)
        elif part in ("str", "list[str]", "list[int]", "list[list[int]]", "PackSpec", "list[TextPart]"):
            continue        # pydantic's union member names are not fields
        else:
            out += f".{part}"
    return out


def _parse_body(cls: type[_Body], body: Any) -> Any:
    if not isinstance(body, dict):
        raise InvalidRequest("body", "expected a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = _loc(first)
        msg = "not a field of this endpoint (unsupported by sensepack)" if first["type"] == "extra_forbidden" \
            else first["msg"]
        raise InvalidRequest(where or "body", msg) from None


# ------------------------------------------------------------------ the front-end
class HttpFrontend:
    def __init__(self, service: GenerationService, packs, config, tokenizer, vocab, context_len: int,
                 metrics: Metrics, model_name: str):
        self.service, self.packs, self.cfg = service, packs, config
        self.tokenizer, self.vocab, self.context_len = tokenizer, vocab, context_len
        self.metrics, self.model_name = metrics, model_name
        self.keys = [k.encode() for k in config.api.resolved_keys()]
        self.chat_template = self._load_template(config.http.chat_template)
        self.ready = False
        lim = config.limits
        self._pool = ThreadPoolExecutor(max_workers=lim.max_running + lim.max_waiting + 16,
                                        thread_name_prefix="sensepack-http-admit")
        self.port: int | None = None
        self._server: Any = None           # uvicorn.Server once started
        self._thread: threading.Thread | None = None
        self.app = self._build_app()

    @staticmethod
    def _load_template(spec: str | None) -> str | None:
        if spec is None:
            return None
        p = Path(spec)
        if "{" not in spec and p.is_file():
            return p.read_text()
        return spec

    # ---- lifecycle
    def start(self) -> "HttpFrontend":
        import uvicorn

        h = self.cfg.http
        tls = self.cfg.tls       # the gRPC listener's certificate (and client CA: mTLS) serve HTTPS too
        ssl = {}
        if tls.enabled:
            import ssl as _ssl

            ssl = {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
            if tls.client_ca_file:
                ssl.update(ssl_ca_certs=str(tls.client_ca_file), ssl_cert_reqs=_ssl.CERT_REQUIRED)
        config = uvicorn.Config(self.app, host=h.host, port=h.port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=2, lifespan="off", **ssl)
        server = self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, name="sensepack-http", daemon=True)
        self._thread.start()
        end = time.monotonic() + 30
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"http.port: could not serve on {h.host}:{h.port}")
            time.sleep(0.01)
        self.port = server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.ready = False
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- app
    def _build_app(self):
        app = FastAPI(title="sensepack", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(HTTPException)
        async def _http_error(request: Request, exc: HTTPException):
            return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error",
                                           "param": None, "code": exc.status_code}}, status_code=exc.status_code)

        @app.get("/health")
        async def health():
            return JSONResponse({"status": "ok" if self.ready else "not serving"},
                                status_code=200 if self.ready else 503)

        @app.get("/v1/models")
        async def models(request: Request):
            denied = self._auth(request, "models")
            if denied is not None:
                return denied
            self._count("models", "OK")
            return JSONResponse({"object": "list", "data": self._model_list()})

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str, request: Request):
            denied = self._auth(request, "models")
            if denied is not None:
                return denied
            for m in self._model_list():
                if m["id"] == model_id:
                    self._count("models", "OK")
                    return JSONResponse(m)
            return self._error(PackNotFound("model", f"unknown model {model_id!r} (GET /v1/models lists them)"),
                               "models")

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._handle(request, "completions")

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await self._handle(request, "chat.completions")

        return app

    # ---- helpers
    def _count(self, method: str, status: str) -> None:
        self.metrics.requests.labels(method, status, HTTP).inc()

    def _error(self, err: ServeError, method: str):
        st = status_of(err)
        self._count(method, st.grpc)
        return JSONResponse({"error": {"message": err.message, "type": st.openai_type, "param": err.field or None,
                                       "code": st.grpc}}, status_code=st.http)

    def _auth(self, request, method: str):
        err = check_api_key(request.headers.get("authorization"), self.keys)
        return None if err is None else self._error(err, method)

    def _model_list(self) -> list[dict]:
        now = int(time.time())
        out = [{"id": self.model_name, "object": "model", "created": now, "owned_by": "sensepack"}]
        for route, r in sorted(self.packs.routes().items()):
            if r is None:
                continue
            out.append({"id": route, "object": "model", "created": now, "owned_by": "sensepack",
                        "root": self.model_name, "parent": self.model_name,
                        "sensepack": {"name": r.name, "version": r.version, "beta": r.calibrated_beta}})
        return out

    # ---- request -> GenerateInput
    def _packs(self, body: _Common) -> tuple[list[tuple[str, float | None]], dict[str, str]]:
        """The request's packs and the name of the field they came from (for error messages)."""
        names = dict(OPENAI_FIELDS)
        if body.model == self.model_name:
            specs = body.packs or []
            return [(s, None) if isinstance(s, str) else (s.ref, s.beta) for s in specs], names
        refs = body.model.split(",")
        for r in refs:
            try:
                parse_pack_ref(r, "model")
            except InvalidRequest:
                raise PackNotFound("model", f"unknown model {body.model!r}: serving {self.model_name!r}, with packs "
                                            f"as model names (`name`, `name@alias`, comma-separated; GET /v1/models)"
                                   ) from None
        if body.packs:
            raise InvalidRequest("packs", f"the model name {body.model!r} already names packs; send one of the two")
        if body.base_only:
            raise InvalidRequest("base_only", f"the model name {body.model!r} names packs")
        names["packs"] = "model"
        return [(r, None) for r in refs], names

    def _inputs(self, body: AnyBody, rid: str) -> tuple[list[GenerateInput], dict[str, str], int]:
        """One GenerateInput per choice (prompts x n), the field names, and the number of prompts."""
        packs, names = self._packs(body)
        prompts: list[Any]
        if isinstance(body, ChatBody):
            prompts = [self._chat_prompt(body)]
            names = dict(names, text="messages", **{"response.top_n_tokens": "top_logprobs"})
            top_n = (body.top_logprobs or 0) if body.logprobs else 0
            if body.top_logprobs and not body.logprobs:
                raise InvalidRequest("top_logprobs", "needs logprobs: true")
            want_lp = body.logprobs
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            if body.max_completion_tokens is not None:
                names["stopping.max_new_tokens"] = "max_completion_tokens"
        else:
            if body.echo:
                raise InvalidRequest("echo", "not supported by sensepack")
            if body.suffix:
                raise InvalidRequest("suffix", "not supported by sensepack")
            if body.best_of is not None and body.best_of != body.n:
                raise InvalidRequest("best_of", "only best_of == n (or unset) is supported")
            p = body.prompt
            if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(x, int) for x in p)):
                prompts = [p]
            else:
                prompts = list(p)
            if not prompts:
                raise InvalidRequest("prompt", "empty prompt list")
            top_n = body.logprobs or 0
            want_lp = body.logprobs is not None
            max_tokens = body.max_tokens
        if len(prompts) * body.n > self.cfg.http.max_choices:
            raise InvalidRequest("n", f"{len(prompts)} prompt(s) x n={body.n} completions, limit "
                                      f"http.max_choices={self.cfg.http.max_choices}")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        bias = {}
        for k, v in (body.logit_bias or {}).items():
            try:
                bias[int(k)] = v
            except ValueError:
                raise InvalidRequest(f"logit_bias[{k}]", "keys must be token ids") from None
        temperature = 1.0 if body.temperature is None else body.temperature
        ab_key = body.ab_key or body.user or rid
        if len(ab_key) > MAX_REQUEST_ID:
            raise InvalidRequest("ab_key" if body.ab_key else "user", f"longer than {MAX_REQUEST_ID} characters")
        out = []
        for pi, prompt in enumerate(prompts):
            for j in range(body.n):
                seed = None if body.seed is None else body.seed + j      # n samples, n streams
                out.append(GenerateInput(
                    request_id=f"{rid}-{pi * body.n + j}" if len(prompts) * body.n > 1 else rid,
                    text=prompt if isinstance(prompt, str) else None,
                    prompt_ids=list(prompt) if not isinstance(prompt, str) else None,
                    greedy=temperature == 0, temperature=temperature, top_k=body.top_k,
                    top_p=1.0 if body.top_p is None else body.top_p, seed=seed,
                    max_new_tokens=max_tokens or 0, min_new_tokens=body.min_tokens, stop_sequences=stops,
                    include_stop_sequence=body.include_stop_str_in_output, ignore_eos=body.ignore_eos,
                    stop_token_ids=list(body.stop_token_ids or []), want_tokens=True, want_logprobs=want_lp,
                    top_n=top_n, repetition_penalty=body.repetition_penalty,
                    presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                    min_p=body.min_p, logit_bias=bias, packs=packs, base_only=body.base_only, ab_key=ab_key))
        if max_tokens == 0:
            raise InvalidRequest(names["stopping.max_new_tokens"], "must be >= 1")
        return out, names, len(prompts)

    def _chat_prompt(self, body: ChatBody) -> str:
        msgs = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) or m.content is None \
                else "".join(p.text for p in m.content)
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        kwargs = {"chat_template": self.chat_template} if self.chat_template is not None else {}
        if self.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("messages", "the served tokenizer has no chat template (set http.chat_template)")
        try:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                      add_generation_prompt=body.add_generation_prompt, **kwargs)
        except Exception as e:  # noqa: BLE001 - a template that fails on these messages: the request's fault
            raise InvalidRequest("messages", f"the chat template failed: {type(e).__name__}: {e}") from None
        if not text:
            raise InvalidRequest("messages", "the chat template rendered no text")
        return text

    # ---- the request path
    async def _handle(self, request, method: str):
        denied = self._auth(request, method)
        if denied is not None:
            return denied
        rid = request.headers.get("x-request-id") or f"{'chatcmpl' if method == 'chat.completions' else 'cmpl'}-" \
                                                      f"{uuid.uuid4().hex}"
        try:
            raw = await self._json(request)
            body = _parse_body(ChatBody if method == "chat.completions" else CompletionBody, raw)
            if len(rid) > MAX_REQUEST_ID:
                raise InvalidRequest("x-request-id", f"longer than {MAX_REQUEST_ID} characters")
            # admission may wait (a pack load with load_on_request): off the event loop, on our own threads
            gens = await asyncio.get_running_loop().run_in_executor(self._pool, self._admit, body, rid)
        except ServeError as e:
            return self._error(e, method)
        except Exception as e:  # noqa: BLE001 - a server fault: 500, counted, logged
            log.exception("request failed", extra={"event": "internal_error", "method": method})
            return self._error(InternalError("", f"internal error: {type(e).__name__}: {e}"), method)
        run = _Run(self, body, method, rid, gens, asyncio.get_running_loop())
        if body.stream:
            return StreamingResponse(run.sse(request), media_type="text/event-stream",
                                     headers={"x-request-id": rid, "cache-control": "no-cache"})
        try:
            out = await run.collect(request)
        except ServeError as e:
            return self._error(e, method)
        self._count(method, "OK")
        return JSONResponse(out, headers={"x-request-id": rid})

    async def _json(self, request) -> Any:
        """The body as JSON, read up to http.max_body_bytes (a client cannot make the server hold more)."""
        cap = self.cfg.http.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise InvalidRequest("body", f"{declared} bytes, limit http.max_body_bytes={cap}")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > cap:
                raise InvalidRequest("body", f"more than http.max_body_bytes={cap} bytes")
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidRequest("body", f"not valid JSON: {e}") from None

    def _admit(self, body: AnyBody, rid: str) -> list[tuple[int, Generation]]:
        """Validate every choice first (nothing is admitted for a bad request), then admit them; a
        failure releases the ones already admitted."""
        inputs, names, _ = self._inputs(body, rid)
        lim = self.cfg.limits
        reqs = [validate_generation(g, self.tokenizer, lim, self.context_len, self.vocab, names) for g in inputs]
        gens: list[tuple[int, Generation]] = []
        try:
            for i, req in enumerate(reqs):
                gens.append((i, self.service.generate(req, None, frontend=HTTP)))
        except BaseException:
            for _, g in gens:
                g.cancel(eng.CANCELLED)
            raise
        return gens


class _Run:
    """One admitted HTTP request: its generations' events, fanned in to the event loop."""

    def __init__(self, fe: HttpFrontend, body: AnyBody, method: str, rid: str, gens: list[tuple[int, Generation]],
                 loop: asyncio.AbstractEventLoop):
        self.fe, self.body, self.method, self.rid, self.gens = fe, body, method, rid, gens
        self.chat = method == "chat.completions"
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished: set[int] = set()
        self.gone = threading.Event()
        self._checked = time.monotonic()
        for i, g in gens:
            threading.Thread(target=self._forward, args=(i, g, loop), name="sensepack-http-events",
                             daemon=True).start()

    def _forward(self, i: int, g: Generation, loop) -> None:
        for ev in g.events(lambda: not self.gone.is_set()):
            loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))

    def cancel_all(self) -> None:
        self.gone.set()
        for i, g in self.gens:
            if i not in self.finished:
                g.cancel(eng.CANCELLED)

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
            except asyncio.TimeoutError:
                continue

    # ---- pieces
    def _token_text(self, tid: int) -> str:
        return f"token_id:{tid}" if self.body.return_tokens_as_token_ids else self.fe.service.token_text(tid)

    def _sensepack(self, g: Generation) -> dict:
        out: dict[str, Any] = {"request_id": g.req.request_id,
               "packs": [{"ref": p.ref, "name": p.name, "version": p.version, "beta": p.beta, "arm": p.arm}
                         for p in g.packs]}
        if g.seed is not None:
            out["seed"] = g.seed
        return out

    def _logprobs(self, evs: list[eng.TokenEvent], offset: int = 0):
        """OpenAI's logprobs object for these tokens (chat: `content` entries; completions: parallel lists)."""
        if self.chat:
            content = []
            for ev in evs:
                t = self._token_text(ev.token_id)
                content.append({"token": t, "logprob": ev.logprob, "bytes": list(t.encode()),
                                "top_logprobs": [{"token": self._token_text(i), "logprob": lp,
                                                  "bytes": list(self._token_text(i).encode())} for i, lp in ev.top]})
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

    @property
    def _want_logprobs(self) -> bool:
        return bool(self.body.logprobs) if self.chat else self.body.logprobs is not None

    def _usage(self, n_completion: int) -> dict:
        seen, prompt = set(), 0
        for _, g in self.gens:      # each prompt counted once, as OpenAI does with n > 1
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
            c: dict[str, Any] = {"index": i, "finish_reason": _FINISH.get(ev.reason, "stop"),
                                 "stop_reason": ev.stop_sequence or None, "sensepack": self._sensepack(g)}
            if self.chat:
                c["message"] = {"role": "assistant", "content": ev.text}
            else:
                c["text"] = ev.text
            c["logprobs"] = self._logprobs(tokens[i]) if self._want_logprobs else None
            choices.append(c)
        g0 = self.gens[0][1]
        return {"id": self.rid, "object": self._object(False), "created": self.created, "model": self.body.model,
                "choices": choices, "usage": self._usage(completion), "sensepack": self._sensepack(g0)}

    # ---- streaming
    def _chunk(self, i: int, text: str, evs: list[eng.TokenEvent], finish: str | None, first: bool) -> dict:
        c: dict[str, Any] = {"index": i, "finish_reason": finish}
        if self.chat:
            c["delta"] = ({"role": "assistant", "content": text} if first else {"content": text})
        else:
            c["text"] = text
        c["logprobs"] = self._logprobs(evs) if self._want_logprobs and evs else None
        out = {"id": self.rid, "object": self._object(True), "created": self.created, "model": self.body.model,
               "choices": [c]}
        if first:
            out["sensepack"] = self._sensepack(dict(self.gens)[i])
        return out

    async def sse(self, request):
        fe, method = self.fe, self.method
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
                    fe._count(method, st.grpc)
                    yield _sse({"error": {"message": err.message, "type": st.openai_type, "param": err.field or None,
                                          "code": st.grpc}})
                    yield "data: [DONE]\n\n"
                    return
                evs = [ev.last] if ev.last is not None else []
                completion += len(evs)
                yield _sse(self._chunk(i, ev.text_delta, evs, _FINISH.get(ev.reason, "stop"), first))
            if opts is not None and opts.include_usage:
                yield _sse({"id": self.rid, "object": self._object(True), "created": self.created,
                            "model": self.body.model, "choices": [], "usage": self._usage(completion)})
            yield "data: [DONE]\n\n"
            fe._count(method, "OK")
        except Cancelled:
            fe._count(method, "CANCELLED")
        finally:
            if len(self.finished) < len(self.gens):      # the client went away mid-stream: free the slots now
                if not self.gone.is_set():
                    fe._count(method, "CANCELLED")
                self.cancel_all()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
