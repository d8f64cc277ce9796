"""FedAvg rounds through the service with and without SecAgg: wall time per round.

Usage: .venv/bin/python bench/service_secagg.py [--clients 10 20] [--dims 10000 100000]
       [--rounds 3] [--modes none secagg secagg+]

An in-process server on 127.0.0.1 (plaintext gRPC) and ``n`` clients as asyncio tasks of this
process; "training" returns a fixed random delta at once, so the time is the protocol's and
the service's: check-in, download, then an upload (none) or join + four SecAgg stages
(client key agreement, Shamir sharing, encryption, mask expansion; server routing and
unmasking), then the step's checkpoint and ledger commit. Cohort = n, no over-selection, so
every round has all n clients. Clients and server share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from asyncfl.core.configload import build_config
from asyncfl.core.update import FloatVector
from asyncfl.service.auth import Secret
from asyncfl.service.client import ClientOptions, TrainResult, run_client_async
from asyncfl.service.config import ServiceConfig
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
from asyncfl.service.server import start_server


class _Fixed:
    def __init__(self, dim: int, client: int) -> None:
        rng = np.random.default_rng(client)
        self.delta = rng.normal(0, 0.01, dim).astype(np.float32)

    def __call__(self, params: FloatVector, version: int, assignment: pb.Assignment) -> TrainResult:
        return TrainResult(self.delta, 10)


async def _run(tmp: Path, mode: str, n: int, dim: int, rounds: int) -> float:
    (tmp / "secret").write_text(secrets.token_hex(32))
    features = dim // 10 - 1  # logistic regression, 10 classes: 10 * features + 10 parameters
    task: dict[str, Any] = {
        "id": "b",
        "input_shape": [features],
        "num_classes": 10,
        "model": {"name": "logistic"},
        "algorithm": {"name": "fedavg", "cohort_size": n},
        "max_server_steps": rounds,
        "secure_aggregation": {"mode": mode},
    }
    cfg = build_config(
        ServiceConfig,
        {
            "server": {"host": "127.0.0.1", "port": 0, "insecure": True},
            "auth": {"secret_file": str(tmp / "secret")},
            "storage": {"dir": str(tmp / "state")},
            "selector": {"retry_after_s": 0.01},
            "tasks": [task],
        },
    )
    secret = Secret.from_file(tmp / "secret")
    h = await start_server(cfg)
    try:
        real_dim = h.coordinator.tasks["b"].runtime.dim
        opts = [
            ClientOptions(
                address=f"127.0.0.1:{h.port}",
                token=secret.token(str(c)),
                client_id=c,
                num_examples=10,
                task_id="b",
                backoff_base_s=0.01,
            )
            for c in range(n)
        ]
        t0 = time.perf_counter()
        await asyncio.gather(*(run_client_async(o, _Fixed(real_dim, o.client_id)) for o in opts))
        wall = time.perf_counter() - t0
        assert h.coordinator.tasks["b"].runtime.version == rounds
    finally:
        await h.stop()
    return wall / rounds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--dims", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["none", "secagg", "secagg+"])
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {platform.python_version()}")
    print("| clients | parameters | mode | seconds per round |")
    print("|---|---|---|---|")
    for n in args.clients:
        for dim in args.dims:
            for mode in args.modes:
                with tempfile.TemporaryDirectory() as tmp:
                    per_round = asyncio.run(_run(Path(tmp), mode, n, dim, args.rounds))
                print(f"| {n} | {dim:,} | {mode} | {per_round:.2f} |", flush=True)


if __name__ == "__main__":
    main()
