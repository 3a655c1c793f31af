"""Bearer-token auth for the admin service (a server interceptor).

Admin calls carry ``authorization: Bearer <token>``. Without the header:
UNAUTHENTICATED; with a wrong token: PERMISSION_DENIED. When no token is
configured at all the admin service refuses every call (UNAUTHENTICATED):
it is never open by accident. Other services are not affected.
"""
from __future__ import annotations

import hmac
import logging

import grpc

log = logging.getLogger("sensepack.auth")


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
        header = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key.lower() == "authorization":
                header = value
                break
        code, msg = None, None
        if self._token is None:
            code, msg = grpc.StatusCode.UNAUTHENTICATED, "admin service disabled: no admin token configured (admin.token or $SENSEPACK_ADMIN_TOKEN)"
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
