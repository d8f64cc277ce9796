"""Bearer tokens, signed leases, and the server interceptor that enforces them.

A token is ``<principal>.<hex HMAC-SHA256(secret, "token" || principal)>``: the server needs no
token table, and a leaked token speaks for one principal only. Client principals are decimal
client ids; the operator principal may call ``Status`` and nothing else. Comparison is
constant-time (``hmac.compare_digest``) so the MAC cannot be guessed byte by byte from timing.

A lease (what a check-in hands out) is signed the same way under another purpose label, so an
upload proves its client was selected for that task and version even after a server restart
lost the in-memory lease table, and a client cannot forge or borrow another client's lease.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from asyncfl.errors import ConfigError, ConfigProblem
from asyncfl.service.errors import CATALOG, REASON_KEY

if TYPE_CHECKING:
    _Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]

__all__ = [
    "AuthInterceptor",
    "Lease",
    "Secret",
    "bearer_metadata",
    "principal_of",
]

_MIN_SECRET_BYTES = 32
_STATUS_METHOD = "/asyncfl.v1.FederatedLearning/Status"
# The services between roles run as separate processes (internal.proto): internal principal only.
_INTERNAL_SERVICES = ("/asyncfl.v1.CoordinatorRole/", "/asyncfl.v1.AggregatorRole/")


@dataclass(frozen=True)
class Lease:
    task_id: str
    client_id: int
    version: int
    issued_at: float
    """Unix time (seconds) of the assignment: leases must survive restarts, so wall time."""
    nonce: str


class Secret:
    """The server secret and the MACs derived from it."""

    def __init__(self, key: bytes) -> None:
        if len(key) < _MIN_SECRET_BYTES:
            raise ValueError(f"secret has {len(key)} bytes; use >= {_MIN_SECRET_BYTES}")
        self._key = key

    @classmethod
    def from_file(cls, path: str | Path) -> Secret:
        try:
            key = Path(path).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                [ConfigProblem("auth.secret_file", str(path), f"a readable file ({exc})")]
            ) from exc
        if len(key) < _MIN_SECRET_BYTES:
            raise ConfigError(
                [
                    ConfigProblem(
                        "auth.secret_file",
                        str(path),
                        f"a file of >= {_MIN_SECRET_BYTES} bytes (has {len(key)}); "
                        "e.g. `python -c 'import secrets; print(secrets.token_hex(32))' > FILE`",
                    )
                ]
            )
        return cls(key)

    def _mac(self, purpose: bytes, text: str) -> str:
        return hmac.new(self._key, purpose + b"\0" + text.encode(), hashlib.sha256).hexdigest()

    def token(self, principal: str) -> str:
        if not principal or "." in principal:
            raise ValueError(f"principal {principal!r} must be non-empty and contain no '.'")
        return f"{principal}.{self._mac(b'token', principal)}"

    def verify_token(self, token: str) -> str | None:
        """The principal ``token`` speaks for, or None if it is not valid."""
        principal, sep, mac = token.rpartition(".")
        if not sep or not principal or len(mac) != 64:
            return None
        if hmac.compare_digest(mac, self._mac(b"token", principal)):
            return principal
        return None

    def sign_lease(self, task_id: str, client_id: int, version: int, issued_at: float) -> str:
        body = f"{task_id}:{client_id}:{version}:{issued_at:.3f}:{secrets.token_hex(8)}"
        return f"{body}.{self._mac(b'lease', body)}"

    def verify_lease(self, lease_id: str) -> Lease | None:
        body, sep, mac = lease_id.rpartition(".")
        if not sep or len(mac) != 64 or not hmac.compare_digest(mac, self._mac(b"lease", body)):
            return None
        parts = body.split(":")
        if len(parts) != 5:
            return None
        try:
            return Lease(parts[0], int(parts[1]), int(parts[2]), float(parts[3]), parts[4])
        except ValueError:
            return None


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _token_of(metadata: Iterable[Any] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


def principal_of(secret: Secret, metadata: Iterable[Any] | None) -> str | None:
    token = _token_of(metadata)
    return None if token is None else secret.verify_token(token)


def _abort_handler(like: _Handler, reason: str) -> _Handler:
    entry = CATALOG[reason]

    async def abort(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        context.set_trailing_metadata(((REASON_KEY, reason),))
        await context.abort(entry.code, entry.message)

    async def abort_stream(
        _request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:  # an async generator that never yields
        context.set_trailing_metadata(((REASON_KEY, reason),))
        await context.abort(entry.code, entry.message)
        yield None  # pragma: no cover - abort raises

    if like.request_streaming and like.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream)
    if like.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if like.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream)
    return grpc.unary_unary_rpc_method_handler(abort)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without a valid token before any handler (or decoder) runs.

    ``internal_principal`` (roles in separate processes) may call the internal services and
    nothing else; nobody else may call them.
    """

    def __init__(
        self, secret: Secret, operator_principal: str, internal_principal: str | None = None
    ) -> None:
        self._secret = secret
        self._operator = operator_principal
        self._internal = internal_principal

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return handler
        principal = principal_of(self._secret, handler_call_details.invocation_metadata)
        if principal is None:
            return _abort_handler(handler, "unauthenticated")
        is_internal = handler_call_details.method.startswith(_INTERNAL_SERVICES)
        if is_internal or principal == self._internal:
            if not (is_internal and principal == self._internal):
                return _abort_handler(handler, "permission_denied")
            return _tolerant(handler)
        is_status = handler_call_details.method == _STATUS_METHOD
        is_operator = principal == self._operator
        if is_status != is_operator or not (is_operator or principal.isdigit()):
            return _abort_handler(handler, "permission_denied")
        return _tolerant(handler)


class Malformed:
    """Stands in for a request that did not parse (the handler answers malformed_message)."""


def _tolerant(handler: _Handler) -> _Handler:
    """``handler`` whose request parser returns :class:`Malformed` instead of raising, so random
    bytes get the catalog's INVALID_ARGUMENT rather than gRPC's bare UNKNOWN."""
    parse = handler.request_deserializer
    if parse is None:
        return handler

    def safe_parse(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:  # DecodeError and whatever else a hostile payload triggers
            return Malformed()

    if handler.request_streaming:
        # The upload handler checks each item's type itself (a Malformed chunk is refused).
        stream_unary: Any = handler.stream_unary
        return grpc.stream_unary_rpc_method_handler(
            stream_unary,
            request_deserializer=safe_parse,
            response_serializer=handler.response_serializer,
        )
    if handler.response_streaming:
        inner_stream: Any = handler.unary_stream  # async handlers; grpc's stubs type them sync

        async def guarded_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, Malformed):
                await _refuse(context, "malformed_message")
            async for item in inner_stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(
            guarded_stream,
            request_deserializer=safe_parse,
            response_serializer=handler.response_serializer,
        )
    inner: Any = handler.unary_unary

    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Malformed):
            await _refuse(context, "malformed_message")
        return await inner(request, context)

    return grpc.unary_unary_rpc_method_handler(
        guarded,
        request_deserializer=safe_parse,
        response_serializer=handler.response_serializer,
    )


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], reason: str) -> None:
    context.set_trailing_metadata(((REASON_KEY, reason),))
    await context.abort(CATALOG[reason].code, CATALOG[reason].message)
