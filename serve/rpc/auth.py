"""Bearer-token auth: the admin token for the admin service, and the optional generation API keys
(`api.keys`) for the generation front-ends (gRPC GenerationService here, HTTP /v1 in serve.http).

Admin calls carry ``authorization: Bearer <token>``. Without the header:
UNAUTHENTICATED; with a wrong token: PERMISSION_DENIED. When no token is
configured at all the admin service refuses every call (UNAUTHENTICATED):
it is never open by accident. Generation API keys, when configured, follow the same rule
(none: UNAUTHENTICATED / 401, a wrong one: PERMISSION_DENIED / 403); with no key configured
generation is open. Health and reflection are never behind a key.
"""

from __future__ import annotations

import hmac
import logging

import grpc

from serve.errors import status_of
from serve.tenants import Tenants

log = logging.getLogger("sensepack.auth")


def _authorization(handler_call_details) -> str | None:
    """The call's `authorization` metadata value (keys are case-insensitive), or None."""
    return caller_header(handler_call_details.invocation_metadata)


def caller_header(metadata) -> str | None:
    """The `authorization` value of gRPC metadata (keys are case-insensitive), or None."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            return value
    return None


def _deny(code: grpc.StatusCode, message: str):
    def handler(request, context):
        context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(handler)


class AdminAuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str | None, service: str, on_denied=None):
        self._token = token.encode() if token else None
        self._prefix = f"/{service}/"
        self._on_denied = on_denied

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not method.startswith(self._prefix):
            return continuation(handler_call_details)
        header = _authorization(handler_call_details)
        code, msg = None, None
        if self._token is None:
            code, msg = (
                grpc.StatusCode.UNAUTHENTICATED,
                "admin service disabled: no admin token configured (admin.token or $SENSEPACK_ADMIN_TOKEN)",
            )
        elif header is None:
            code, msg = grpc.StatusCode.UNAUTHENTICATED, "authorization: missing 'Bearer <token>' metadata"
        else:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                code, msg = grpc.StatusCode.UNAUTHENTICATED, "authorization: expected 'Bearer <token>'"
            elif not hmac.compare_digest(token.strip().encode(), self._token):
                code, msg = grpc.StatusCode.PERMISSION_DENIED, "authorization: token not accepted"
        if code is None:
            return continuation(handler_call_details)
        log.warning("admin call denied", extra={"event": "admin_denied", "method": method, "code": code.name})
        if self._on_denied is not None:
            self._on_denied(method, code)
        return _deny(code, msg)


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Generation API keys (open and tenants', serve.tenants) on `service` (GenerationService); no keys: a
    pass-through. The servicer identifies the tenant of an accepted key itself (`caller_header`)."""

    def __init__(self, tenants: Tenants, service: str, on_denied=None):
        self._tenants = tenants
        self._prefix = f"/{service}/"
        self._on_denied = on_denied

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not method.startswith(self._prefix):
            return continuation(handler_call_details)
        header = _authorization(handler_call_details)
        err = self._tenants.check(header)
        if err is None:
            return continuation(handler_call_details)
        code = getattr(grpc.StatusCode, status_of(err).grpc)
        log.warning("generation call denied", extra={"event": "api_key_denied", "method": method, "code": code.name})
        if self._on_denied is not None:
            self._on_denied(method, code)
        handler = continuation(handler_call_details)
        if handler is not None and handler.response_streaming:

            def stream(request, context):
                context.abort(code, err.message)
                yield  # pragma: no cover - abort raises

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return _deny(code, err.message)
