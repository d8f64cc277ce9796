"""Benchmark FedBuff with the TEE secure buffer against plain FedBuff (server and client cost).

Usage: .venv/bin/python bench/secure_buffer.py [--quick] [--out docs/benchmarks/secure_buffer.md]

Per server step (K updates + the step) it times the server side: plain ``FedBuff.on_update``
versus ``SecureFedBuff.on_masked_update``, which includes the enclave's work (unsealing the
seed, expanding the mask with AES-CTR, accumulating it, releasing the unmasking) because the
enclave runs on the server machine. The in-process backend measures the compute; the
subprocess backend adds the process boundary (frames over a socketpair). Client-side
overhead is ``TeeClient.upload`` per update (verify the report, encode, mask, seal) against
nothing for a plain upload. Clients' deltas are random; the server step is SGD.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from asyncfl.algorithms.fedbuff import FedBuff, FedBuffConfig
from asyncfl.algorithms.secure_fedbuff import SecureFedBuff
from asyncfl.core.server_opt import ServerOptimizerConfig, make_server_optimizer
from asyncfl.core.update import Update
from asyncfl.secure.fixedpoint import FixedPointCodec
from asyncfl.secure.tee import (
    EnclaveConfig,
    InProcessBackend,
    SimulatedVendor,
    SubprocessBackend,
    TeeClient,
    expected_measurement,
)
from common import write_markdown

RING_BITS, FRAC_BITS, WEIGHT_BITS = 62, 24, 12
NOTE = (
    "The target is missed (1.9x to 8.7x). This machine has 2 cores shared with other "
    "jobs, so single rows vary by up to 2x between runs; the ratio is nonetheless wel"
    "l above 1.3x everywhere. The subprocess rows add the boundary: a socket round tr"
    "ip per arrival and the model-sized unmasking frame per step. Not tried yet: over"
    "lapping the enclave with the aggregator (the enclave process works while the agg"
    "regator adds the masked vector) and a 32-bit ring for small K."
)


def run_case(d: int, k: int, steps: int, backend_kind: str) -> dict[str, float]:
    rng = np.random.default_rng(0)
    cfg = FedBuffConfig(buffer_size=k)
    p0 = np.zeros(d, np.float32)
    opt = ServerOptimizerConfig()
    vendor = SimulatedVendor.generate()
    ecfg = EnclaveConfig("bench", d, RING_BITS, FRAC_BITS, 1.0, WEIGHT_BITS, k, 1 << WEIGHT_BITS)
    backend = (
        SubprocessBackend(ecfg, vendor)
        if backend_kind == "subprocess"
        else InProcessBackend(ecfg, vendor)
    )
    codec = FixedPointCodec(1.0, FRAC_BITS, RING_BITS)
    plain = FedBuff(cfg, p0, make_server_optimizer(opt, d))
    secure = SecureFedBuff(
        cfg,
        p0,
        make_server_optimizer(opt, d),
        backend=backend,
        codec=codec,
        weight_bits=WEIGHT_BITS,
    )
    client = TeeClient(
        vendor_public=vendor.public,
        expected=expected_measurement(ecfg),
        codec=codec,
        task="bench",
        dim=d,
    )
    delta = (rng.standard_normal(d) * 0.01).astype(np.float32)
    plain_s, secure_s, client_s = [], [], []
    cid = 0
    for _ in range(steps):
        t_plain = t_secure = 0.0
        for _ in range(k):
            base = max(plain.version - 1, 0)  # some staleness, as in FedBuff
            up = Update(cid, base, 10, delta)
            t0 = time.perf_counter()
            plain.on_update(up)
            t_plain += time.perf_counter() - t0
            t0 = time.perf_counter()
            masked = client.upload(
                secure.report,
                client_id=cid,
                base_version=base,
                num_examples=10,
                delta=delta,
                rng=rng,
            )
            client_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = secure.on_masked_update(masked)
            t_secure += time.perf_counter() - t0
            assert out.accepted, out
            cid += 1
        plain_s.append(t_plain)
        secure_s.append(t_secure)
    backend.close()
    return {
        "plain_ms": statistics.median(plain_s) * 1e3,
        "secure_ms": statistics.median(secure_s) * 1e3,
        "client_ms": statistics.median(client_s) * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/secure_buffer.md"))
    args = ap.parse_args()
    rows = []
    for d in (100_000, 1_000_000):
        for k in (10, 100):
            steps = 2 if args.quick or d * k >= 10**8 else 4
            for kind in ("inprocess", "subprocess"):
                if kind == "subprocess" and k == 100 and d == 1_000_000 and args.quick:
                    continue
                r = run_case(d, k, steps, kind)
                ratio = r["secure_ms"] / r["plain_ms"]
                rows.append(
                    f"| {d:,} | {k} | {kind} | {r['plain_ms']:.1f} | {r['secure_ms']:.1f} | "
                    f"{ratio:.2f}x | {r['client_ms']:.2f} |"
                )
                print(rows[-1], flush=True)
    lines = [
        f"Ring 2^{RING_BITS} (uint64), {FRAC_BITS} fractional bits, {WEIGHT_BITS} weight bits; "
        "server SGD; median over steps. Server time per step = K arrivals + the step, "
        "including the enclave's work (it runs on the server).",
        "",
        "| params | K | enclave | plain FedBuff ms/step | secure buffer ms/step | ratio | "
        "client overhead ms/update |",
        "|---:|---:|---|---:|---:|---:|---:|",
        *rows,
        "",
        "Target was within 1.3x of plain FedBuff per server step. Where a row misses it, the "
        "cost is per arrival and linear in the model size: the enclave expands an AES-CTR mask "
        "(8 bytes/parameter) and multiply-adds it, and the aggregator multiply-adds a uint64 "
        "vector, against one float32 axpy for plain FedBuff.",
        "",
        NOTE,
    ]
    write_markdown(args.out, "Secure buffer (TEE) vs plain FedBuff", lines)


if __name__ == "__main__":
    main()
