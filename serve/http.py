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
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from serve import engine as eng
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
from serve.http_conn import BODY_TIMEOUT, DISCONNECT, guarded_protocol
from serve.metrics import HTTP, Metrics
from serve.params import (
    MAX_REQUEST_ID,
    GenerateInput,
    check_unicode,
    parse_pack_ref,
    validate_generation,
)
from serve.sampling_params import MAX_SEED, SamplingParams
from serve.service import GenerationService, PromptScores, finish_error
from serve.structured import ResponseFormat as Format
from serve.structured import parse_response_format
from serve.tenants import Tenant, Tenants

log = logging.getLogger("sensepack.http")

# proto field paths (serve.params) -> OpenAI's names, for error messages
OPENAI_FIELDS = {
    "request_id": "x-request-id",
    "text": "prompt",
    "token_ids.ids": "prompt",
    "input": "prompt",
    "sampling.temperature": "temperature",
    "sampling.top_k": "top_k",
    "sampling.top_p": "top_p",
    "sampling.seed": "seed",
    "stopping.max_new_tokens": "max_tokens",
    "stopping.min_new_tokens": "min_tokens",
    "stopping.stop_sequences": "stop",
    "stopping.stop_token_ids": "stop_token_ids",
    "response.top_n_tokens": "logprobs",
    "sampling.repetition_penalty": "repetition_penalty",
    "sampling.presence_penalty": "presence_penalty",
    "sampling.frequency_penalty": "frequency_penalty",
    "sampling.min_p": "min_p",
    "sampling.logit_bias": "logit_bias",
    "packs": "packs",
    "ab_key": "ab_key",
}
COMPLETION_MAX_TOKENS = 16  # an unset max_tokens on /v1/completions (OpenAI's and vLLM's default)
MAX_LISTED = 20  # served models named in a model_not_found error
_FINISH = {sched.MAX_TOKENS: "length", sched.EOS_TOKEN: "stop", sched.STOP_SEQUENCE: "stop", sched.STOP_TOKEN: "stop"}


# ------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """An OpenAI object: fields sensepack does not know are accepted and ignored (as vLLM does)."""

    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class PackSpec(_Body):
    ref: str
    beta: float | None = None


class JsonSchema(_Open):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


# Fields that would change generation and are not supported: refused by name (everything else unknown
# is ignored). `tools` / `functions` only when a tool may be called (see _refuse).
REFUSED_FIELDS = {
    "guided_regex": "guided decoding",
    "guided_choice": "guided decoding",
    "guided_grammar": "guided decoding",
    "structured_outputs": "structured outputs",
    "allowed_token_ids": "allowed_token_ids",
    "bad_words": "bad_words",
    "truncate_prompt_tokens": "prompt truncation",
    "use_beam_search": "beam search",
    "audio": "audio output",
    "prompt_embeds": "prompt embeddings",
}


class _Common(_Open):
    """Fields both endpoints share: OpenAI's, then sensepack's and vLLM's extensions (extra_body)."""

    model: str
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None  # None: 1.0 (OpenAI's default); 0: greedy
    top_p: float | None = None
    max_tokens: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None  # also the A/B key when ab_key is not given
    response_format: ResponseFormat | None = None
    # extensions
    packs: list[str | PackSpec] | None = None
    base_only: bool = False
    ab_key: str | None = None
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False
    skip_special_tokens: bool = True
    # accepted as vLLM does; the served (fast) tokenizers decode without spaces between special tokens
    # either way, as vLLM's fast detokenizer
    spaces_between_special_tokens: bool = True


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    prompt_logprobs: int | None = Field(None, ge=0)  # vLLM's: per prompt token, the token and the top n


class TextPart(_Open):
    type: Literal["text"]
    text: str


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True


AnyBody = CompletionBody | ChatBody


MAX_JSON_DEPTH = 64


def _check_json(obj: Any) -> None:
    """Every string of a request body is valid Unicode and no value nests deeper than MAX_JSON_DEPTH
    (InvalidRequest naming the path): a body's mistakes are 400s before any field is read."""
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    while stack:
        v, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(path or "body", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(v, str):
            check_unicode(v, path or "body")
        elif isinstance(v, dict):
            for k, x in v.items():
                check_unicode(k, f"{path}.{k!a}" if path else "body")
                stack.append((x, f"{path}.{k}" if path else k, depth + 1))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v))


def _parse_json(data: bytes) -> Any:
    """A request body as JSON, checked by `_check_json` (InvalidRequest naming what is wrong)."""
    try:
        obj = json.loads(data)
    except RecursionError:
        raise InvalidRequest("body", f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise InvalidRequest("body", f"not valid JSON: {e}") from None
    _check_json(obj)
    return obj


def _loc(err: Any) -> str:
    out = ""
    for part in err["loc"]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = str(part)
        elif part in ("str", "list[str]", "list[int]", "list[list[int]]", "PackSpec", "list[TextPart]"):
            continue  # pydantic's union member names are not fields
        else:
            out += f".{part}"
    return out


def _parse_body(cls: type[_Common], body: Any) -> Any:
    if not isinstance(body, dict):
        raise InvalidRequest("body", "expected a JSON object")
    try:
        parsed = cls.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = _loc(first)
        msg = "not a field of this object" if first["type"] == "extra_forbidden" else first["msg"]
        raise InvalidRequest(where or "body", msg) from None
    _refuse(parsed)
    ignored = sorted(parsed.model_extra or {})
    if ignored:
        log.debug("fields ignored", extra={"event": "ignored_fields", "fields": ignored})
    return parsed


def _refuse(body: _Common) -> None:
    """Refuse, by name, the fields that would change generation in a way sensepack does not serve."""
    extra = body.model_extra or {}
    for name, what in REFUSED_FIELDS.items():
        if extra.get(name) not in (None, False, [], {}):
            raise InvalidRequest(name, f"{what} is not supported by sensepack")
    tool_choice = extra.get("tool_choice")
    if extra.get("tools") and tool_choice not in ("none", None):
        raise InvalidRequest(
            "tools", 'tool calling is not supported by sensepack (send tool_choice: "none", or no tools)'
        )
    if tool_choice not in (None, "none", "auto"):
        raise InvalidRequest("tool_choice", 'tool calling is not supported by sensepack (only "none")')
    if extra.get("functions") and extra.get("function_call") not in ("none", None):
        raise InvalidRequest("functions", "function calling is not supported by sensepack")
    modalities = extra.get("modalities")
    if modalities is not None and (not isinstance(modalities, list) or set(modalities) - {"text"}):
        raise InvalidRequest("modalities", "only text output is supported by sensepack")
    if isinstance(body, ChatBody) and extra.get("echo"):
        raise InvalidRequest("echo", "not supported on chat completions (use /v1/completions)")
    if isinstance(body, ChatBody) and extra.get("prompt_logprobs") is not None:
        raise InvalidRequest("prompt_logprobs", "not supported on chat completions (use /v1/completions)")


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
    def _packs(self, body: _Common, tenant: Tenant | None) -> tuple[list[tuple[str, float | None]], dict[str, str]]:
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
    def _response_format(body: _Common, names: dict[str, str]) -> Format | None:
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
            body = _parse_body(ChatBody if method == "chat.completions" else CompletionBody, raw)
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
        run = _Run(self, body, method, rid, gens, prompts, asyncio.get_running_loop())
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
        return await asyncio.get_running_loop().run_in_executor(self._pool, _parse_json, bytes(data))

    def _admit(
        self, body: AnyBody, rid: str, tenant: Tenant | None = None
    ) -> tuple[list[tuple[int, Any]], dict[int, _Prompt]]:
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
        prompts: dict[int, _Prompt] = {}
        try:
            if echo and body.max_tokens == 0:
                for i, req in enumerate(reqs):
                    scores, used = self.service.score_prompt(
                        req, None, top_n, score=top_n is not None, frontend=HTTP, tenant=tenant
                    )
                    gens.append((i, _PromptOnly(req, used)))
                    prompts[i] = _Prompt(self._prompt_text(inputs[i], req), req.prompt_ids, scores)
                return gens, prompts
            for i, req in enumerate(reqs):
                gens.append((i, self.service.generate(req, None, frontend=HTTP, tenant=tenant)))
            if echo or top_n is not None:
                scored: dict[tuple[int, ...], Any] = {}
                for i, g in gens:
                    key = tuple(g.req.prompt_ids)
                    if top_n is not None and key not in scored:
                        scored[key] = g.prompt_logprobs(None, top_n)
                    prompts[i] = _Prompt(self._prompt_text(inputs[i], g.req), g.req.prompt_ids, scored.get(key))
        except BaseException:
            for _, g in gens:
                g.cancel(sched.CANCELLED)
            raise
        return gens, prompts

    def _prompt_text(self, g: GenerateInput, req) -> str:
        if g.text is not None:
            return g.text
        return self.tokenizer.decode(req.prompt_ids, skip_special_tokens=req.sampling.skip_special_tokens)


@dataclass
class _Prompt:
    """A completion choice's prompt as echo and prompt_logprobs show it (scores: None when not asked)."""

    text: str
    ids: list[int]
    scores: PromptScores | None


class _PromptOnly:
    """A choice that generates nothing (echo with max_tokens 0): it finishes at once, with its prompt."""

    def __init__(self, req, packs: list):
        self.req, self.packs, self.seed = req, packs, None

    def cancel(self, reason: str | None = None) -> None:
        pass

    def events(self, is_active=None):
        yield eng.FinishEvent(sched.MAX_TOKENS, "", "", [])


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


class _Run:
    """One admitted HTTP request: its generations' events, fanned in to the event loop."""

    def __init__(
        self,
        fe: HttpFrontend,
        body: AnyBody,
        method: str,
        rid: str,
        gens: list[tuple[int, Any]],
        prompts: dict[int, _Prompt],
        loop: asyncio.AbstractEventLoop,
    ):
        self.fe, self.body, self.method, self.rid, self.gens = fe, body, method, rid, gens
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
        return self.fe.service.token_text(tid, self.body.skip_special_tokens)

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

    def _echo_logprobs(self, p: _Prompt) -> dict:
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

    def _prompt_logprobs(self, p: _Prompt) -> list | None:
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
                "finish_reason": _FINISH.get(ev.reason, "stop"),
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
                yield _sse(self._chunk(i, ev.text_delta, evs, _FINISH.get(ev.reason, "stop"), first))
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
            fe._count(method, "OK")
        except Cancelled:
            fe._count(method, "CANCELLED")
        finally:
            if len(self.finished) < len(self.gens):  # the client went away mid-stream: free the slots now
                if not self.gone.is_set():
                    fe._count(method, "CANCELLED")
                self.cancel_all()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
