"""User-level DP with the TEE secure buffer in the service: the enclave adds the noise to every
release (the server only ever holds noised sums), devices clip to the ATTESTED clip norm, each
release is accounted, persisted in checkpoints and noted write-ahead (so a release the server
saw before a crash is spent after it), and the budget stops the task across restarts."""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _service_util import operator_status, reference_epsilons
from asyncfl.core.configload import build_config
from asyncfl.core.update import FloatVector
from asyncfl.errors import ProtocolError
from asyncfl.privacy import clip_update
from asyncfl.secure.fixedpoint import FixedPointCodec
from asyncfl.secure.tee import SimulatedVendor, TeeClient
from asyncfl.secure.tee.attestation import verify_report
from asyncfl.secure.tee.enclave import EnclaveConfig, dp_noise_std
from asyncfl.service.auth import Secret
from asyncfl.service.checkpoint import read_checkpoint
from asyncfl.service.client import (
    ClientError,
    ClientOptions,
    TrainResult,
    attest_assignment,
    run_clients_async,
)
from asyncfl.service.config import ServiceConfig, TaskConfig
from asyncfl.service.errors import ServiceError
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
from asyncfl.service.server import ServiceHandle, start_server
from asyncfl.service.store import Store
from asyncfl.service.task import Accepted, Submission, TaskRuntime, initial_params
from asyncfl.service.tee import TeeTrust, expected_measurement_for

C, Z, K, N = 0.5, 1.0, 2, 100  # clip norm, noise multiplier, buffer size, population
DIM = 60 * 10 + 10
FRAC = 24


EPS = reference_epsilons(4, noise_multiplier=Z, clip_norm=C, cohort_size=K, population=N)


def _task(**privacy: Any) -> dict[str, Any]:
    return {
        "id": "tdp",
        "model": {"name": "logistic"},
        "algorithm": {"name": "fedbuff", "concurrency": 4, "buffer_size": K},
        "server_optimizer": {"name": "sgd", "lr": 1.0},
        "max_server_steps": 50,
        "population": N,
        "privacy": {"enabled": True, "noise_multiplier": Z, "clip_norm": C, **privacy},
        "secure_aggregation": {
            "mode": "tee",
            "tee_backend": "inprocess",
            "clip": 1.0,
            "frac_bits": FRAC,
            # Calibration at exactly this precision (fit_ring32 is tested on its own).
            "tee_fit_ring32": False,
        },
    }


def _service_config(tmp: Path, **privacy: Any) -> ServiceConfig:
    if not (tmp / "secret").exists():
        (tmp / "secret").write_text(secrets.token_hex(32))
    return build_config(
        ServiceConfig,
        {
            "server": {"host": "127.0.0.1", "port": 0, "insecure": True},
            "auth": {"secret_file": str(tmp / "secret")},
            "storage": {"dir": str(tmp / "state"), "keep_applied_deltas": True},
            "selector": {"retry_after_s": 0.02},
            "tasks": [_task(**privacy)],
        },
    )


def _trainer(client: int) -> Any:
    def train(params: Any, version: int, a: pb.Assignment) -> TrainResult:
        # Distinct, large updates (norm ~ 25 * (client + 1) >> C): the device's clip must bite.
        rng = np.random.default_rng(1000 * client + version)
        delta = (rng.normal(0.0, 1.0, a.model_dim) * (client + 1)).astype(np.float32)
        return TrainResult(delta, 5 + client)

    return train


def _trust(h: ServiceHandle, cfg: ServiceConfig) -> TeeTrust:
    rt = h.coordinator.tasks["tdp"].runtime
    assert rt.vendor is not None
    return TeeTrust(rt.vendor.public, expected_measurement_for(cfg.tasks[0], DIM))


async def _clients(h: ServiceHandle, secret: Secret, ids: range, max_updates: int | None) -> int:
    trust = _trust(h, h.coordinator.cfg)
    clients = [
        (
            ClientOptions(
                address=f"127.0.0.1:{h.port}",
                token=secret.token(str(c)),
                client_id=c,
                num_examples=10,
                max_updates=max_updates,
                backoff_base_s=0.01,
                tee=trust,
            ),
            _trainer(c),
        )
        for c in ids
    ]
    reports = await asyncio.wait_for(run_clients_async(clients), 120)
    return sum(r.accepted for r in reports)


def test_tee_dp_task_accounts_resumes_after_restart_and_stops_at_budget(tmp_path: Path) -> None:
    cfg = _service_config(tmp_path, epsilon_budget=(EPS[3] + EPS[4]) / 2)  # admits 3 releases
    secret = Secret.from_file(tmp_path / "secret")

    async def run() -> None:
        h = await start_server(cfg)
        try:
            assert await _clients(h, secret, range(2), max_updates=2) == 4  # two releases
            s = await operator_status(h.port, secret)
            assert s.model_version == 2 and s.dp_enabled and not s.finished
            assert s.epsilon == pytest.approx(EPS[2], rel=1e-9)
            assert s.discarded_updates == 0
        finally:
            await h.stop()
        h = await start_server(cfg)  # a new enclave boot; epsilon resumes from the checkpoint
        try:
            s = await operator_status(h.port, secret)
            assert s.model_version == 2 and s.epsilon == pytest.approx(EPS[2], rel=1e-9)
            await _clients(h, secret, range(3), max_updates=None)  # until "done"
            s = await operator_status(h.port, secret)
            assert s.model_version == 3 and s.finished and s.budget_spent
            assert s.epsilon == pytest.approx(EPS[3], rel=1e-9)
            rt = h.coordinator.tasks["tdp"].runtime
            assert rt.dp is not None and rt.dp.site == "enclave"
            with pytest.raises(ServiceError) as err:
                rt.submit(9, "late", 3, 1, np.zeros(DIM, np.float32))
            assert err.value.reason == "privacy_budget_spent"
        finally:
            await h.stop()

    asyncio.run(run())
    with sqlite3.connect(tmp_path / "state" / "ledger.sqlite") as db:
        rows = db.execute("SELECT status, delta FROM updates ORDER BY seq").fetchall()
        notes = db.execute("SELECT version, releases FROM release_notes ORDER BY version")
        notes = notes.fetchall()
        ckpt_name = db.execute("SELECT checkpoint FROM tasks").fetchone()[0]
    # Masked ring rows only (never a float32 delta), every one applied; one release per step.
    assert [s for s, _ in rows] == ["applied"] * (3 * K)
    assert all(len(blob) % DIM == 0 and len(blob) // DIM in (4, 8) for _, blob in rows)
    assert notes == [(0, 1), (1, 1), (2, 1)]
    final = read_checkpoint(tmp_path / "state" / "checkpoints" / ckpt_name)
    assert final.privacy is not None
    assert [r["count"] for r in json.loads(final.privacy)["runs"]] == [3]


def _runtime(tmp: Path, **privacy: Any) -> tuple[TaskRuntime, Store, TaskConfig, SimulatedVendor]:
    cfg = build_config(TaskConfig, _task(**privacy))
    store = Store(tmp / "l.sqlite")
    vendor = SimulatedVendor.generate()
    return TaskRuntime(cfg, store, tmp / "ck", vendor=vendor), store, cfg, vendor


def _masked(
    rt: TaskRuntime,
    cfg: TaskConfig,
    vendor: SimulatedVendor,
    client: int,
    delta: FloatVector,
    upload: str,
) -> Submission:
    """What a device sends: its update clipped to C, encoded, masked and sealed."""
    assert rt.tee is not None
    ec = rt.tee.enclave
    codec = FixedPointCodec(clip=ec.clip, frac_bits=ec.frac_bits, ring_bits=ec.ring_bits)
    tc = TeeClient(
        vendor_public=vendor.public,
        expected=expected_measurement_for(cfg, rt.dim),
        codec=codec,
        task=cfg.id,
        dim=rt.dim,
    )
    clipped = clip_update(delta, C)[0]
    rng = np.random.default_rng(client)
    v = rt.version
    up = tc.upload(
        rt.tee.agg.report, client_id=client, base_version=v, num_examples=4, delta=clipped, rng=rng
    )
    return Submission(client, upload, v, 4, np.zeros(0, np.float32), up)


def test_the_enclave_noises_every_release_with_the_calibrated_std(tmp_path: Path) -> None:
    """SGD with lr 1 and staleness 0: final = init - sum_steps (d_1 + d_2 + noise) / K, with
    the clipped deltas d_i known to the test (never to the server). The residual against the
    noise-free sum is the enclave's noise: mean 0, std sqrt(steps) sigma / K per coordinate,
    sigma = z (C + sqrt(d) 2^-f). Fixed-point rounding adds < 2^-24 per coordinate. With 610
    coordinates the std estimate has a relative standard error of 2.9%; 15% is over 5."""
    rt, store, cfg, vendor = _runtime(tmp_path)
    try:
        steps = 6
        rng = np.random.default_rng(11)
        expected = initial_params(cfg).astype(np.float64)
        for step in range(steps):
            for c in (2 * step, 2 * step + 1):
                delta = (rng.normal(0, 1.0, DIM) * (1 + c % 3)).astype(np.float32)
                res = rt.submit_many([_masked(rt, cfg, vendor, c, delta, f"u{c}")])[0]
                assert isinstance(res, Accepted), res
                expected -= clip_update(delta, C)[0].astype(np.float64) / K
        assert rt.version == steps
        residual = rt.params().astype(np.float64) - expected
        sigma = dp_noise_std(Z, C, dim=DIM, frac_bits=FRAC)
        total = np.sqrt(steps) * sigma / K
        assert abs(residual.std() / total - 1) < 0.15, residual.std() / total
        assert abs(residual.mean()) < 5 * total / np.sqrt(DIM)
        assert rt.dp is not None and rt.dp.accountant.steps == steps
        assert store.release_notes(cfg.id) == {v: 1 for v in range(steps)}
    finally:
        rt.close()
        store.close()


def test_the_clip_norm_a_device_uses_is_the_attested_one(tmp_path: Path) -> None:
    rt, store, cfg, vendor = _runtime(tmp_path)
    try:
        assert rt.tee is not None
        ec = rt.tee.enclave
        assert ec.dp_clip_norm == C
        assert ec.noise_std == dp_noise_std(Z, C, dim=DIM, frac_bits=FRAC)
        assert EnclaveConfig.decode(ec.encode()) == ec
        r = rt.tee.agg.report
        a = pb.Assignment(
            task_id=cfg.id,
            model_dim=rt.dim,
            clip_norm=C,
            enclave_report=pb.EnclaveReport(
                measurement=r.measurement,
                public_key=r.public_key,
                epoch=r.epoch,
                signature=r.signature,
            ),
            enclave_config=ec.encode(),
        )
        trust = TeeTrust(vendor.public, expected_measurement_for(cfg, rt.dim))
        assert attest_assignment(a, trust) is not None
        for wrong in (5.0, 0.0, np.nextafter(C, 1.0)):  # looser, none, one ulp off
            a.clip_norm = float(wrong)
            with pytest.raises(ClientError, match="clip_norm"):
                attest_assignment(a, trust)
        # The noise and clip are measured: a device set up for this task refuses an enclave
        # booted without DP, and one set up without DP refuses this one.
        plain = build_config(TaskConfig, {**_task(), "privacy": {"enabled": False}})
        assert expected_measurement_for(plain, rt.dim) != trust.expected_measurement
        with pytest.raises(ProtocolError, match="measurement"):
            verify_report(r, vendor.public, expected_measurement_for(plain, rt.dim))
    finally:
        rt.close()
        store.close()


def test_a_release_the_server_saw_before_a_crash_is_spent_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step's commit fails after the enclave released (as if the server died there): the
    rebuilt task accounts that release from its write-ahead note, here and after a restart,
    and the budget (2 releases) stops the task after one more step."""
    rt, store, cfg, vendor = _runtime(tmp_path, epsilon_budget=(EPS[2] + EPS[3]) / 2)
    rng = np.random.default_rng(3)

    def delta() -> FloatVector:
        return rng.normal(0, 1.0, DIM).astype(np.float32)

    try:
        assert isinstance(rt.submit_many([_masked(rt, cfg, vendor, 1, delta(), "a")])[0], Accepted)
        real_commit = store.commit

        def crash_at_step(task_id: str, rows: Any, **kw: Any) -> int:
            if kw.get("step") is not None:
                raise sqlite3.OperationalError("disk I/O error (injected)")
            return real_commit(task_id, rows, **kw)

        monkeypatch.setattr(store, "commit", crash_at_step)
        res = rt.submit_many([_masked(rt, cfg, vendor, 2, delta(), "b")])[0]
        assert isinstance(res, ServiceError) and res.reason == "internal"
        monkeypatch.undo()
        assert rt.dp is not None and rt.version == 0
        assert store.release_notes(cfg.id) == {0: 1}
        assert rt.dp.accountant.steps == 1  # the uncommitted release is spent
        assert rt.dp.accountant.epsilon() == pytest.approx(EPS[1], rel=1e-9)
        assert [(r.client_id, r.status) for r in store.rows(cfg.id)] == [(1, "discarded")]
        assert rt.discarded_total == 1 and not rt.finished
        rt.close()

        rt = TaskRuntime(cfg, store, tmp_path / "ck", vendor=vendor)  # a restart
        assert rt.dp is not None and rt.dp.accountant.steps == 1 and rt.discarded_total == 1
        for c, u in ((3, "c"), (4, "d")):
            res = rt.submit_many([_masked(rt, cfg, vendor, c, delta(), u)])[0]
            assert isinstance(res, Accepted), res
        assert rt.version == 1 and rt.finished and rt.budget_spent
        assert rt.dp.accountant.epsilon() == pytest.approx(EPS[2], rel=1e-9)
        assert store.release_notes(cfg.id) == {0: 2}
        rt.close()

        rt = TaskRuntime(cfg, store, tmp_path / "ck", vendor=vendor)  # the budget holds
        assert rt.dp is not None and rt.dp.accountant.steps == 2 and rt.budget_spent
        with pytest.raises(ServiceError) as err:
            rt.submit(5, "e", 1, 1, np.zeros(DIM, np.float32))
        assert err.value.reason == "privacy_budget_spent"
    finally:
        rt.close()
        store.close()


def test_a_ring_without_room_for_the_noise_tail_is_a_config_error() -> None:
    from asyncfl.errors import ConfigError
    from asyncfl.service.tee import enclave_config_for

    def config(z: float) -> TaskConfig:
        t = _task()
        t["privacy"] = {**t["privacy"], "noise_multiplier": z}
        t["secure_aggregation"] = {**t["secure_aggregation"], "ring_bits": 40}
        return build_config(TaskConfig, t)

    # 2^39 holds K = 2 weights of 2^12 at f = 24 plus a 9.42 sigma tail of sigma = 0.5 ...
    assert enclave_config_for(config(1.0), DIM).noise_std == dp_noise_std(
        1.0, C, dim=DIM, frac_bits=FRAC
    )
    # ... but not of sigma = 2 (9.42 * 2 * 2^36 > 2^39).
    with pytest.raises(ConfigError, match=r"secure_aggregation\.ring_bits.*noise tail"):
        enclave_config_for(config(4.0), DIM)
