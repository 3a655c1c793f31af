"""What the gRPC servicers share: domain errors as status codes, deadlines, per-call accounting, the
guard that refuses undecodable messages, and the view of the server they read.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import grpc

from sensepack_proto import pb
from serve.config import Config
from serve.errors import status_of
from serve.metrics import GRPC, Metrics
from serve.packs import PackManager
from serve.service import GenerationService
from serve.tenants import Tenants

log = logging.getLogger("sensepack.server")


def grpc_code(err: BaseException) -> grpc.StatusCode:
    """The gRPC status of a domain error (serve.errors.STATUS, the one mapping)."""
    return getattr(grpc.StatusCode, status_of(err).grpc)


def time_left(context) -> float | None:
    left = context.time_remaining()
    return None if left is None or left > 1e7 else max(left, 0.0)


def deadline_of(context) -> float | None:
    left = time_left(context)
    return None if left is None else time.monotonic() + left


class Tracked:
    """Records sensepack_requests_total{method,status,frontend="grpc"} exactly once per RPC."""

    def __init__(self, metrics: Metrics, method: str):
        self.metrics, self.method, self.done = metrics, method, False

    def record(self, code: grpc.StatusCode) -> None:
        if not self.done:
            self.done = True
            self.metrics.requests.labels(self.method, code.name, GRPC).inc()


class Undecodable:
    """What the decode guard hands a servicer for request bytes that are not a valid message."""

    def __init__(self, error: str):
        self.error = error


def check_decoded(request, context, tracked: Tracked) -> None:
    if isinstance(request, Undecodable):
        tracked.record(grpc.StatusCode.INVALID_ARGUMENT)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message ({request.error})")


class DecodeGuard(grpc.ServerInterceptor):
    """Undecodable request bytes (e.g. invalid UTF-8 in a string field) reach the servicer as
    `Undecodable`, which answers INVALID_ARGUMENT and counts it, instead of grpc's uncounted INTERNAL."""

    def __init__(self, services: tuple[str, ...]):
        self._prefixes = tuple(f"/{s}/" for s in services)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if (
            handler is None
            or not handler_call_details.method.startswith(self._prefixes)
            or handler.request_deserializer is None
            or not hasattr(handler, "_replace")
        ):
            return handler
        decode = handler.request_deserializer

        def guarded(data: bytes):
            try:
                return decode(data)
            except Exception as e:  # noqa: BLE001 - any decode failure is the client's
                return Undecodable(f"{type(e).__name__}: {e}")

        return handler._replace(request_deserializer=guarded)


class ServerParts(Protocol):
    """What the servicers read from the server (serve.server.ServerParts)."""

    cfg: Config
    context_len: int
    metrics: Metrics
    tokenizer: Any
    vocab: Any
    tenants: Tenants
    packs: PackManager
    monitor: Any
    store: Any
    service: GenerationService

    def model_info(self) -> pb.ModelInfoResponse: ...
