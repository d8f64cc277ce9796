"""The service's one error catalog: internal reason code -> gRPC status code + public message.

Every refusal the service sends goes through :data:`CATALOG`, so a client sees the same status
for the same cause whichever role found it, and the reason code travels in the trailing
metadata key ``asyncfl-reason`` for programs. The public message is fixed text: internal details
(paths, tracebacks, other clients' data) never reach the wire; the detail is logged server-side.

The reason codes of the aggregation algorithms (``Outcome.reason`` and
``UpdateRejected.reason``) are all here; ``tests/test_service_errors.py`` scans the algorithms'
source and fails when a new code is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

__all__ = ["CATALOG", "REASON_KEY", "CatalogEntry", "ServiceError", "entry_for"]

REASON_KEY = "asyncfl-reason"
"""Trailing metadata key that carries the reason code of a refusal."""


@dataclass(frozen=True)
class CatalogEntry:
    code: grpc.StatusCode
    message: str
    retry: bool = False
    """True when the same request may succeed later unchanged (the client backs off)."""


_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_PRECOND = grpc.StatusCode.FAILED_PRECONDITION

CATALOG: dict[str, CatalogEntry] = {
    # -- from the aggregation algorithms (asyncfl.algorithms, asyncfl.core.update) -----------
    "bad_dtype": CatalogEntry(_INVALID, "update must be a 1-D float32 vector"),
    "bad_shape": CatalogEntry(_INVALID, "update size does not match the model"),
    "bad_num_examples": CatalogEntry(_INVALID, "num_examples must be >= 0"),
    "bad_version": CatalogEntry(_INVALID, "base_version is not a version this server issued"),
    "not_finite": CatalogEntry(_INVALID, "update contains NaN or Inf"),
    "too_stale": CatalogEntry(_PRECOND, "update is staler than the task allows; check in again"),
    "late": CatalogEntry(_PRECOND, "the round of this update is closed; check in again"),
    "buffer_not_empty": CatalogEntry(_PRECOND, "aggregate refused: updates are buffered"),
    "round_failed": CatalogEntry(_PRECOND, "the round failed; check in again"),
    "zero_weight": CatalogEntry(_PRECOND, "the buffer had zero total weight and was dropped"),
    # -- from the secure (TEE) buffer of SecureFedBuff (asyncfl.algorithms.secure_fedbuff) ----
    "duplicate_client": CatalogEntry(_PRECOND, "this client already has an update buffered"),
    "malformed": CatalogEntry(_INVALID, "malformed secure contribution"),
    "stale_epoch": CatalogEntry(_PRECOND, "secure buffer epoch has moved on; check in again"),
    "bad_weight": CatalogEntry(_INVALID, "contribution weight out of range"),
    "duplicate": CatalogEntry(grpc.StatusCode.ALREADY_EXISTS, "contribution already received"),
    "replayed": CatalogEntry(grpc.StatusCode.ALREADY_EXISTS, "replayed message"),
    "bad_seal": CatalogEntry(_INVALID, "sealed contribution failed authentication"),
    "below_threshold": CatalogEntry(_PRECOND, "too few contributions to release a sum"),
    "mismatch": CatalogEntry(
        grpc.StatusCode.ABORTED, "secure buffer resynchronised; retry", retry=True
    ),
    # -- from the LightSecAgg buffer (asyncfl.algorithms.lightsecagg_fedbuff) -------------
    "protocol": CatalogEntry(_INVALID, "secure-aggregation protocol message refused"),
    "weight_overflow": CatalogEntry(_INVALID, "contribution weight would overflow the field"),
    "unmask_failed": CatalogEntry(
        grpc.StatusCode.ABORTED, "too few survivors to unmask the buffer; retry", retry=True
    ),
    # -- LightSecAgg in the service (asyncfl.service.lightsecagg_task) ---------------------
    "not_in_group": CatalogEntry(_PRECOND, "this client is not a member of the task's group"),
    "bad_key": CatalogEntry(_INVALID, "public key must be a valid 32-byte X25519 key"),
    "key_conflict": CatalogEntry(
        _PRECOND, "a different key is already registered for this client in this task"
    ),
    "unknown_buffer": CatalogEntry(
        _PRECOND, "no buffer awaits this share (already unmasked or discarded)"
    ),
    # -- found by the service ------------------------------------------------------------
    "unauthenticated": CatalogEntry(
        grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token"
    ),
    "permission_denied": CatalogEntry(
        grpc.StatusCode.PERMISSION_DENIED, "this principal may not call this method"
    ),
    "unknown_task": CatalogEntry(grpc.StatusCode.NOT_FOUND, "no such task"),
    "task_finished": CatalogEntry(_PRECOND, "the task has finished"),
    "bad_lease": CatalogEntry(_PRECOND, "lease is missing, forged or for another client"),
    "lease_expired": CatalogEntry(_PRECOND, "lease expired; check in again"),
    "norm_too_large": CatalogEntry(_INVALID, "update norm exceeds the task's bound"),
    "bad_encoding": CatalogEntry(
        _INVALID, "upload encoding does not match the task's secure_aggregation mode"
    ),
    "duplicate_upload": CatalogEntry(
        grpc.StatusCode.ALREADY_EXISTS, "this upload id was already accepted"
    ),
    "malformed_message": CatalogEntry(_INVALID, "malformed message"),
    "message_too_large": CatalogEntry(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "upload is larger than the model"
    ),
    "rate_limited": CatalogEntry(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "checking in too often; wait", retry=True
    ),
    "ineligible": CatalogEntry(_PRECOND, "this device is not eligible for any task"),
    "privacy_budget_spent": CatalogEntry(
        _PRECOND, "the task's privacy budget is spent; the task has finished"
    ),
    # -- roles in separate processes (asyncfl.service.roles) ------------------------------
    "aggregator_unavailable": CatalogEntry(
        grpc.StatusCode.UNAVAILABLE, "the task's aggregator is unavailable; retry later", retry=True
    ),
    "task_moved": CatalogEntry(
        grpc.StatusCode.UNAVAILABLE,
        "this server does not serve the task now; ask the selector where it is",
        retry=True,
    ),
    "internal": CatalogEntry(grpc.StatusCode.INTERNAL, "internal error; retry later", retry=True),
}


def entry_for(reason: str) -> CatalogEntry:
    """The catalog entry of ``reason``; an unknown code maps to ``internal`` (never leaks)."""
    return CATALOG.get(reason, CATALOG["internal"])


class ServiceError(Exception):
    """A refusal with a catalog reason; the server turns it into a gRPC status.

    ``detail`` is for the server log only and is never sent to the client.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in CATALOG:
            raise KeyError(f"reason {reason!r} is not in the service error catalog")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)

    @property
    def entry(self) -> CatalogEntry:
        return CATALOG[self.reason]
