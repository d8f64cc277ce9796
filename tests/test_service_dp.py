"""User-level DP in the service (in-process server on 127.0.0.1): clipping on the device and
again on the server, the noised fixed-denominator step, epsilon in Status, the accountant
persisted across a restart, and the budget that stops the task."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _service_util import operator_status, reference_epsilons
from asyncfl.core.configload import build_config
from asyncfl.errors import ConfigError
from asyncfl.service.auth import Secret
from asyncfl.service.checkpoint import read_checkpoint
from asyncfl.service.client import (
    ClientOptions,
    TrainResult,
    clip_for_task,
    run_clients_async,
)
from asyncfl.service.config import ServiceConfig
from asyncfl.service.errors import ServiceError
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
from asyncfl.service.server import ServiceHandle, start_server
from asyncfl.service.task import initial_params

C, Z, K, N = 0.5, 1.0, 2, 100  # clip norm, noise multiplier, buffer size, population
DIM = 60 * 10 + 10


EPS = reference_epsilons(4, noise_multiplier=Z, clip_norm=C, cohort_size=K, population=N)


def _config(tmp: Path, **privacy: Any) -> ServiceConfig:
    if not (tmp / "secret").exists():
        (tmp / "secret").write_text(secrets.token_hex(32))
    return build_config(
        ServiceConfig,
        {
            "server": {"host": "127.0.0.1", "port": 0, "insecure": True},
            "auth": {"secret_file": str(tmp / "secret")},
            "storage": {"dir": str(tmp / "state"), "keep_applied_deltas": True},
            "selector": {"retry_after_s": 0.02},
            "tasks": [
                {
                    "id": "dp",
                    "model": {"name": "logistic"},
                    "algorithm": {"name": "fedbuff", "concurrency": 4, "buffer_size": K},
                    "server_optimizer": {"name": "sgd", "lr": 1.0},
                    "max_server_steps": 50,
                    "population": N,
                    "privacy": {
                        "enabled": True,
                        "noise_multiplier": Z,
                        "clip_norm": C,
                        **privacy,
                    },
                }
            ],
        },
    )


def _trainer(client: int) -> Any:
    def train(params: Any, version: int, a: pb.Assignment) -> TrainResult:
        # Distinct, large updates (norm ~ 25 * (client + 1) >> C): clipping must bite.
        rng = np.random.default_rng(1000 * client + version)
        delta = (rng.normal(0.0, 1.0, a.model_dim) * (client + 1)).astype(np.float32)
        return TrainResult(delta, 5 + client)

    return train


async def _clients(h: ServiceHandle, secret: Secret, ids: range, max_updates: int | None) -> int:
    clients = [
        (
            ClientOptions(
                address=f"127.0.0.1:{h.port}",
                token=secret.token(str(c)),
                client_id=c,
                num_examples=10,
                max_updates=max_updates,
                backoff_base_s=0.01,
            ),
            _trainer(c),
        )
        for c in ids
    ]
    # Generous: under a parallel test run on 2 busy cores the in-process server is slow.
    reports = await asyncio.wait_for(run_clients_async(clients), 120)
    return sum(r.accepted for r in reports)


def test_dp_task_accounts_resumes_after_restart_and_stops_at_budget(tmp_path: Path) -> None:
    # The budget admits exactly 3 steps.
    cfg = _config(tmp_path, epsilon_budget=(EPS[3] + EPS[4]) / 2)
    secret = Secret.from_file(tmp_path / "secret")

    async def run() -> None:
        h = await start_server(cfg)
        try:
            # Two clients, two updates each: exactly two steps of K = 2.
            assert await _clients(h, secret, range(2), max_updates=2) == 4
            s = await operator_status(h.port, secret)
            assert s.model_version == 2 and s.dp_enabled and not s.finished
            assert s.epsilon == pytest.approx(EPS[2], rel=1e-9)
            assert s.dp_delta == pytest.approx(1.0 / (10 * N))
        finally:
            await h.stop()
        h = await start_server(cfg)  # a restart resumes the same epsilon from the checkpoint
        try:
            s = await operator_status(h.port, secret)
            assert s.model_version == 2
            assert s.epsilon == pytest.approx(EPS[2], rel=1e-9)
            await _clients(h, secret, range(3), max_updates=None)  # until "done"
            s = await operator_status(h.port, secret)
            assert s.model_version == 3 and s.finished and s.budget_spent
            assert s.epsilon == pytest.approx(EPS[3], rel=1e-9)
            rt = h.coordinator.tasks["dp"].runtime
            with pytest.raises(ServiceError) as err:
                rt.submit(9, "late", 3, 1, np.zeros(DIM, np.float32))
            assert err.value.reason == "privacy_budget_spent"
        finally:
            await h.stop()

    asyncio.run(run())
    # The ledger holds what the algorithm added: every delta clipped to C.
    with sqlite3.connect(tmp_path / "state" / "ledger.sqlite") as db:
        rows = db.execute(
            "SELECT weight, delta, applied_version FROM updates WHERE status = 'applied' "
            "ORDER BY seq"
        ).fetchall()
        ckpt_name = db.execute("SELECT checkpoint FROM tasks").fetchone()[0]
    assert len(rows) == 3 * K
    deltas = [np.frombuffer(r[1], "<f4").astype(np.float64) for r in rows]
    assert all(np.linalg.norm(d) <= C * (1 + 1e-6) for d in deltas)
    final = read_checkpoint(tmp_path / "state" / "checkpoints" / ckpt_name)
    assert final.privacy is not None and '"count": 3' in final.privacy


def test_dp_step_is_the_noised_fixed_denominator_mean(tmp_path: Path) -> None:
    """SGD with lr 1: final = init - sum_steps (sum_i w_i d_i + noise) / K. The residual
    against the noise-free sum (plain numpy, from the ledger) is the noise: mean 0, std
    sqrt(steps) Z C / K per coordinate. With 610 coordinates the std estimate has a relative
    standard error of 1/sqrt(2 * 610) = 2.9%; 15% is over 5 of them."""
    cfg = _config(tmp_path)
    secret = Secret.from_file(tmp_path / "secret")

    async def run() -> None:
        h = await start_server(cfg)
        try:
            await _clients(h, secret, range(3), max_updates=4)  # 12 updates: 6 steps
        finally:
            await h.stop()

    asyncio.run(run())
    with sqlite3.connect(tmp_path / "state" / "ledger.sqlite") as db:
        rows = db.execute(
            "SELECT weight, delta FROM updates WHERE status = 'applied' ORDER BY seq"
        ).fetchall()
        version, ckpt_name = db.execute("SELECT version, checkpoint FROM tasks").fetchone()
    assert version == 6 and len(rows) == 6 * K
    expected = initial_params(cfg.tasks[0]).astype(np.float64)
    for weight, blob in rows:
        expected -= weight * np.frombuffer(blob, "<f4").astype(np.float64) / K
    final = read_checkpoint(tmp_path / "state" / "checkpoints" / ckpt_name).params
    residual = final.astype(np.float64) - expected
    sigma = np.sqrt(version) * Z * C / K
    assert abs(residual.std() / sigma - 1) < 0.15, residual.std() / sigma
    assert abs(residual.mean()) < 5 * sigma / np.sqrt(DIM)


def test_client_clips_to_the_assignment_norm() -> None:
    rng = np.random.default_rng(3)
    delta = rng.normal(0, 2.0, 50).astype(np.float32)
    out = clip_for_task(TrainResult(delta, 7), pb.Assignment(clip_norm=0.25))
    # Clipping only rescales: same direction, norm C (float32 rounding: within 1e-6).
    assert np.linalg.norm(out.delta.astype(np.float64)) == pytest.approx(0.25, rel=1e-6)
    cos = out.delta @ delta / (np.linalg.norm(out.delta) * np.linalg.norm(delta))
    assert cos == pytest.approx(1.0, abs=1e-6) and out.num_examples == 7
    same = clip_for_task(TrainResult(delta, 7), pb.Assignment())  # no DP: unchanged
    np.testing.assert_array_equal(same.delta, delta)


def test_dp_config_needs_population_and_fixed_clipping(tmp_path: Path) -> None:
    raw = {
        "auth": {"secret_file": "x"},
        "tasks": [{"privacy": {"enabled": True, "clipping": "adaptive"}}],
    }
    with pytest.raises(ConfigError) as exc:
        build_config(ServiceConfig, raw)
    assert "population" in str(exc.value) and "clipping" in str(exc.value)


def test_server_clips_again_whatever_the_client_sent(tmp_path: Path) -> None:
    from asyncfl.service.store import Store
    from asyncfl.service.task import TaskRuntime

    store = Store(tmp_path / "l.sqlite")
    rt = TaskRuntime(_config(tmp_path).tasks[0], store, tmp_path / "ck")
    big = np.random.default_rng(4).normal(0, 1.0, DIM).astype(np.float32)  # norm ~ 25
    rt.submit(1, "u", 0, 3, big)
    (row,) = store.rows("dp", "buffered")
    assert row.delta is not None
    assert np.linalg.norm(row.delta.astype(np.float64)) <= C * (1 + 1e-6)
    # Rescaled, not replaced: the direction is the client's.
    cos = row.delta @ big / (np.linalg.norm(row.delta) * np.linalg.norm(big))
    assert cos == pytest.approx(1.0, abs=1e-6)
