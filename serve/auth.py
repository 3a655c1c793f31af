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

from serve.errors import PermissionDenied, ServeError, Unauthenticated, status_of

log = logging.getLogger("sensepack.auth")


def _authorization(handler_call_details) -> str | None:
    """The call's `authorization` metadata value (keys are case-insensitive), or None."""
    for key, value in handler_call_details.invocation_metadata or ():
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


def check_api_key(header: str | None, keys: list[bytes]) -> ServeError | None:
    """The error for an `Authorization` header value against the accepted generation keys (None: let in).
    Every key is compared in constant time."""
    if not keys:
        return None
    if header is None:
        return Unauthenticated("authorization", "missing 'Bearer <api key>' (api.keys is set)")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return Unauthenticated("authorization", "expected 'Bearer <api key>'")
    given = token.strip().encode()
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given, k)
    return None if ok else PermissionDenied("authorization", "api key not accepted")


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Generation API keys on `service` (GenerationService); no keys: a pass-through."""

    def __init__(self, keys: list[str], service: str, on_denied=None):
        self._keys = [k.encode() for k in keys]
        self._prefix = f"/{service}/"
        self._on_denied = on_denied

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not self._keys or not method.startswith(self._prefix):
            return continuation(handler_call_details)
        header = _authorization(handler_call_details)
        err = check_api_key(header, self._keys)
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
