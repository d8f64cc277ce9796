"""Benchmark FedBuff over LightSecAgg (no TEE) against plain FedBuff: server, user, bytes.

Usage: .venv/bin/python bench/lightsecagg.py [--quick] [--out docs/benchmarks/lightsecagg.md]

(A separate script rather than a section of ``bench/secure_buffer.py``, which was being
reworked for speed at the same time; its TEE table is the comparison point.)

Per buffer of K contributions from distinct users of a group of N (T = N/4, U = N/2), it
times: the contributing user (fresh mask, Lagrange-encode N shares, encrypt N - 1, mask the
update), one receiving user (decrypt and keep one share), the server per step (K weighted
accumulations + decoding the aggregate mask from U shares + the SGD step) against plain
``FedBuff.on_update`` x K, and one answering user (its weighted sum of K shares). Bytes are
the messages' wire sizes. Inputs are random field vectors; the server step is SGD.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from asyncfl.algorithms.fedbuff import FedBuff, FedBuffConfig
from asyncfl.algorithms.lightsecagg_fedbuff import LightSecAggFedBuff
from asyncfl.core.server_opt import ServerOptimizerConfig, make_server_optimizer
from asyncfl.core.update import Update
from asyncfl.secure.lightsecagg import (
    FieldCodec,
    LightSecAggGroup,
    LightSecAggParams,
    LightSecAggServer,
)
from common import write_markdown


def run_case(d: int, n: int, k: int, steps: int) -> dict[str, float]:
    prm = LightSecAggParams(n, n // 4, n // 2, d, min_contributions=k)
    server = LightSecAggServer(prm, b"bench")
    codec = FieldCodec(clip=1.0, frac_bits=16)
    cfg = FedBuffConfig(buffer_size=k)
    opt = ServerOptimizerConfig()
    p0 = np.zeros(d, np.float32)
    secure = LightSecAggFedBuff(
        cfg, p0, make_server_optimizer(opt, d), server=server, codec=codec, weight_bits=6
    )
    plain = FedBuff(cfg, p0, make_server_optimizer(opt, d))
    group = LightSecAggGroup(server)
    rng = np.random.default_rng(0)
    rows: dict[str, list[float]] = {
        k_: [] for k_ in ("plain", "server", "mask", "recv", "answer", "up", "share_up")
    }
    for _ in range(steps):
        deltas = [rng.normal(0, 0.1, d).astype(np.float32) for _ in range(k)]
        t0 = time.perf_counter()
        for i, delta in enumerate(deltas):
            plain.on_update(Update(i, plain.version, 1, delta))
        rows["plain"].append(time.perf_counter() - t0)
        ups = []
        for i, delta in enumerate(deltas):
            user = group.users[i]
            t0 = time.perf_counter()
            msg = user.prepare_mask()
            up = user.upload(
                msg.contribution,
                codec.encode(delta, rng),
                base_version=secure.version,
                num_examples=1,
            )
            rows["mask"].append(time.perf_counter() - t0)
            rows["up"].append(up.wire_bytes + msg.wire_bytes)
            rows["share_up"].append(msg.wire_bytes)
            routed = secure.route(msg)
            for j, share in routed.items():
                t0 = time.perf_counter()
                group.users[j].on_shares([share])
                if j == n - 1 or (i == n - 1 and j == n - 2):
                    rows["recv"].append(time.perf_counter() - t0)
            ups.append(up)
        server_s = 0.0
        t0 = time.perf_counter()
        for up in ups:
            secure.on_masked_update(up)
        server_s += time.perf_counter() - t0
        req = secure.take_request()
        assert req is not None
        stepped = False
        for j in range(n - 1, -1, -1):  # the contributors answer last
            t0 = time.perf_counter()
            answer = group.users[j].on_aggregate_request(req)
            rows["answer"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = secure.on_aggregate_share(answer)
            server_s += time.perf_counter() - t0
            if out is not None:
                stepped = out.step is not None
                break
        assert stepped
        rows["server"].append(server_s)
    med = {k_: statistics.median(v) for k_, v in rows.items()}
    return med


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/lightsecagg.md"))
    args = ap.parse_args()
    cases = (
        [(100_000, 20, 10)]
        if args.quick
        else [(100_000, 20, 10), (100_000, 100, 10), (1_000_000, 20, 10), (1_000_000, 100, 10)]
    )
    steps = 2 if args.quick else 3
    lines = [
        "Field p = 2^32 - 5, 16 fractional bits, 6 weight bits; T = N/4, U = N/2; server SGD; "
        "median over steps. Server ms/step = K weighted accumulations + one-shot decoding "
        "from U shares + the step (plain: K FedBuff.on_update incl. the step).",
        "",
        "| params | N | K | plain ms/step | LightSecAgg server ms/step | ratio | user ms/update "
        "(mask+encode+encrypt) | receiver ms/share | answer ms/buffer | user MB up/update "
        "(of which shares) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d, n, k in cases:
        m = run_case(d, n, k, steps)
        lines.append(
            f"| {d:,} | {n} | {k} | {1e3 * m['plain']:.1f} | {1e3 * m['server']:.1f} | "
            f"{m['server'] / m['plain']:.2f}x | {1e3 * m['mask']:.1f} | {1e3 * m['recv']:.2f} | "
            f"{1e3 * m['answer']:.2f} | {m['up'] / 1e6:.2f} ({m['share_up'] / 1e6:.2f}) |"
        )
    lines += [
        "",
        "Each user also downloads one share per contribution of every other user "
        "(4 d / (U - T) bytes each) and uploads one aggregated share of the same size per "
        "buffer it helps unmask. The TEE buffer (docs/benchmarks/secure_buffer.md) uploads "
        "8 d bytes per update and nothing else.",
    ]
    write_markdown(args.out, "LightSecAgg (no TEE) vs plain FedBuff", lines)


if __name__ == "__main__":
    main()
