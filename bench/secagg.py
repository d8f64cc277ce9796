"""Benchmark one full SecAgg / SecAgg+ round on this machine (all clients + server, in-process).

Usage: .venv/bin/python bench/secagg.py [--quick] [--out docs/benchmarks/secagg.md]

Reports wall time of one round split by stage (client compute summed over clients, server
compute), bytes per client, the PRG throughput and the Shamir split time. SecAgg+ degree and
threshold come from ``choose_parameters(n, corrupt_fraction, dropout_fraction=0.1, sigma=40,
eta=30)``. Cases whose estimated time exceeds ``--max-seconds`` are skipped and listed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
from pathlib import Path

import numpy as np

from asyncfl.secure import shamir
from asyncfl.secure.prg import MaskExpander
from asyncfl.secure.ring import Ring
from asyncfl.secure.secagg.config import SecAggConfig, Stage
from asyncfl.secure.secagg.driver import run_secagg_round
from asyncfl.secure.secagg.graph import choose_parameters

CORRUPT = 0.05
DROPOUT_DESIGN = 0.1


def prg_throughput(ring_bits: int, length: int, reps: int) -> float:
    ring = Ring(ring_bits)
    exp = MaskExpander(ring, length)
    acc = ring.zeros(length)
    seeds = [os.urandom(32) for _ in range(reps)]
    t0 = time.perf_counter()
    for s in seeds:
        exp.accumulate(acc, s)
    return reps * length * ring.dtype.itemsize / (time.perf_counter() - t0) / 1e9


def shamir_ms(n: int) -> float:
    xs = list(range(1, n + 1))
    secret = os.urandom(32)
    t0 = time.perf_counter()
    for _ in range(50):
        shamir.split_bytes(secret, xs, n // 2 + 1)
    return (time.perf_counter() - t0) / 50 * 1e3


def run_case(
    n: int, d: int, drop: float, plus: bool, rng: np.random.Generator
) -> dict[str, object]:
    ids = list(range(n))
    if plus:
        params = choose_parameters(n, CORRUPT, DROPOUT_DESIGN)
        cfg = SecAggConfig.secagg_plus(ids, d, params, rng)
        label = f"SecAgg+ (k={params.degree}, t={params.threshold})"
    else:
        cfg = SecAggConfig.secagg(ids, d)
        label = f"SecAgg (t={cfg.threshold})"
    inputs = {u: rng.integers(0, 2**32, d, dtype=np.uint64).astype(np.uint32) for u in ids}
    dropped = set(rng.choice(n, int(drop * n), replace=False).tolist())
    t0 = time.perf_counter()
    res = run_secagg_round(inputs, cfg, {Stage.MASKED_INPUT: dropped})
    wall = time.perf_counter() - t0
    assert res.sum is not None, res.failure
    expected = np.zeros(d, dtype=np.uint32)
    for u in res.survivors:
        expected += inputs[u]
    assert np.array_equal(res.sum, expected), "wrong sum"
    live = [u for u in ids if u not in dropped]
    stage = {s: res.client_seconds[s] + res.server_seconds[s] for s in Stage}
    return {
        "protocol": label,
        "n": n,
        "d": d,
        "drop": drop,
        "wall": wall,
        "stage": stage,
        "server": sum(res.server_seconds.values()),
        "up": np.mean([res.bytes_up[u] for u in live]),
        "down": np.mean([res.bytes_down[u] for u in live]),
    }


def estimate(n: int, d: int, plus: bool, gbps: float) -> float:
    k = choose_parameters(n, CORRUPT, DROPOUT_DESIGN).degree if plus else n - 1
    # Every client expands k + 1 masks; ~70 us per key agreement, 2 per neighbour.
    return n * ((k + 1) * d * 4 / (gbps * 1e9) + 2 * k * 70e-6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="only n=100, d=100k")
    ap.add_argument("--out", default="docs/benchmarks/secagg.md")
    ap.add_argument("--max-seconds", type=float, default=120.0)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    gbps32 = prg_throughput(32, 1_000_000, 20)
    gbps64 = prg_throughput(62, 1_000_000, 20)
    split100 = shamir_ms(100)
    sizes = (
        [(100, 100_000)]
        if args.quick
        else [(100, 100_000), (100, 1_000_000), (500, 100_000), (500, 1_000_000)]
    )
    rows, skipped = [], []
    for n, d in sizes:
        for plus in (True, False):
            for drop in (0.0, 0.1):
                est = estimate(n, d, plus, gbps32)
                name = f"{'SecAgg+' if plus else 'SecAgg'} n={n} d={d} drop={drop:.0%}"
                if est > args.max_seconds:
                    skipped.append(f"{name} (estimated {est:.0f} s > {args.max_seconds:.0f} s)")
                    continue
                row = run_case(n, d, drop, plus, rng)
                print(f"{name}: {row['wall']:.2f} s", flush=True)
                rows.append(row)
    lines = [
        "# SecAgg benchmark",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}",
        "- one process, all clients then the server run sequentially; ring Z_2^32 (uint32);",
        f"  SecAgg+ parameters from choose_parameters(n, corrupt={CORRUPT}, "
        f"dropout={DROPOUT_DESIGN}, sigma=40, eta=30); dropouts happen before MaskedInput",
        f"- PRG (AES-256-CTR expand + add): {gbps32:.2f} GB/s into uint32, "
        f"{gbps64:.2f} GB/s into uint64",
        f"- Shamir split of a 32-byte secret, n=100, t=51: {split100:.2f} ms",
        "",
        "| protocol | n | d | dropout | round wall s | advertise s | share keys s "
        "| masked input s | unmasking s | of which server s | up B/client | down B/client |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        st = r["stage"]
        assert isinstance(st, dict)
        lines.append(
            f"| {r['protocol']} | {r['n']} | {r['d']:,} | {r['drop']:.0%} | {r['wall']:.2f} | "
            + " | ".join(f"{st[s]:.3f}" for s in Stage)
            + f" | {r['server']:.3f} | {r['up']:,.0f} | {r['down']:,.0f} |"
        )
    if skipped:
        lines += ["", "Skipped (too slow for this run):", *[f"- {s}" for s in skipped]]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
