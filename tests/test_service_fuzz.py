"""Hostile and malformed messages against a live server (TLS, in-process, 127.0.0.1).

Random bytes, wrong shapes and dtypes, NaN/Inf, oversized norms and messages, forged and
borrowed leases, bad tokens, replays: every one gets its catalog status, nothing crashes, and
the task's version, buffer and ledger are exactly as before.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from asyncfl.core.configload import build_config
from asyncfl.service.auth import Secret, bearer_metadata
from asyncfl.service.config import ServiceConfig
from asyncfl.service.errors import REASON_KEY
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
from asyncfl.service.proto.asyncfl.v1 import service_pb2_grpc as pb_grpc
from asyncfl.service.server import ServiceHandle, start_server
from asyncfl.service.tls import write_self_signed

SC = grpc.StatusCode
DIM = 60 * 10 + 10  # logistic regression on 60 features, 10 classes


def _config(tmp: Path) -> ServiceConfig:
    cert, key = write_self_signed(tmp / "tls")
    (tmp / "secret").write_text(secrets.token_hex(32))
    return build_config(
        ServiceConfig,
        {
            "server": {
                "port": 0,
                "tls_cert": str(cert),
                "tls_key": str(key),
                "max_message_bytes": 256 * 1024,
                "chunk_bytes": 64 * 1024,
            },
            "auth": {"secret_file": str(tmp / "secret")},
            "storage": {"dir": str(tmp / "state")},
            "tasks": [
                {
                    "id": "t",
                    "model": {"name": "logistic"},
                    "algorithm": {"name": "fedbuff", "concurrency": 50, "buffer_size": 5},
                    "max_update_norm": 100.0,
                }
            ],
        },
    )


def _snapshot(h: ServiceHandle) -> tuple[Any, ...]:
    rt = h.coordinator.tasks["t"].runtime
    return (rt.version, rt.agg.buffered, rt.params().tobytes(), h.coordinator.store.counts("t"))


async def _call(coro: Any) -> tuple[SC, str]:
    try:
        await coro
    except grpc.aio.AioRpcError as err:
        reason = dict(err.trailing_metadata() or ()).get(REASON_KEY, "")
        return err.code(), str(reason)
    return SC.OK, ""


async def _chunks(*parts: pb.UploadChunk) -> AsyncIterator[pb.UploadChunk]:
    for p in parts:
        yield p


def _header(lease: str, upload_id: str, **kw: Any) -> pb.UploadChunk:
    fields: dict[str, Any] = {
        "task_id": "t",
        "lease_id": lease,
        "upload_id": upload_id,
        "base_version": 0,
        "num_examples": 5,
        "dim": DIM,
        "dtype": pb.DTYPE_FLOAT32,
    }
    fields.update(kw)
    return pb.UploadChunk(header=pb.UploadHeader(**fields))


def _data(values: np.ndarray) -> pb.UploadChunk:
    return pb.UploadChunk(data=values.astype("<f4").tobytes())


async def _scenario(tmp: Path) -> None:
    cfg = _config(tmp)
    h = await start_server(cfg)
    secret = Secret.from_file(tmp / "secret")
    ca = (tmp / "tls" / "cert.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    try:
        async with grpc.aio.secure_channel(f"localhost:{h.port}", creds) as ch:
            stub = pb_grpc.FederatedLearningStub(ch)  # type: ignore[no-untyped-call]
            md = bearer_metadata(secret.token("7"))
            md_other = bearer_metadata(secret.token("8"))
            resp = await stub.CheckIn(pb.CheckInRequest(num_examples=5), metadata=md)
            lease = resp.assignment.lease_id
            other = await stub.CheckIn(pb.CheckInRequest(num_examples=5), metadata=md_other)
            other_lease = other.assignment.lease_id
            # Change the MAC's last hex digit (to a different one: it may already be "0").
            forged_lease = lease[:-1] + ("1" if lease.endswith("0") else "0")
            rng = np.random.default_rng(0)
            good = rng.normal(0, 0.01, DIM).astype(np.float32)
            # One legitimate upload, so that a replay of it has something to replay.
            code, _ = await _call(
                stub.UploadUpdate(_chunks(_header(lease, "u1"), _data(good)), metadata=md)
            )
            assert code == SC.OK
            before = _snapshot(h)

            def up(*parts: pb.UploadChunk, meta: Any = md) -> Any:
                return stub.UploadUpdate(_chunks(*parts), metadata=meta)

            nan = good.copy()
            nan[3] = np.nan
            inf = good.copy()
            inf[-1] = np.inf
            cases: list[tuple[Any, SC, str]] = [
                (up(_header(lease, "u1"), _data(good)), SC.ALREADY_EXISTS, "duplicate_upload"),
                (
                    up(_header(lease, "u2", dim=DIM - 1), _data(good[:-1])),
                    SC.INVALID_ARGUMENT,
                    "bad_shape",
                ),
                (
                    up(_header(lease, "u3", dtype=pb.DTYPE_UNSPECIFIED), _data(good)),
                    SC.INVALID_ARGUMENT,
                    "bad_dtype",
                ),
                (up(_header(lease, "u4"), _data(nan)), SC.INVALID_ARGUMENT, "not_finite"),
                (up(_header(lease, "u5"), _data(inf)), SC.INVALID_ARGUMENT, "not_finite"),
                (
                    up(_header(lease, "u6"), _data(good * 1e6)),
                    SC.INVALID_ARGUMENT,
                    "norm_too_large",
                ),
                (
                    up(_header(lease, "u7", task_id="nope"), _data(good)),
                    SC.NOT_FOUND,
                    "unknown_task",
                ),
                (
                    up(_header(lease, "u8", base_version=9), _data(good)),
                    SC.INVALID_ARGUMENT,
                    "bad_version",
                ),
                (up(_header(other_lease, "u9"), _data(good)), SC.FAILED_PRECONDITION, "bad_lease"),
                (
                    up(_header(forged_lease, "u10"), _data(good)),
                    SC.FAILED_PRECONDITION,
                    "bad_lease",
                ),
                (
                    up(_header(lease, "u11"), _data(good), _data(good)),
                    SC.RESOURCE_EXHAUSTED,
                    "message_too_large",
                ),
                (
                    up(_header(lease, "u12"), _data(good[:10])),
                    SC.INVALID_ARGUMENT,
                    "malformed_message",
                ),
                (up(_data(good)), SC.INVALID_ARGUMENT, "malformed_message"),
                (up(), SC.INVALID_ARGUMENT, "malformed_message"),
                (
                    up(_header(lease, "u13"), _header(lease, "u13")),
                    SC.INVALID_ARGUMENT,
                    "malformed_message",
                ),
                (up(_header(lease, ""), _data(good)), SC.INVALID_ARGUMENT, "malformed_message"),
                (
                    up(_header(lease, "u14"), _data(good), meta=bearer_metadata("7.00")),
                    SC.UNAUTHENTICATED,
                    "unauthenticated",
                ),
                (
                    up(_header(lease, "u15"), _data(good), meta=()),
                    SC.UNAUTHENTICATED,
                    "unauthenticated",
                ),
                (
                    up(
                        _header(lease, "u16"),
                        _data(good),
                        meta=bearer_metadata(secret.token("operator")),
                    ),
                    SC.PERMISSION_DENIED,
                    "permission_denied",
                ),
                (
                    stub.Status(pb.StatusRequest(), metadata=md),
                    SC.PERMISSION_DENIED,
                    "permission_denied",
                ),
                (
                    stub.CheckIn(
                        pb.CheckInRequest(), metadata=bearer_metadata(Secret(b"x" * 32).token("7"))
                    ),
                    SC.UNAUTHENTICATED,
                    "unauthenticated",
                ),
                (
                    stub.CheckIn(pb.CheckInRequest(num_examples=0), metadata=md),
                    SC.FAILED_PRECONDITION,
                    "ineligible",
                ),
                # A single message above max_message_bytes is refused by gRPC itself.
                (
                    up(_header(lease, "u17"), pb.UploadChunk(data=b"\0" * (300 * 1024))),
                    SC.RESOURCE_EXHAUSTED,
                    "",
                ),
            ]
            for call, want_code, want_reason in cases:
                code, reason = await _call(call)
                assert (code, reason) == (want_code, want_reason) or (
                    want_reason == "" and code == want_code
                ), (code, reason, want_code, want_reason)
            # Random bytes as request bodies of every method.
            raw_methods = [
                ch.unary_unary("/asyncfl.v1.FederatedLearning/CheckIn"),
                ch.stream_unary("/asyncfl.v1.FederatedLearning/UploadUpdate"),
            ]
            for i in range(20):
                blob = rng.bytes(int(rng.integers(1, 2000)))
                if i % 2 == 0:
                    code, reason = await _call(raw_methods[0](blob, metadata=md))
                else:
                    code, reason = await _call(raw_methods[1](_raw(blob, 3), metadata=md))
                assert (code, reason) == (SC.INVALID_ARGUMENT, "malformed_message"), code
            # Random headers with random data: never accepted (wrong lease or sizes), no crash.
            for i in range(30):
                n = int(rng.integers(0, 3 * DIM))
                hdr = _header(
                    lease if i % 3 else other_lease,
                    f"r{i}",
                    dim=int(rng.choice([n, DIM, 0, 2**40])),
                    base_version=int(rng.integers(0, 3)),
                    num_examples=int(rng.integers(0, 2**62)),
                    dtype=int(rng.integers(0, 2)),
                )
                vals = rng.normal(0, 1e3, n).astype(np.float32)
                code, _ = await _call(up(hdr, _data(vals)))
                assert code not in (SC.OK, SC.UNKNOWN, SC.INTERNAL, SC.UNAVAILABLE), code
            assert _snapshot(h) == before
            # The server still works: a fresh, valid upload is accepted.
            code, _ = await _call(up(_header(lease, "ok2"), _data(good)))
            assert code == SC.OK
    finally:
        await h.stop(0)


async def _raw(blob: bytes, parts: int) -> AsyncIterator[bytes]:
    step = max(1, len(blob) // parts)
    for i in range(0, len(blob), step):
        yield blob[i : i + step]


def test_hostile_messages_change_nothing(tmp_path: Path) -> None:
    asyncio.run(_scenario(tmp_path))
