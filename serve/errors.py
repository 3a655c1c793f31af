"""Domain errors of the server, and the one table that maps them to each front-end's codes.

The engine, the pack manager and request validation raise plain `ServeError` subclasses (no gRPC
or HTTP inside them). Each front-end turns them into its own status at its boundary through
`status_of` (gRPC: ``STATUS.grpc``, a `grpc.StatusCode` name; HTTP: ``STATUS.http`` and the
OpenAI error ``type``). edits_store's `PackError`s are mapped here too (`from_pack_error`), by
class, not by the store's own status strings.

A message starts with the field it concerns (``sampling.top_p: must lie in [0, 1], got 1.5``);
`field` keeps the field alone (OpenAI's ``param``).
"""

from __future__ import annotations

from dataclasses import dataclass

from edits_store import errors as st


class ServeError(Exception):
    """A request the server refuses or cannot finish."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}" if field_name else message)
        self.field = field_name
        self.detail = message

    @property
    def message(self) -> str:
        return str(self)

    def at(self, field_name: str) -> ServeError:
        """The same error about another field (e.g. the pack manager's ``ref`` as ``packs[1].ref``)."""
        return type(self)(field_name, self.detail)


class InvalidRequest(ServeError):
    """Bad input; the message names the field."""


class PackNotFound(ServeError):
    """Unknown (or unloaded, or not resident) pack, version or alias."""


class ModelNotFound(PackNotFound):
    """The request names a model that is not served (OpenAI's ``model_not_found``)."""

    openai_code = "model_not_found"


class PackRefused(ServeError):
    """The pack exists but cannot serve here: incompatible, no β for the served model, refused by the gate."""


class Conflict(ServeError):
    """Another writer changed the same object first; retry."""


class QueueFull(ServeError):
    """Running, waiting and Score requests fill the server's request cap."""


class Unavailable(ServeError):
    """Shutting down (or the store is unavailable, or a pack left while admitting): retry later or elsewhere."""


class DeadlineExceeded(ServeError):
    """The request's deadline ended before it finished."""


class RequestTimeout(DeadlineExceeded):
    """The client did not send its request in time (HTTP 408; the connection is closed)."""


class Cancelled(ServeError):
    """The client went away (or cancelled) before the request finished."""


class Unauthenticated(ServeError):
    """No (or a malformed) credential."""


class PermissionDenied(ServeError):
    """A credential that is not accepted, or a pack signed by an untrusted key."""


class InternalError(ServeError):
    """A server fault (never the client's input)."""


@dataclass(frozen=True)
class Status:
    grpc: str  # grpc.StatusCode name
    http: int
    openai_type: str


# The one mapping: domain error -> (gRPC status, HTTP status, OpenAI error type).
STATUS: dict[type[ServeError], Status] = {
    InvalidRequest: Status("INVALID_ARGUMENT", 400, "invalid_request_error"),
    PackNotFound: Status("NOT_FOUND", 404, "not_found_error"),
    PackRefused: Status("FAILED_PRECONDITION", 409, "pack_refused_error"),
    Conflict: Status("ABORTED", 409, "conflict_error"),
    QueueFull: Status("RESOURCE_EXHAUSTED", 429, "rate_limit_error"),
    Unavailable: Status("UNAVAILABLE", 503, "service_unavailable_error"),
    DeadlineExceeded: Status("DEADLINE_EXCEEDED", 504, "timeout_error"),
    RequestTimeout: Status("DEADLINE_EXCEEDED", 408, "timeout_error"),
    Cancelled: Status("CANCELLED", 499, "cancelled_error"),
    Unauthenticated: Status("UNAUTHENTICATED", 401, "authentication_error"),
    PermissionDenied: Status("PERMISSION_DENIED", 403, "permission_error"),
    InternalError: Status("INTERNAL", 500, "internal_error"),
}
OK = Status("OK", 200, "")


def status_of(err: BaseException) -> Status:
    """The status of any exception: a ServeError's class (or its nearest mapped base), else INTERNAL."""
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return STATUS[InternalError]


def from_pack_error(err: Exception, field_name: str = "", message: str | None = None) -> ServeError:
    """An edits_store PackError as a domain error, by class: not found, refused (incompatible, no β,
    retention), untrusted signature, conflicting writer, store unavailable; any other store error
    (malformed reference, alias, pack file) is invalid input."""
    table: list[tuple[type, type[ServeError]]] = [
        (st.PackNotFoundError, PackNotFound),
        (st.IncompatiblePackError, PackRefused),
        (st.MissingBetaError, PackRefused),
        (st.RetentionError, PackRefused),
        (st.SignatureError, PermissionDenied),
        (st.ConcurrentUpdateError, Conflict),
        (st.StoreIOError, Unavailable),
    ]
    cls: type[ServeError] = InvalidRequest
    for src, dst in table:
        if isinstance(err, src):
            cls = dst
            break
    return cls(field_name, str(err) if message is None else message)
