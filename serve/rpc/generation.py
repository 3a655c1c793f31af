"""GenerationService over gRPC: proto in, a validated request through serve.service, proto out."""

from __future__ import annotations

import logging
import threading

import grpc

from sensepack_proto import pb, pb_grpc
from serve import engine as eng
from serve import scheduler as sched
from serve.errors import ServeError
from serve.params import parse_generate, parse_score
from serve.rpc.auth import caller_header
from serve.rpc.common import ServerParts, Tracked, check_decoded, deadline_of, grpc_code, time_left
from serve.service import GenerationService, PackUsage, ended_reason, finish_error, reason_error
from serve.tenants import Tenant

log = logging.getLogger("sensepack.server")

STOP_REASONS = {
    sched.MAX_TOKENS: pb.MAX_TOKENS,
    sched.EOS_TOKEN: pb.EOS_TOKEN,
    sched.STOP_SEQUENCE: pb.STOP_SEQUENCE,
    sched.CANCELLED: pb.CANCELLED,
    sched.TIME_LIMIT: pb.TIME_LIMIT,
    sched.ERROR: pb.ERROR,
    sched.REFUSED: pb.ERROR,
    sched.SHUTDOWN: pb.CANCELLED,
    sched.STOP_TOKEN: pb.STOP_TOKEN,
    sched.UNAVAILABLE: pb.ERROR,
}


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """gRPC wire format over serve.service: proto in, validated request through the service, proto out;
    domain errors become status codes through serve.errors."""

    def __init__(self, srv: ServerParts):
        self.srv = srv
        self.service: GenerationService = srv.service

    # ---- helpers
    @staticmethod
    def _pack_used(packs: list[PackUsage]) -> list:
        return [pb.PackUsed(ref=p.ref, name=p.name, version=p.version, beta=p.beta, arm=p.arm) for p in packs]

    def _token_info(self, ev: eng.TokenEvent) -> pb.TokenInfo:
        text = self.service.token_text
        info = pb.TokenInfo(id=ev.token_id, text=text(ev.token_id))
        if ev.logprob is not None:
            info.logprob = ev.logprob
        for i, lp in ev.top:
            info.top_tokens.add(id=i, text=text(i), logprob=lp)
        return info

    @staticmethod
    def _fail(context, tracked, err: ServeError):
        code = grpc_code(err)
        tracked.record(code)
        context.abort(code, err.message)

    @staticmethod
    def _internal(context, tracked, err: Exception):
        log.exception("request failed", extra={"event": "internal_error", "method": tracked.method})
        tracked.record(grpc.StatusCode.INTERNAL)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}")

    def _tenant(self, context) -> Tenant | None:
        """The caller's tenant (None: an open key); the interceptor has already refused a bad key."""
        return self.srv.tenants.identify(caller_header(context.invocation_metadata()))

    # ---- RPCs
    def _start(self, request, context, tracked):
        """Admit the request; the response head every Generate / GenerateStream reply starts with."""
        s = self.srv
        try:
            req = parse_generate(request, s.tokenizer, s.cfg.limits, s.context_len, s.vocab)
            gen = self.service.generate(req, deadline_of(context), tenant=self._tenant(context))
        except ServeError as e:
            self._fail(context, tracked, e)
        except Exception as e:  # noqa: BLE001 - reported as INTERNAL, counted, logged
            self._internal(context, tracked, e)
        context.add_callback(gen.cancel)
        head = pb.GenerateResponse(request_id=req.request_id, input_token_count=len(req.prompt_ids))
        if req.sampling.want_input_tokens:
            head.input_token_ids.extend(req.prompt_ids)
        if req.sampling.want_prompt_logprobs and len(req.prompt_ids) > 1:
            try:
                head.prompt_logprobs.extend(gen.prompt_logprobs(time_left(context)).logprobs)
            except ServeError as e:
                self._fail(context, tracked, e)
        head.packs.extend(self._pack_used(gen.packs))
        if gen.seed is not None:
            head.seed = gen.seed
        return req, gen, head

    def _abort_if_failed(self, context, tracked, ev: eng.FinishEvent) -> None:
        err = finish_error(ev)
        if err is not None:
            self._fail(context, tracked, err)

    def Generate(self, request, context):
        tracked = Tracked(self.srv.metrics, "Generate")
        check_decoded(request, context, tracked)
        req, gen, resp = self._start(request, context, tracked)
        for ev in gen.events(context.is_active):
            if isinstance(ev, eng.TokenEvent):
                if req.sampling.want_tokens:
                    resp.tokens.append(self._token_info(ev))
                continue
            self._abort_if_failed(context, tracked, ev)
            if ev.last is not None and req.sampling.want_tokens:
                resp.tokens.append(self._token_info(ev.last))
            resp.text = ev.text
            resp.generated_token_count = len(ev.output_ids)
            resp.stop_reason = STOP_REASONS[ev.reason]
            resp.stop_sequence = ev.stop_sequence
        tracked.record(grpc.StatusCode.OK)
        return resp

    def GenerateStream(self, request, context):
        tracked = Tracked(self.srv.metrics, "GenerateStream")
        check_decoded(request, context, tracked)
        req, gen, first = self._start(request, context, tracked)
        yield first
        try:
            for ev in gen.events(context.is_active):
                if isinstance(ev, eng.TokenEvent):
                    msg = pb.GenerateResponse(
                        request_id=req.request_id, text=ev.text_delta, generated_token_count=ev.generated
                    )
                    if req.sampling.want_tokens:
                        msg.tokens.append(self._token_info(ev))
                    yield msg
                    continue
                self._abort_if_failed(context, tracked, ev)
                tracked.record(grpc.StatusCode.OK)
                msg = pb.GenerateResponse(
                    request_id=req.request_id,
                    text=ev.text_delta,
                    generated_token_count=len(ev.output_ids),
                    stop_reason=STOP_REASONS[ev.reason],
                    stop_sequence=ev.stop_sequence,
                )
                if ev.last is not None and req.sampling.want_tokens:
                    msg.tokens.append(self._token_info(ev.last))
                yield msg
        finally:
            if not tracked.done:  # the consumer went away (cancel / deadline): free the slot now
                reason = ended_reason(gen.seq)
                gen.cancel(reason)
                tracked.record(grpc_code(reason_error(reason)("", "")))

    def Score(self, request, context):
        s = self.srv
        tracked = Tracked(s.metrics, "Score")
        check_decoded(request, context, tracked)
        abandoned = threading.Event()
        try:
            req = parse_score(request, s.tokenizer, s.cfg.limits, s.context_len, s.vocab)
            context.add_callback(abandoned.set)
            result = self.service.score(
                req, deadline_of(context), context.is_active, abandoned, tenant=self._tenant(context)
            )
        except ServeError as e:
            self._fail(context, tracked, e)
        except Exception as e:  # noqa: BLE001 - reported as INTERNAL, counted, logged
            self._internal(context, tracked, e)
        resp = pb.ScoreResponse(request_id=req.request_id, prefix_token_count=len(req.prefix_ids))
        resp.packs.extend(self._pack_used(result.packs))
        for i, ids in enumerate(req.continuations):
            c = resp.continuations.add(token_ids=ids, tokens=[self.service.token_text(t) for t in ids])
            if req.include_base:
                v = result.base[i].double()
                c.base.token_logprobs.extend(v.tolist())
                c.base.total_logprob = float(v.sum())
            if req.packs:
                v = result.packed[i].double()
                c.packed.token_logprobs.extend(v.tolist())
                c.packed.total_logprob = float(v.sum())
        s.metrics.prompt_tokens.inc(len(req.prefix_ids) + sum(map(len, req.continuations)))
        tracked.record(grpc.StatusCode.OK)
        return resp

    def Tokenize(self, request, context):
        tracked = Tracked(self.srv.metrics, "Tokenize")
        check_decoded(request, context, tracked)
        try:
            ids = self.service.tokenize(request.text)
        except ServeError as e:
            self._fail(context, tracked, e)
        resp = pb.TokenizeResponse(token_ids=ids, token_count=len(ids))
        if request.return_tokens:
            resp.tokens.extend(self.srv.tokenizer.convert_ids_to_tokens(ids))
        tracked.record(grpc.StatusCode.OK)
        return resp

    def ModelInfo(self, request, context):
        s = self.srv
        tracked = Tracked(s.metrics, "ModelInfo")
        check_decoded(request, context, tracked)
        resp = s.model_info()
        tracked.record(grpc.StatusCode.OK)
        return resp
