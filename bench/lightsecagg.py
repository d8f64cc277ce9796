"""Benchmark FedBuff over LightSecAgg (no TEE) against plain FedBuff: server, user, bytes.

Usage: .venv/bin/python bench/lightsecagg.py [--quick] [--out docs/benchmarks/lightsecagg.md]

``contribute`` and ``unmask`` drive one buffer through the protocol with per-party timings;
``bench/secure_buffer.py`` reuses them for its ``lightsecagg`` backend (beside the TEE buffer,
with the product's T and U). This script keeps its own cases (T = N/4, U = N/2, 6 weight bits).

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from asyncfl.algorithms.fedbuff import FedBuff, FedBuffConfig
from asyncfl.algorithms.lightsecagg_fedbuff import LightSecAggFedBuff
from asyncfl.core.server_opt import ServerOptimizerConfig, make_server_optimizer
from asyncfl.core.update import FloatVector, Update
from asyncfl.secure.lightsecagg import (
    FieldCodec,
    LightSecAggGroup,
    LightSecAggParams,
    LightSecAggServer,
    MaskedUpload,
)
from common import write_markdown


class Clock:
    """Wall and this thread's CPU time, summed over the sections timed with ``with``."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0
        self._t0 = self._c0 = 0.0

    def __enter__(self) -> Clock:
        self._t0, self._c0 = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._t0
        self.cpu += time.thread_time() - self._c0


@dataclass
class BufferCost:
    """One buffer of K contributions through the whole protocol, timed by party."""

    route: Clock = field(default_factory=Clock)
    """Server: checking and routing each contribution's N - 1 encrypted shares."""
    server: Clock = field(default_factory=Clock)
    """Server: K weighted accumulations of masked uploads, then U aggregated shares, the
    one-shot decoding of the aggregate mask, unmasking and the server step."""
    client_s: list[float] = field(default_factory=list)
    """Per contribution: encode, fresh mask, Lagrange-code N shares, encrypt N - 1, mask."""
    receive_s: list[float] = field(default_factory=list)
    """Per delivered share: decrypt and keep it (the receiving user)."""
    answer_s: list[float] = field(default_factory=list)
    """Per user: its aggregated share of the buffer (every user of the group answers)."""
    up_bytes: list[int] = field(default_factory=list)
    """Per contribution: masked upload + encrypted shares, wire bytes."""
    share_bytes: list[int] = field(default_factory=list)
    """Per contribution: the encrypted shares alone."""


def contribute(
    agg: LightSecAggFedBuff,
    group: LightSecAggGroup,
    deltas: Sequence[FloatVector],
    base_version: int,
    rng: np.random.Generator,
) -> tuple[list[MaskedUpload], BufferCost]:
    """Users ``0..K-1`` each contribute one delta: their masked uploads, not yet delivered."""
    cost = BufferCost()
    ups = []
    for i, delta in enumerate(deltas):
        user = group.users[i]
        t0 = time.perf_counter()
        msg = user.prepare_mask()
        x = agg.codec.encode(delta, rng)
        up = user.upload(msg.contribution, x, base_version=base_version, num_examples=1)
        cost.client_s.append(time.perf_counter() - t0)
        cost.up_bytes.append(up.wire_bytes + msg.wire_bytes)
        cost.share_bytes.append(msg.wire_bytes)
        with cost.route:
            routed = agg.route(msg)
        for j, share in routed.items():
            t0 = time.perf_counter()
            group.users[j].on_shares([share])
            cost.receive_s.append(time.perf_counter() - t0)
        ups.append(up)
    return ups, cost


def unmask(
    agg: LightSecAggFedBuff, group: LightSecAggGroup, ups: Sequence[MaskedUpload], cost: BufferCost
) -> None:
    """The server buffers ``ups`` (K of them: the buffer closes), every user answers its
    aggregated share, and the server takes answers until the U-th decodes and steps. The
    users' answers are computed before the server sees any (the server's time is the same)."""
    with cost.server:
        for up in ups:
            agg.on_masked_update(up)
        req = agg.take_request()
    assert req is not None, "the buffer did not close: len(ups) < buffer_size"
    answers = []
    for user in reversed(group.users):  # the contributors (the first K) answer last
        t0 = time.perf_counter()
        answers.append(user.on_aggregate_request(req))
        cost.answer_s.append(time.perf_counter() - t0)
    out = None
    with cost.server:
        for answer in answers:
            out = agg.on_aggregate_share(answer)
            if out is not None:
                break
    assert out is not None and out.step is not None, out


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
        ups, cost = contribute(secure, group, deltas, secure.version, rng)
        unmask(secure, group, ups, cost)
        rows["server"].append(cost.server.wall)
        rows["mask"] += cost.client_s
        rows["recv"] += cost.receive_s
        rows["answer"] += cost.answer_s
        rows["up"] += cost.up_bytes
        rows["share_up"] += cost.share_bytes
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
