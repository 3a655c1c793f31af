"""The OpenAI-compatible HTTP front-end: /v1/completions, /v1/chat/completions (SSE streaming),
/v1/models, /health; FastAPI on uvicorn, in the server's process, over the same
serve.service.GenerationService (engine, pack manager) as gRPC.

Each request body is validated into OpenAI's fields, mapped onto serve.params.GenerateInput and validated
by the same `validate_generation` as gRPC, with OpenAI's field names in the errors. As vLLM's server,
fields that do not change generation (``store``, ``metadata``, ``service_tier``, unknown ones) are
accepted and ignored (logged at debug); fields that would change it and are not supported (``tools``
with a tool_choice other than "none", ``suffix``, ``guided_*``, ...) are refused, naming them. Defaults
where the API leaves them to the server are vLLM's: special tokens are skipped in the text, an unset
``max_tokens`` is 16 on completions and "to EOS or the context" on chat (within limits.max_new_tokens).
``echo`` and ``prompt_logprobs`` score the prompt under the served distribution (the packs', as Score).

Packs: `packs` / `base_only` in the body (the openai client's
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
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from serve import scheduler as sched
from serve.errors import (
    Cancelled,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    PackNotFound,
    RequestTimeout,
    ServeError,
    status_of,
)
from serve.http.bodies import (
    COMPLETION_MAX_TOKENS,
    MAX_LISTED,
    OPENAI_FIELDS,
    AnyBody,
    ChatBody,
    CommonBody,
    CompletionBody,
    parse_body,
    parse_json,
)
from serve.http.conn import BODY_TIMEOUT, DISCONNECT, guarded_protocol
from serve.http.responses import Prompt, PromptOnly, Reply
from serve.metrics import HTTP, Metrics
from serve.params import (
    MAX_REQUEST_ID,
    GenerateInput,
    parse_pack_ref,
    validate_generation,
)
from serve.sampling_params import MAX_SEED, SamplingParams
from serve.service import GenerationService
from serve.structured import ResponseFormat as Format
from serve.structured import parse_response_format
from serve.tenants import Tenant, Tenants

log = logging.getLogger("sensepack.http")


# ------------------------------------------------------------------ the front-end
class HttpFrontend:
    def __init__(
        self,
        service: GenerationService,
        packs,
        config,
        tokenizer,
        vocab,
        context_len: int,
        metrics: Metrics,
        model_name: str,
        tenants: Tenants,
    ):
        self.service, self.packs, self.cfg = service, packs, config
        self.tenants = tenants
        self.tokenizer, self.vocab, self.context_len = tokenizer, vocab, context_len
        self.metrics, self.model_name = metrics, model_name
        self.chat_template = self._load_template(config.http.chat_template)
        self.ready = False
        lim = config.limits
        self._pool = ThreadPoolExecutor(
            max_workers=lim.max_running + lim.max_waiting + 16, thread_name_prefix="sensepack-http-admit"
        )
        self.port: int | None = None
        self._server: Any = None  # uvicorn.Server once started
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
    def start(self) -> HttpFrontend:
        import uvicorn

        h = self.cfg.http
        tls = self.cfg.tls  # the gRPC listener's certificate (and client CA: mTLS) serve HTTPS too
        ssl: dict[str, Any] = {}
        if tls.enabled:
            import ssl as _ssl

            ssl = {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
            if tls.client_ca_file:
                ssl.update(ssl_ca_certs=str(tls.client_ca_file), ssl_cert_reqs=_ssl.CERT_REQUIRED)
        cuts = self.metrics.http_cuts
        config = uvicorn.Config(
            self.app,
            host=h.host,
            port=h.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
            timeout_keep_alive=h.keep_alive_timeout_s,
            http=guarded_protocol(h.header_timeout_s, h.max_connections, lambda why: cuts.labels(why).inc()),
            lifespan="off",
            **ssl,
        )
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
        app = FastAPI(
            title="sensepack",
            summary="OpenAI-compatible API of a logit-difference ensemble server",
            docs_url="/docs",
            redoc_url=None,
            openapi_url="/openapi.json",
        )

        @app.exception_handler(HTTPException)
        async def _http_error(request: Request, exc: HTTPException):
            return JSONResponse(
                {
                    "error": {
                        "message": str(exc.detail),
                        "type": "invalid_request_error",
                        "param": None,
                        "code": exc.status_code,
                    }
                },
                status_code=exc.status_code,
            )

        @app.get("/health")
        async def health():
            return JSONResponse(
                {"status": "ok" if self.ready else "not serving"}, status_code=200 if self.ready else 503
            )

        @app.get("/v1/models")
        async def models(request: Request):
            tenant, denied = self._auth(request, "models")
            if denied is not None:
                return denied
            self._count("models", "OK")
            return JSONResponse({"object": "list", "data": self._model_list(tenant)})

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str, request: Request):
            tenant, denied = self._auth(request, "models")
            if denied is not None:
                return denied
            for m in self._model_list(tenant):
                if m["id"] == model_id:
                    self._count("models", "OK")
                    return JSONResponse(m)
            return self._error(self._model_not_found(model_id, tenant), "models")

        @app.post("/v1/completions", openapi_extra=_request_body("CompletionBody"))
        async def completions(request: Request):
            return await self._handle(request, "completions")

        @app.post("/v1/chat/completions", openapi_extra=_request_body("ChatBody"))
        async def chat_completions(request: Request):
            return await self._handle(request, "chat.completions")

        app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
        return app

    # ---- helpers
    def _count(self, method: str, status: str) -> None:
        self.metrics.requests.labels(method, status, HTTP).inc()

    def _error(self, err: ServeError, method: str):
        st = status_of(err)
        self._count(method, st.grpc)
        code = getattr(err, "openai_code", st.grpc)
        return JSONResponse(
            {"error": {"message": err.message, "type": st.openai_type, "param": err.field or None, "code": code}},
            status_code=st.http,
            headers={"connection": "close"} if isinstance(err, RequestTimeout) else None,
        )

    def _auth(self, request, method: str) -> tuple[Tenant | None, JSONResponse | None]:
        """(the caller's tenant, None) for an accepted key (tenant None: an open key); (None, the 401/403
        response) otherwise."""
        try:
            return self.tenants.identify(request.headers.get("authorization")), None
        except ServeError as e:
            return None, self._error(e, method)

    def _model_list(self, tenant: Tenant | None) -> list[dict]:
        """The large model and the routed packs the caller may see (a tenant: its own packs only)."""
        now = int(time.time())
        out = [{"id": self.model_name, "object": "model", "created": now, "owned_by": "sensepack"}]
        for route, r in sorted(self.packs.routes().items()):
            if r is None or (tenant is not None and not tenant.permits(r.name)):
                continue
            out.append(
                {
                    "id": route,
                    "object": "model",
                    "created": now,
                    "owned_by": "sensepack",
                    "root": self.model_name,
                    "parent": self.model_name,
                    "sensepack": {"name": r.name, "version": r.version, "beta": r.calibrated_beta},
                }
            )
        return out

    # ---- request -> GenerateInput
    def _packs(self, body: CommonBody, tenant: Tenant | None) -> tuple[list[tuple[str, float | None]], dict[str, str]]:
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
                raise self._model_not_found(body.model, tenant) from None
        if body.packs:
            raise InvalidRequest("packs", f"the model name {body.model!r} already names packs; send one of the two")
        if body.base_only:
            raise InvalidRequest("base_only", f"the model name {body.model!r} names packs")
        names["packs"] = "model"
        return [(r, None) for r in refs], names

    def _model_not_found(self, model: str, tenant: Tenant | None) -> ModelNotFound:
        """OpenAI's 404 for a model that is not served, listing what is (the packs the caller may see)."""
        ids = [m["id"] for m in self._model_list(tenant)]
        shown = ", ".join(ids[:MAX_LISTED]) + (f" and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else "")
        return ModelNotFound(
            "model",
            f"The model `{model}` does not exist. Served: {shown} (GET /v1/models; packs as model names: "
            f"`name`, `name@alias`, comma-separated)",
        )

    def _inputs(
        self, body: AnyBody, rid: str, tenant: Tenant | None = None
    ) -> tuple[list[GenerateInput], dict[str, str], int]:
        """One GenerateInput per choice (prompts x n), the field names, and the number of prompts."""
        packs, names = self._packs(body, tenant)
        until_context = False
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
            until_context = max_tokens is None  # OpenAI / vLLM: to EOS or the context
        else:
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
            if max_tokens is None:  # the server's default: never above the server's own limit
                max_tokens = min(COMPLETION_MAX_TOKENS, self.cfg.limits.max_new_tokens)
            lim = self.cfg.limits.max_top_n_tokens
            if body.prompt_logprobs is not None and body.prompt_logprobs > lim:
                raise InvalidRequest("prompt_logprobs", f"must lie in [0, {lim}], got {body.prompt_logprobs}")
            if max_tokens == 0 and body.echo:
                max_tokens = 1  # validated as one token; nothing is generated (_admit)
        if len(prompts) * body.n > self.cfg.http.max_choices:
            raise InvalidRequest(
                "n",
                f"{len(prompts)} prompt(s) x n={body.n} completions, limit "
                f"http.max_choices={self.cfg.http.max_choices}",
            )
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        bias = {}
        for k, v in (body.logit_bias or {}).items():
            try:
                bias[int(k)] = v
            except ValueError:
                raise InvalidRequest(f"logit_bias[{k}]", "keys must be token ids") from None
        temperature = 1.0 if body.temperature is None else body.temperature
        fmt = self._response_format(body, names)
        ab_key = body.ab_key or body.user or rid
        if len(ab_key) > MAX_REQUEST_ID:
            raise InvalidRequest("ab_key" if body.ab_key else "user", f"longer than {MAX_REQUEST_ID} characters")
        out = []
        for pi, prompt in enumerate(prompts):
            for j in range(body.n):
                # n samples, n streams: seed + j, wrapping within the uint64 range (validated below)
                seed = body.seed
                if seed is not None and 0 <= seed <= MAX_SEED:
                    seed = (seed + j) % (MAX_SEED + 1)  # out of range: left for validation to refuse
                out.append(
                    GenerateInput(
                        request_id=f"{rid}-{pi * body.n + j}" if len(prompts) * body.n > 1 else rid,
                        text=prompt if isinstance(prompt, str) else None,
                        prompt_ids=list(prompt) if not isinstance(prompt, str) else None,
                        sampling=SamplingParams(
                            greedy=temperature == 0,
                            temperature=temperature,
                            top_k=body.top_k,
                            top_p=1.0 if body.top_p is None else body.top_p,
                            seed=seed,
                            max_new_tokens=max_tokens or 0,
                            until_context=until_context,
                            min_new_tokens=body.min_tokens,
                            stop_sequences=stops,
                            include_stop_sequence=body.include_stop_str_in_output,
                            ignore_eos=body.ignore_eos,
                            stop_token_ids=list(body.stop_token_ids or []),
                            want_tokens=True,
                            want_logprobs=want_lp,
                            top_n=top_n,
                            repetition_penalty=body.repetition_penalty,
                            presence_penalty=body.presence_penalty,
                            frequency_penalty=body.frequency_penalty,
                            min_p=body.min_p,
                            logit_bias=bias,
                            skip_special_tokens=body.skip_special_tokens,
                            response_format=fmt,
                        ),
                        packs=packs,
                        base_only=body.base_only,
                        ab_key=ab_key,
                    )
                )
        if max_tokens == 0:
            raise InvalidRequest(names["stopping.max_new_tokens"], "must be >= 1")
        return out, names, len(prompts)

    @staticmethod
    def _response_format(body: CommonBody, names: dict[str, str]) -> Format | None:
        """OpenAI's response_format, or vLLM's guided_json (a schema), as one serve.structured.ResponseFormat."""
        guided = (body.model_extra or {}).get("guided_json")
        rf = body.response_format
        if guided is not None:
            if rf is not None and rf.type != "text":
                raise InvalidRequest("guided_json", "response_format already constrains the output; send one")
            if isinstance(guided, str):
                try:
                    guided = json.loads(guided)
                except json.JSONDecodeError as e:
                    raise InvalidRequest("guided_json", f"not valid JSON: {e}") from None
            names["response_format"] = "guided_json"
            return parse_response_format("json_schema", guided, "guided_json", "guided_json")
        if rf is None:
            return None
        names["response_format"] = "response_format.json_schema.schema"
        if rf.type == "json_schema" and rf.json_schema is None:
            raise InvalidRequest("response_format.json_schema", "required with type json_schema")
        schema = rf.json_schema.schema_ if rf.json_schema is not None else None
        return parse_response_format(rf.type, schema, "response_format.type", "response_format.json_schema.schema")

    def _chat_prompt(self, body: ChatBody) -> str:
        msgs = []
        for m in body.messages:
            content = (
                m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
            )
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        kwargs = {"chat_template": self.chat_template} if self.chat_template is not None else {}
        if self.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("messages", "the served tokenizer has no chat template (set http.chat_template)")
        try:
            text = self.tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=body.add_generation_prompt, **kwargs
            )
        except Exception as e:  # noqa: BLE001 - a template that fails on these messages: the request's fault
            raise InvalidRequest("messages", f"the chat template failed: {type(e).__name__}: {e}") from None
        if not text:
            raise InvalidRequest("messages", "the chat template rendered no text")
        return text

    # ---- the request path
    async def _handle(self, request, method: str):
        tenant, denied = self._auth(request, method)
        if denied is not None:
            return denied
        rid = (
            request.headers.get("x-request-id")
            or f"{'chatcmpl' if method == 'chat.completions' else 'cmpl'}-{uuid.uuid4().hex}"
        )
        body: AnyBody | None = None
        try:
            raw = await self._json(request)
            body = parse_body(ChatBody if method == "chat.completions" else CompletionBody, raw)
            if len(rid) > MAX_REQUEST_ID:
                raise InvalidRequest("x-request-id", f"longer than {MAX_REQUEST_ID} characters")
            # admission may wait (a pack load with load_on_request): off the event loop, on our own threads
            gens, prompts = await asyncio.get_running_loop().run_in_executor(self._pool, self._admit, body, rid, tenant)
        except PackNotFound as e:
            if body is not None and body.model != self.model_name and e.field.startswith("model"):
                e = self._model_not_found(body.model, tenant)  # a model name that names no pack: not served
            return self._error(e, method)
        except ServeError as e:
            return self._error(e, method)
        except ClientDisconnect:  # the client hung up mid-body: its doing, not a server fault
            self.metrics.http_cuts.labels(DISCONNECT).inc()
            log.info("client disconnected before its body was read", extra={"event": "http_cut", "method": method})
            return self._error(Cancelled("body", "client disconnected"), method)
        except Exception as e:  # a server fault: 500, counted, logged
            log.exception("request failed", extra={"event": "internal_error", "method": method})
            return self._error(InternalError("", f"internal error: {type(e).__name__}: {e}"), method)
        run = Reply(self.service, self._count, body, method, rid, gens, prompts, asyncio.get_running_loop())
        if body.stream:
            return StreamingResponse(
                run.sse(request),
                media_type="text/event-stream",
                headers={"x-request-id": rid, "cache-control": "no-cache"},
            )
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
        limit = self.cfg.http.body_timeout_s
        try:
            async with asyncio.timeout(limit):
                async for chunk in request.stream():
                    data += chunk
                    if len(data) > cap:
                        raise InvalidRequest("body", f"more than http.max_body_bytes={cap} bytes")
        except TimeoutError:
            self.metrics.http_cuts.labels(BODY_TIMEOUT).inc()
            log.info("request body too slow", extra={"event": "http_cut"})
            raise RequestTimeout("body", f"not received within http.body_timeout_s={limit:g} s") from None
        # parsing and checking a body of up to max_body_bytes is CPU work: off the event loop
        return await asyncio.get_running_loop().run_in_executor(self._pool, parse_json, bytes(data))

    def _admit(
        self, body: AnyBody, rid: str, tenant: Tenant | None = None
    ) -> tuple[list[tuple[int, Any]], dict[int, Prompt]]:
        """Validate every choice first (nothing is admitted for a bad request), then admit them; a
        failure releases the ones already admitted. Completions with echo / prompt_logprobs also get their
        prompts scored (once per prompt) under the choice's pinned packs; with max_tokens 0 and echo,
        nothing is generated."""
        inputs, names, _ = self._inputs(body, rid, tenant)
        lim = self.cfg.limits
        reqs = [validate_generation(g, self.tokenizer, lim, self.context_len, self.vocab, names) for g in inputs]
        echo = isinstance(body, CompletionBody) and body.echo
        top_n = None
        if isinstance(body, CompletionBody) and (
            body.prompt_logprobs is not None or (echo and body.logprobs is not None)
        ):
            top_n = max(body.logprobs or 0, body.prompt_logprobs or 0)
        gens: list[tuple[int, Any]] = []
        prompts: dict[int, Prompt] = {}
        try:
            if echo and body.max_tokens == 0:
                for i, req in enumerate(reqs):
                    scores, used = self.service.score_prompt(
                        req, None, top_n, score=top_n is not None, frontend=HTTP, tenant=tenant
                    )
                    gens.append((i, PromptOnly(req, used)))
                    prompts[i] = Prompt(self._prompt_text(inputs[i], req), req.prompt_ids, scores)
                return gens, prompts
            for i, req in enumerate(reqs):
                gens.append((i, self.service.generate(req, None, frontend=HTTP, tenant=tenant)))
            if echo or top_n is not None:
                scored: dict[tuple[int, ...], Any] = {}
                for i, g in gens:
                    key = tuple(g.req.prompt_ids)
                    if top_n is not None and key not in scored:
                        scored[key] = g.prompt_logprobs(None, top_n)
                    prompts[i] = Prompt(self._prompt_text(inputs[i], g.req), g.req.prompt_ids, scored.get(key))
        except BaseException:
            for _, g in gens:
                g.cancel(sched.CANCELLED)
            raise
        return gens, prompts

    def _prompt_text(self, g: GenerateInput, req) -> str:
        if g.text is not None:
            return g.text
        return self.tokenizer.decode(req.prompt_ids, skip_special_tokens=req.sampling.skip_special_tokens)


def _request_body(model: str) -> dict:
    ref = {"$ref": f"#/components/schemas/{model}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema of the routes, with the request bodies (the routes read raw requests, to bound and
    validate them themselves) added as components. Built once."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi
        from pydantic.json_schema import models_json_schema

        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        _, defs = models_json_schema(
            [(CompletionBody, "validation"), (ChatBody, "validation")], ref_template="#/components/schemas/{model}"
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = schema
    return app.openapi_schema
