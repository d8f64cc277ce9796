"""``secure_aggregation: tee`` in the service (in-process server on 127.0.0.1): a FedBuff task
over the TEE secure buffer trains like plaintext FedBuff within the fixed-point bound, the
ledger holds masked contributions only, a client refuses an enclave it does not trust, and an
enclave or server restart discards the unreleased masked buffer and the task goes on."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from asyncfl.algorithms.base import Outcome
from asyncfl.core.configload import build_config
from asyncfl.core.update import FloatVector, Update
from asyncfl.errors import ConfigError, ProtocolError
from asyncfl.secure.fixedpoint import FixedPointCodec
from asyncfl.secure.tee import SimulatedVendor, TeeClient
from asyncfl.secure.tee.client import MaskedUpdate
from asyncfl.secure.tee.enclave import EnclaveConfig
from asyncfl.service.auth import Secret
from asyncfl.service.checkpoint import checkpoint_name, read_checkpoint
from asyncfl.service.client import ClientError, ClientOptions, TrainResult, run_client_async
from asyncfl.service.config import ServiceConfig, TaskConfig
from asyncfl.service.errors import ServiceError
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
from asyncfl.service.server import ServiceHandle, start_server
from asyncfl.service.store import Store
from asyncfl.service.task import Accepted, Submission, TaskRuntime, initial_params
from asyncfl.service.tee import TeeTrust, expected_measurement_for

K, STEPS, INPUT, CLASSES = 3, 2, 8, 3
DIM = INPUT * CLASSES + CLASSES
SCALES = (0.05, 0.11, 0.02)  # distinct per buffer slot: broken weighting would show


def _task(task_id: str, tee: bool, concurrency: int = K) -> dict[str, Any]:
    t: dict[str, Any] = {
        "id": task_id,
        "input_shape": [INPUT],
        "num_classes": CLASSES,
        "model": {"name": "logistic"},
        "algorithm": {"name": "fedbuff", "concurrency": concurrency, "buffer_size": K},
        "server_optimizer": {"name": "sgd", "lr": 1.0},
        "max_server_steps": STEPS,
    }
    if tee:
        t["secure_aggregation"] = {"mode": "tee", "tee_backend": "inprocess", "clip": 1.0}
    return t


def _config(tmp: Path, concurrency: int = K) -> ServiceConfig:
    if not (tmp / "secret").exists():
        (tmp / "secret").write_text(secrets.token_hex(32))
    return build_config(
        ServiceConfig,
        {
            "server": {"host": "127.0.0.1", "port": 0, "insecure": True},
            "auth": {"secret_file": str(tmp / "secret")},
            "storage": {"dir": str(tmp / "state"), "keep_applied_deltas": True},
            "selector": {"retry_after_s": 0.02},
            "tasks": [_task("plain", False, concurrency), _task("tee", True, concurrency)],
        },
    )


def _delta(params: FloatVector, client: int) -> FloatVector:
    """A deterministic 'training' result that depends on the model (so errors propagate)."""
    scale = SCALES[client % K]
    return (scale * np.sin(params.astype(np.float64) + 0.7 * client) + 0.01 * client).astype(
        np.float32
    )


class _Trainer:
    def __init__(self, client: int, seen: dict[tuple[int, int], FloatVector]) -> None:
        self.client = client
        self.seen = seen

    def __call__(self, params: FloatVector, version: int, assignment: pb.Assignment) -> TrainResult:
        d = _delta(params, self.client)
        self.seen[(self.client, version)] = d
        return TrainResult(d, 4 + self.client)


def _trust(h: ServiceHandle, cfg: ServiceConfig) -> TeeTrust:
    rt = h.coordinator.tasks["tee"].runtime
    assert rt.vendor is not None
    tee_cfg = next(t for t in cfg.tasks if t.id == "tee")
    return TeeTrust(rt.vendor.public, expected_measurement_for(tee_cfg, DIM))


async def _one(
    h: ServiceHandle,
    secret: Secret,
    client: int,
    task: str,
    seen: dict[tuple[int, int], FloatVector],
    trust: TeeTrust | None,
) -> int:
    opts = ClientOptions(
        address=f"127.0.0.1:{h.port}",
        token=secret.token(str(client)),
        client_id=client,
        num_examples=10,
        task_id=task,
        max_updates=1,
        backoff_base_s=0.01,
        tee=trust,
    )
    rep = await asyncio.wait_for(run_client_async(opts, _Trainer(client, seen)), 30)
    return rep.accepted


def _ledger(tmp: Path, task: str) -> list[tuple[int, str, bytes | None]]:
    with sqlite3.connect(tmp / "state" / "ledger.sqlite") as db:
        return db.execute(
            "SELECT client_id, status, delta FROM updates WHERE task_id = ? ORDER BY seq",
            (task,),
        ).fetchall()


def _params(h: ServiceHandle, task: str) -> FloatVector:
    return h.coordinator.tasks[task].runtime.params().copy()


def test_tee_task_matches_plaintext_and_ledger_holds_only_masked_rows(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    secret = Secret.from_file(tmp_path / "secret")
    seen: dict[str, dict[tuple[int, int], FloatVector]] = {"plain": {}, "tee": {}}

    async def run() -> tuple[FloatVector, FloatVector, float, EnclaveConfig]:
        h = await start_server(cfg)
        try:
            trust = _trust(h, cfg)
            # One client at a time: staleness 0 in both tasks, so they see the same schedule.
            for task in ("plain", "tee"):
                for c in range(K * STEPS):
                    tr = trust if task == "tee" else None
                    assert await _one(h, secret, c, task, seen[task], tr) == 1
            rt = h.coordinator.tasks["tee"].runtime
            assert rt.tee is not None and rt.finished and rt.version == STEPS
            bound = rt.tee.agg.error_bound(K)
            return _params(h, "plain"), _params(h, "tee"), bound, rt.tee.enclave
        finally:
            await h.stop()

    plain, tee, bound, enclave = asyncio.run(run())

    # Independent reference: FedBuff with equal weights and SGD(lr=1) as a plain loop.
    p = initial_params(cfg.tasks[0]).astype(np.float64)
    for step in range(STEPS):
        mean = np.zeros(DIM)
        for c in range(step * K, (step + 1) * K):
            mean += _delta(p.astype(np.float32), c).astype(np.float64) / K
        p = p - mean
    np.testing.assert_allclose(plain, p, atol=1e-5)
    # Per step the secure sum is within `bound` of the plain mean; the next step's deltas are
    # max(SCALES)-Lipschitz in the model, so after two steps |tee - plain| <= (2 + L) bound.
    err = float(np.max(np.abs(tee.astype(np.float64) - plain)))
    assert err <= (2 + max(SCALES)) * bound, (err, bound)
    # Sharper: with staleness 0 every weight is exactly 2^S, so the weight-quantisation term
    # of the bound vanishes and only the codec's rounding remains (plus float32 rounding of
    # the two optimizer steps, one ulp each).
    codec = FixedPointCodec(clip=1.0, frac_bits=enclave.frac_bits, ring_bits=enclave.ring_bits)
    tight = codec.error_bound((1 << enclave.weight_bits) * K)
    ulp = float(np.spacing(np.float32(np.abs(plain).max())))
    assert err <= (2 + max(SCALES)) * tight + 2 * STEPS * ulp, (err, tight)
    assert err > 0  # really went through fixed point, not a plaintext path

    # The ledger: plaintext rows hold float deltas; tee rows only ring vectors that are far
    # from every client's own encoding (a mask is uniform in the ring).
    rows = _ledger(tmp_path, "tee")
    assert [s for _, s, _ in rows] == ["applied"] * (K * STEPS)
    width = codec.ring.dtype.itemsize
    modulus = 1 << enclave.ring_bits
    for client, _, blob in rows:
        assert blob is not None and len(blob) == width * DIM
        masked = np.frombuffer(blob, dtype=codec.ring.dtype.newbyteorder("<")).astype(object)
        (delta,) = [d for (c, _), d in seen["tee"].items() if c == client]
        q = codec.encode(delta, 1, np.random.default_rng(0)).astype(object)
        diff = [(int(m) - int(x)) % modulus for m, x in zip(masked, q, strict=True)]
        near = sum(min(d, modulus - d) <= 2 for d in diff)
        assert near <= 1, f"row of client {client} is close to its unmasked encoding"
        assert blob != delta.astype("<f4").tobytes()


def test_client_refuses_untrusted_enclave(tmp_path: Path) -> None:
    # A refusing client never uploads, so its lease holds a slot until it expires: leave
    # room for the trusted client.
    cfg = _config(tmp_path, concurrency=4)
    secret = Secret.from_file(tmp_path / "secret")

    async def run() -> None:
        h = await start_server(cfg)
        try:
            good = _trust(h, cfg)
            seen: dict[tuple[int, int], FloatVector] = {}
            wrong = TeeTrust(good.vendor_public, bytes(32))
            with pytest.raises(ClientError, match="measurement"):
                await _one(h, secret, 1, "tee", seen, wrong)
            other_vendor = TeeTrust(bytes(range(32)), good.expected_measurement)
            with pytest.raises(ClientError, match="refused"):
                await _one(h, secret, 2, "tee", seen, other_vendor)
            with pytest.raises(ClientError, match=r"ClientOptions\.tee"):
                await _one(h, secret, 3, "tee", seen, None)
            assert seen == {}  # refused before training: nothing computed, nothing sent
            assert await _one(h, secret, 4, "tee", seen, good) == 1
        finally:
            await h.stop()

    asyncio.run(run())
    assert [c for c, _, _ in _ledger(tmp_path, "tee")] == [4]


def test_enclave_and_server_restart_discard_the_unreleased_buffer(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    secret = Secret.from_file(tmp_path / "secret")
    seen: dict[tuple[int, int], FloatVector] = {}

    async def run() -> None:
        h = await start_server(cfg)
        try:
            trust = _trust(h, cfg)
            assert await _one(h, secret, 0, "tee", seen, trust) == 1
            rt = h.coordinator.tasks["tee"].runtime
            assert rt.tee is not None and rt.agg.buffered == 1
            rt.tee.backend.restart()  # the enclave loses its buffer (new key and epoch)
            # Client 1 seals to the old boot: refused (stale_epoch), the buffer is discarded,
            # it checks in again, gets the new report and is accepted.
            assert await _one(h, secret, 1, "tee", seen, trust) == 1
            assert rt.agg.buffered == 1 and rt.version == 0
            assert await _one(h, secret, 2, "tee", seen, trust) == 1
        finally:
            await h.stop()
        # A server restart boots a new enclave: the two buffered masked rows are discarded.
        h = await start_server(cfg)
        try:
            trust = _trust(h, cfg)
            rt = h.coordinator.tasks["tee"].runtime
            assert rt.agg.buffered == 0 and rt.version == 0
            for c in range(3, 3 + K * STEPS):
                assert await _one(h, secret, c, "tee", seen, trust) == 1
            assert rt.finished and rt.version == STEPS
            ckpt = read_checkpoint(
                tmp_path / "state" / "checkpoints" / checkpoint_name("tee", STEPS)
            )
            assert ckpt.version == STEPS
        finally:
            await h.stop()

    asyncio.run(run())
    statuses = [(c, s) for c, s, _ in _ledger(tmp_path, "tee")]
    assert statuses[:3] == [(0, "discarded"), (1, "discarded"), (2, "discarded")]
    assert statuses[3:] == [(c, "applied") for c in range(3, 3 + K * STEPS)]


def test_config_refuses_unsupported_tee_combinations() -> None:
    bad = {
        **_task("t", tee=True),
        "algorithm": {"name": "fedasync", "concurrency": 2},
        # DP with tee is supported (tests/test_service_tee_dp.py), adaptive clipping is not.
        "privacy": {"enabled": True, "clipping": "adaptive"},
        "population": 10,
        "max_update_norm": 1.0,
    }
    with pytest.raises(ConfigError) as info:
        build_config(TaskConfig, bad)
    text = str(info.value)
    for field in ("algorithm.name", "privacy.clipping", "max_update_norm"):
        assert field in text
    with pytest.raises(ConfigError, match=r"secure_aggregation\.mode"):
        build_config(
            TaskConfig, {**_task("t", tee=False), "secure_aggregation": {"mode": "secagg"}}
        )


def test_enclave_restart_inside_a_group_commit_discards_the_batch_rows(tmp_path: Path) -> None:
    """The enclave restarts between two uploads of one group commit: the rows of the lost
    buffer (one committed before the batch, one accepted earlier in the batch) are marked
    discarded in the same commit; the upload sealed to the old boot is refused."""
    cfg = build_config(TaskConfig, _task("tee", tee=True))
    store = Store(tmp_path / "l.sqlite")
    rt = TaskRuntime(cfg, store, tmp_path / "ck", vendor=SimulatedVendor.generate())
    try:
        assert rt.tee is not None and rt.vendor is not None
        tee = rt.tee
        ec = tee.enclave
        codec = FixedPointCodec(clip=ec.clip, frac_bits=ec.frac_bits, ring_bits=ec.ring_bits)
        client = TeeClient(
            vendor_public=rt.vendor.public,
            expected=expected_measurement_for(cfg, rt.dim),
            codec=codec,
            task=cfg.id,
            dim=rt.dim,
        )
        rng = np.random.default_rng(5)

        def masked(c: int) -> Submission:
            delta = rng.normal(0, 0.1, rt.dim).astype(np.float32)
            up = client.upload(
                tee.agg.report, client_id=c, base_version=0, num_examples=3, delta=delta, rng=rng
            )
            return Submission(c, f"u{c}", 0, 3, np.zeros(0, np.float32), up)

        first = masked(1)
        assert isinstance(rt.submit_many([first])[0], Accepted)
        second, third = masked(2), masked(3)  # both sealed to the first boot
        real = tee.agg.on_masked_update

        def restart_after_second(up: MaskedUpdate) -> Outcome:
            out = real(up)
            if up.client_id == 2:
                tee.backend.restart()
            return out

        tee.agg.on_masked_update = restart_after_second  # type: ignore[method-assign]
        res = rt.submit_many([second, third])
        assert isinstance(res[0], Accepted)
        assert isinstance(res[1], ServiceError) and res[1].reason == "stale_epoch"
        assert rt.agg.buffered == 0 and rt.version == 0
        assert [(r.client_id, r.status) for r in store.rows(cfg.id)] == [
            (1, "discarded"),
            (2, "discarded"),
        ]
        with pytest.raises(ProtocolError):  # the aggregator never takes a plaintext update
            rt.agg.on_update(Update(9, 0, 1, np.zeros(rt.dim, np.float32)))
        with pytest.raises(ServiceError) as plain:
            rt.submit(9, "p", 0, 1, np.zeros(rt.dim, np.float32))
        assert plain.value.reason == "bad_encoding"
    finally:
        rt.close()
        store.close()
