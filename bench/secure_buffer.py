"""Benchmark FedBuff's secure buffers (TEE, LightSecAgg) against plain FedBuff (server, client).

Usage: .venv/bin/python bench/secure_buffer.py [--repeats 3] [--steps 4] [--quick]
       [--modes ...] [--lightsecagg-users 100] [--lightsecagg-large]
       [--out docs/benchmarks/secure_buffer.md]

Server time per step = K arrivals + the step, for plain ``FedBuff.on_update`` (the product's
path: validation, weighted float32 sum, server SGD) and ``SecureFedBuff.on_masked_update``
including the enclave's work (seal opening, AES-CTR mask expansion and accumulation, the
release), because the enclave runs on the server machine. Each step's K uploads are prepared
first (client time, measured apart: ``TeeClient.upload`` = verify the report, encode, mask,
seal) and then arrive back to back, alternating plain and secure step by step. Every update
is its own array for both aggregators (as when each arrives from the network); the old
version of this benchmark fed plain FedBuff one shared, cache-resident delta, which is
reported apart for comparison.

Rings: the product's default codec (``SecureAggregationConfig()``: f = 24, S = 12, clip 1, ring
2^62) and a coarser one (f = 16, S = 8); in both the ring is the one the product picks,
``with_smallest_ring`` (uint32 storage when a full release fits 31 bits, else the configured
ring in uint64). Server modes: the enclave in process (the default ``tee_backend``: one
thread does everything), in its own process (``subprocess``) with the aggregator waiting for
each registration's answer (the default ``pipeline = 0``), and in its own process with
pipelined registrations (``pipeline = 8``: answers are read when they are in, all before a
release).

Backend ``lightsecagg`` (no TEE): ``LightSecAggFedBuff`` and a group of N users (default 100)
built by the simulator's ``build_lightsecagg_aggregator`` with the product's T and U
fractions; users ``0..K-1`` contribute (``contribute`` in ``bench/lightsecagg.py``: encode,
fresh mask, Lagrange-code, encrypt, mask; the other users decrypt their shares), then the
server time covers routing the shares, the K masked uploads, the U aggregated shares with the
one-shot decoding, and the step (``unmask``); all N users answer, each timed as device work
per buffer. Only codecs whose full weighted sum fits the field (p = 2^32 - 5) run, and cases
with params x K above ``LSA_LARGE`` only with ``--lightsecagg-large`` (1M x K = 100 adds
about five minutes to the default run's four, and ~4 GB of held shares).

Reported per step: wall time (the target's measure), the aggregator's CPU time (this thread)
and the enclave process's CPU time (``/proc/PID/schedstat``), medians over steps and then over
repeats; each repeat runs every configuration once, interleaved, so slow phases of a shared
machine hit all of them. BLAS runs one thread (see ``main``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from threadpoolctl import threadpool_limits

from asyncfl.algorithms.fedbuff import FedBuff, FedBuffConfig
from asyncfl.algorithms.secure_fedbuff import SecureFedBuff
from asyncfl.core.server_opt import ServerOptimizerConfig, make_server_optimizer
from asyncfl.core.update import FloatVector, Update
from asyncfl.secure.crypto import KeyPair
from asyncfl.secure.fixedpoint import FixedPointCodec
from asyncfl.secure.lightsecagg import (
    ContributionId,
    EncryptedMaskShare,
    FieldCodec,
    LagrangeCode,
    LightSecAggParams,
    LightSecAggServer,
    MaskedUpload,
    MaskShares,
    P,
)
from asyncfl.secure.prg import MaskExpander
from asyncfl.secure.ring import Ring
from asyncfl.secure.tee import (
    EnclaveBackend,
    EnclaveConfig,
    InProcessBackend,
    MaskedUpdate,
    SimulatedVendor,
    SubprocessBackend,
    TeeClient,
    expected_measurement,
)
from asyncfl.secure.tee.enclave import enclave_config_builder, pick_ring
from asyncfl.secure.tee.sealing import SeedContext, open_seed, seal_seed
from asyncfl.sim.lightsecagg_buffer import build_lightsecagg_aggregator
from asyncfl.sim.secure_rounds import SecureAggregationConfig
from common import write_markdown
from lightsecagg import BufferCost, contribute, unmask

TARGET = 1.3
NOTE = [
    "**Where the time goes** (the breakdown table above; per arrival). Plain FedBuff reads the "
    "float32 delta three times: a float64 sum for finiteness, max/min for the overflow check, "
    "the weighted add. The secure buffer's aggregator reads the masked upload once (the ring "
    "range check is fused into its chunked multiply-add) and asks the enclave to register the "
    "sealed seed. The enclave opens the seed (X25519 + HKDF + AES-GCM: a fixed ~0.04 ms), "
    "generates the AES-256-CTR keystream of the mask (4 bytes per parameter in the 32-bit "
    "ring, 8 in the 62-bit one, at ~8 GB/s on this CPU) and adds it, weighted, into its "
    "accumulator; a release writes minus that sum (plus noise under DP) into the shared output "
    "region, and the aggregator adds it to its masked sum, decodes and steps.",
    "",
    "In process all of it runs on one core, one part after the other. In the subprocess modes "
    "the enclave expands masks in its own process, between requests, and the aggregator never "
    "waits for a mask (with `pipeline` it does not wait for the seed to be opened either), so "
    "the wall time can approach the larger of the two CPU times, *if a second core is free*. "
    "On this shared machine other jobs held the second core most of the time (load averages "
    "above), the two processes then ran largely one after the other, and the wall ratio sits "
    "near the CPU ratio; the free-core bound column is what the same CPU times allow when each "
    "party has a core.",
    "",
    "**Codecs.** `default` is the product default: f = 24, S = 12 configured, and "
    "`tee_fit_ring32` (on by default) lowers them a bit at a time until a full release fits "
    "the 2^32 ring (the ring column shows what was used: 19/8 at K = 10, 16/8 at K = 100; it "
    "fits up to K = 127 at clip 1). `exact` is `tee_fit_ring32: false`: f = 24, S = 12 need "
    "the 2^62 ring, where the enclave's keystream alone is 8 bytes per parameter per arrival, "
    "about plain FedBuff's whole arrival. `coarse` (16/8) is what LightSecAgg's field needs.",
    "",
    "**What cannot be bought back.** (1) At 100k parameters the enclave's necessary work per "
    "update, opening the sealed seed (one X25519 agreement + HKDF + AES-GCM, ~0.04 ms) plus "
    "the 32-bit AES-256-CTR mask (~0.07 ms), is ~1.4x plain FedBuff's whole arrival "
    "(~0.085 ms), so the enclave's core alone stays above 1.3x even when the aggregator's "
    "work is hidden on another core; at 1M the mask dominates and the ratio approaches the "
    "larger CPU time. (2) With `tee_fit_ring32: false` (or K > 127) the 2^62 ring doubles the "
    "keystream and the aggregator's pass. (3) Both parties' memory traffic competes for one "
    "memory bus. Not done, on purpose: AES-128 masks (1.14x faster keystream, but half the "
    "seed's security level), key-homomorphic or reused masks (the server would learn "
    "combinations of updates), more than one enclave core (plain FedBuff would deserve as "
    "many), a per-device session key to skip the X25519 (it helps only devices that "
    "contribute again to the same enclave boot; every arrival here is a new device).",
    "",
    "**LightSecAgg** (the breakdown's last rows). No enclave: the server's whole share runs "
    "in the aggregator's thread. Per arrival, `LightSecAggServer.on_masked_upload` checks "
    "the upload is in the field and adds `w y` into a uint64 accumulator with no reduction "
    "(w, y < p < 2^32, so a product fits 64 bits and the running bound is reduced mod p "
    "only when the next product could overflow, and once at close): ~0.07 ms at 100k and "
    "~1.3 ms at 1M, about plain FedBuff's whole arrival (until 2026-11-25 it reduced twice "
    "per element, ~5 ms at 1M). Once per step the server decodes the aggregate mask from U "
    "= 50 aggregated shares, a (U - T) x U matrix applied to pieces of d / (U - T) elements "
    "(~4 ms at 100k, ~40 ms at 1M), which now dominates a step at K = 10 (5-6x plain); at K "
    "= 100 the step is ~2.6x plain at 100k. The devices pay more than the server: a "
    "contributing device spends ~16 ms (100k) to ~180 ms (1M) per update, ~20x the TEE "
    "client, most of it the N x U Lagrange coding of its mask (float64 BLAS on 16-bit "
    "limbs, one thread here), and sends 4 d (1 + (N - 1) / (U - T)) bytes, ~5x the TEE "
    "client's 4 d (32-bit ring); every member also decrypts one share per other "
    "contribution and answers once per buffer (the client ms/buffer column).",
]
PIPELINE = 8
DEFAULT = SecureAggregationConfig()
# (label, frac bits, weight bits): the product default and a coarser codec whose full
# release fits 31 bits, so the product picks the uint32 ring for it.
# "default" and "coarse" go through the product's `tee_fit_ring32` (default on: f and S are
# lowered until a full release fits the 2^32 ring); "exact" keeps f = 24, S = 12 (the config
# `tee_fit_ring32: false`), so its ring is 2^62.
CODECS = (
    ("default", DEFAULT.frac_bits, DEFAULT.weight_bits),
    ("exact", DEFAULT.frac_bits, DEFAULT.weight_bits),
    ("coarse", 16, 8),
)
TEE_MODES = ("inprocess", "subprocess", "subprocess+pipeline")
LSA = "lightsecagg"
MODES = (*TEE_MODES, LSA)
# N for the lightsecagg rows: a group of 100 devices, so K = 100 means every member
# contributes to every buffer; T and U come from the product's default fractions.
LSA_USERS = 100
# lightsecagg cases above this many parameters x K run only with --lightsecagg-large: at 1M x
# K = 100 the devices' side alone (100 contributions of ~0.16 s each, 9,900 share decryptions,
# 100 answers) takes ~30 s per step and ~4 GB for the users' held shares.
LSA_LARGE = 10**7
# Distinct input arrays the breakdown cycles through: more than the last-level cache holds, as
# for uploads arriving from the network.
_ROTATE = 12


@dataclass(frozen=True)
class Case:
    codec: str
    frac_bits: int
    weight_bits: int
    dim: int
    k: int
    mode: str
    """A TEE mode (``TEE_MODES``) or ``lightsecagg``."""
    users: int = 0
    """lightsecagg: N, the group (T and U from the product's default fractions)."""

    @property
    def label(self) -> str:
        if self.mode != LSA:
            return f"tee {self.mode}"
        prm = _lsa_default_params(self.users, self.dim)
        return f"lightsecagg N={prm.num_users} T={prm.privacy_threshold} U={prm.target_survivors}"


@dataclass
class Run:
    ring: str
    plain_ms: float
    plain_cpu_ms: float
    plain_shared_ms: float
    secure_ms: float
    agg_cpu_ms: float
    enclave_cpu_ms: float | None
    client_ms: float
    buffer_client_ms: float | None
    """lightsecagg: one user's work per buffer (decrypt its K shares, answer), mean over N."""
    up_mb: float
    ratio: float
    cpu_ratio: float
    free_core_ratio: float | None


def _enclave_cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


Cols = dict[str, list[float]]


class Side(Protocol):
    """One secure backend of a case: devices prepare K uploads, then the server takes them."""

    ring: str
    version: int

    def prepare(self, deltas: list[FloatVector], base: int, cid: int, cols: Cols) -> None: ...

    def serve(self, cols: Cols) -> None: ...

    def close(self) -> None: ...


def tee_enclave_config(case: Case) -> EnclaveConfig:
    """The enclave config the product builds for this codec (service: `enclave_config_for`;
    equal example weights, so the largest weight is 2^S); "exact" is `tee_fit_ring32: false`."""
    make = enclave_config_builder(
        task="bench", dim=case.dim, clip=DEFAULT.clip, min_contributions=case.k
    )
    exact = make(case.frac_bits, case.weight_bits, DEFAULT.ring_bits)
    return pick_ring(make, exact, fit=case.codec != "exact")


class TeeSide:
    """``SecureFedBuff`` with the enclave in process or in its own process."""

    def __init__(self, case: Case, cfg: FedBuffConfig, p0: FloatVector) -> None:
        d = case.dim
        vendor = SimulatedVendor.generate()
        ecfg = tee_enclave_config(case)
        self.backend: EnclaveBackend = (
            InProcessBackend(ecfg, vendor)
            if case.mode == "inprocess"
            else SubprocessBackend(ecfg, vendor)
        )
        self.pid = self.backend.pid if isinstance(self.backend, SubprocessBackend) else None
        self.ring = f"{ecfg.ring_bits} (f/S {ecfg.frac_bits}/{ecfg.weight_bits})"
        codec = FixedPointCodec(DEFAULT.clip, ecfg.frac_bits, ecfg.ring_bits)
        self.secure = SecureFedBuff(
            cfg,
            p0,
            make_server_optimizer(ServerOptimizerConfig(), d),
            backend=self.backend,
            codec=codec,
            weight_bits=ecfg.weight_bits,
            pipeline=PIPELINE if case.mode.endswith("pipeline") else 0,
        )
        self.client = TeeClient(
            vendor_public=vendor.public,
            expected=expected_measurement(ecfg),
            codec=codec,
            task="bench",
            dim=d,
        )
        self.rng = np.random.default_rng(1)
        self.masked: list[MaskedUpdate] = []

    @property
    def version(self) -> int:
        return self.secure.version

    def prepare(self, deltas: list[FloatVector], base: int, cid: int, cols: Cols) -> None:
        self.masked = []
        for i, delta in enumerate(deltas):
            t0 = time.perf_counter()
            self.masked.append(
                self.client.upload(
                    self.secure.report,
                    client_id=cid + i,
                    base_version=base,
                    num_examples=10,
                    delta=delta,
                    rng=self.rng,
                )
            )
            cols["client"].append(time.perf_counter() - t0)
        cols["up_bytes"].append(self.masked[0].wire_bytes)

    def serve(self, cols: Cols) -> None:
        e0 = _enclave_cpu_s(self.pid)
        t0, c0 = time.perf_counter(), time.thread_time()
        for m in self.masked:
            out = self.secure.on_masked_update(m)
        cols["secure"].append(time.perf_counter() - t0)
        cols["agg_cpu"].append(time.thread_time() - c0)
        cols["enc_cpu"].append(_enclave_cpu_s(self.pid) - e0)
        assert out.accepted and out.step is not None, out
        self.masked = []

    def close(self) -> None:
        self.backend.close()


def _lsa_config(case: Case) -> SecureAggregationConfig:
    """The product's lightsecagg config with this case's codec (T, U fractions: defaults)."""
    return SecureAggregationConfig(
        mode="lightsecagg", frac_bits=case.frac_bits, weight_bits=case.weight_bits
    )


def lsa_fits(frac_bits: int, weight_bits: int, k: int) -> bool:
    """Whether K contributions of the largest weight fit the field's headroom (p ~ 2^32)."""
    return k << weight_bits <= FieldCodec(DEFAULT.clip, frac_bits).max_total_weight()


class LsaSide:
    """``LightSecAggFedBuff`` and its group of N users, built as the simulator builds them."""

    ring = "F_p"

    def __init__(self, case: Case, cfg: FedBuffConfig, p0: FloatVector) -> None:
        d = case.dim
        self.secure, runner = build_lightsecagg_aggregator(
            _lsa_config(case),
            cfg,
            p0,
            make_server_optimizer(ServerOptimizerConfig(), d),
            num_users=case.users,
            max_example_weight=1,
            session_id=b"bench",
        )
        self.group = runner.group
        self.rng = np.random.default_rng(1)
        self.ups: list[MaskedUpload] = []
        self.cost = BufferCost()

    @property
    def version(self) -> int:
        return self.secure.version

    def prepare(self, deltas: list[FloatVector], base: int, cid: int, cols: Cols) -> None:
        # Users 0..K-1 of the group contribute (K <= N); a buffer takes one update per user.
        self.ups, self.cost = contribute(self.secure, self.group, deltas, base, self.rng)
        cols["client"] += self.cost.client_s
        cols["up_bytes"].append(self.cost.up_bytes[0])

    def serve(self, cols: Cols) -> None:
        unmask(self.secure, self.group, self.ups, self.cost)
        route, server = self.cost.route, self.cost.server
        cols["secure"].append(route.wall + server.wall)
        cols["agg_cpu"].append(route.cpu + server.cpu)
        cols["enc_cpu"].append(0.0)
        n = self.group.params.num_users
        cols["buffer_client"].append((sum(self.cost.receive_s) + sum(self.cost.answer_s)) / n)
        self.ups = []

    def close(self) -> None:
        """Nothing runs outside this thread."""


def run_case(case: Case, steps: int) -> Run:
    """One fresh aggregator pair; medians over ``steps`` steps after one warm-up step.

    Per step: the devices prepare K uploads (timed per update), then plain FedBuff takes K
    distinct deltas, plain FedBuff takes one shared delta K times, and the secure backend
    takes the K uploads (and, for lightsecagg, the users' aggregated shares)."""
    d, k = case.dim, case.k
    rng = np.random.default_rng(0)
    cfg = FedBuffConfig(buffer_size=k)
    opt = ServerOptimizerConfig()
    p0 = np.zeros(d, np.float32)
    plain = FedBuff(cfg, p0, make_server_optimizer(opt, d))
    shared = FedBuff(cfg, p0, make_server_optimizer(opt, d))
    side: Side = TeeSide(case, cfg, p0) if case.mode in TEE_MODES else LsaSide(case, cfg, p0)
    base_delta = (rng.standard_normal(d) * 0.01).astype(np.float32)
    cols: Cols = {
        n: []
        for n in (
            "plain",
            "plain_cpu",
            "shared",
            "secure",
            "agg_cpu",
            "enc_cpu",
            "client",
            "buffer_client",
            "up_bytes",
        )
    }
    cid = 0
    try:
        for _ in range(steps + 1):  # the first step warms up (page faults, caches, keys)
            base = max(plain.version - 1, 0)  # some staleness, as in FedBuff
            assert side.version == plain.version
            deltas = [base_delta * np.float32(1 + 1e-3 * i) for i in range(k)]
            updates = [Update(cid + i, base, 10, deltas[i]) for i in range(k)]
            side.prepare(deltas, base, cid, cols)
            cid += k
            t0, c0 = time.perf_counter(), time.thread_time()
            for up in updates:
                plain.on_update(up)
            cols["plain"].append(time.perf_counter() - t0)
            cols["plain_cpu"].append(time.thread_time() - c0)
            t0 = time.perf_counter()
            for i in range(k):
                shared.on_update(Update(i, base, 10, base_delta))
            cols["shared"].append(time.perf_counter() - t0)
            side.serve(cols)
            del updates, deltas
    finally:
        side.close()

    def med(name: str, skip: int = 1) -> float:
        return statistics.median(cols[name][skip:]) * 1e3

    enclave = isinstance(side, TeeSide) and side.pid is not None
    ratios = [s / p for s, p in zip(cols["secure"][1:], cols["plain"][1:], strict=True)]
    cpu = [
        (a + e) / p
        for a, e, p in zip(
            cols["agg_cpu"][1:], cols["enc_cpu"][1:], cols["plain_cpu"][1:], strict=True
        )
    ]
    # With a free core for each party the wall time is at least the larger CPU time of the
    # two: a derived bound, not a measurement (the benchmark cannot free the shared cores).
    bound = [
        max(a, e) / p
        for a, e, p in zip(
            cols["agg_cpu"][1:], cols["enc_cpu"][1:], cols["plain_cpu"][1:], strict=True
        )
    ]
    return Run(
        ring=side.ring,
        plain_ms=med("plain"),
        plain_cpu_ms=med("plain_cpu"),
        plain_shared_ms=med("shared"),
        secure_ms=med("secure"),
        agg_cpu_ms=med("agg_cpu"),
        enclave_cpu_ms=med("enc_cpu") if enclave else None,
        # Every update costs the device the same work: the warm-up step's are kept, except
        # lightsecagg's, whose first contributions also derive the N - 1 pairwise keys.
        client_ms=med("client", 0 if isinstance(side, TeeSide) else k),
        buffer_client_ms=med("buffer_client") if cols["buffer_client"] else None,
        up_mb=statistics.median(cols["up_bytes"]) / 1e6,
        ratio=statistics.median(ratios),
        cpu_ratio=statistics.median(cpu),
        free_core_ratio=statistics.median(bound) if enclave else None,
    )


def _time_ms(f: Callable[[], object], n: int) -> float:
    f()
    xs = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        xs.append(time.perf_counter() - t0)
    return statistics.median(xs) * 1e3


def _plain_arrival_ms(d: int, n: int) -> float:
    delta = (np.random.default_rng(1).standard_normal(d) * 0.01).astype(np.float32)
    opt = make_server_optimizer(ServerOptimizerConfig(), d)
    plain = FedBuff(FedBuffConfig(buffer_size=10**9), np.zeros(d, np.float32), opt)
    ups = [Update(i, 0, 10, delta * np.float32(1 + i)) for i in range(_ROTATE)]
    turn = iter(range(10**9))
    return _time_ms(lambda: plain.on_update(ups[next(turn) % _ROTATE]), n)


def _enclave_mask_ms(ring: Ring, d: int, n: int) -> float:
    exp, acc, seed = MaskExpander(ring, d), ring.zeros(d), os.urandom(32)
    return _time_ms(lambda: exp.accumulate(acc, seed, scale=4096 * 3), n)


def _aggregator_add_ms(ring: Ring, d: int, n: int) -> float:
    gen = np.random.default_rng(2)
    ys = [
        ring.reduce(gen.integers(0, 2**62, d, dtype=np.uint64).astype(ring.dtype))
        for _ in range(_ROTATE)
    ]
    acc, scratch, w = ring.zeros(d), ring.zeros(1 << 16), ring.dtype.type(4096 * 3)
    turn = iter(range(10**9))

    def muladd() -> None:  # what SecureFedBuff._multiply_add does
        y = ys[next(turn) % _ROTATE]
        for start in range(0, d, 1 << 16):
            stop = min(start + (1 << 16), d)
            part = scratch[: stop - start]
            np.multiply(y[start:stop], w, out=part)
            np.add(acc[start:stop], part, out=acc[start:stop])

    return _time_ms(muladd, n)


def _lsa_default_params(users: int, d: int) -> LightSecAggParams:
    return LightSecAggParams.from_fractions(
        users, DEFAULT.lightsecagg_privacy_fraction, DEFAULT.lightsecagg_survivor_fraction, d
    )


def _lsa_decode_ms(users: int, d: int, n: int) -> float:
    """The LightSecAgg server's one-shot decoding of an aggregate mask from U shares."""
    prm = _lsa_default_params(users, d)
    code, u = LagrangeCode(prm), prm.target_survivors
    shares = np.random.default_rng(3).integers(0, P, (u, prm.piece_len), dtype=np.uint64)
    return _time_ms(lambda: code.decode(range(u), shares), n)


def _lsa_accumulate_ms(users: int, d: int, n: int) -> float:
    """``LightSecAggServer.on_masked_upload``: check, then ``acc += w y mod p``. Each call
    needs a fresh routed contribution; the routing (empty ciphertexts: the server never reads
    them) is done first, untimed."""
    server = LightSecAggServer(_lsa_default_params(users, d), b"bench")
    gen = np.random.default_rng(4)
    ys = [gen.integers(0, P, d, dtype=np.uint64) for _ in range(_ROTATE)]
    ups = []
    for seq in range(n + 1):
        cid = ContributionId(0, seq)
        peers = range(1, users)
        server.on_mask_shares(
            MaskShares(b"bench", cid, tuple(EncryptedMaskShare(cid, j, b"") for j in peers))
        )
        ups.append(MaskedUpload(b"bench", cid, 0, 1, ys[seq % _ROTATE]))
    turn = iter(ups)
    return _time_ms(lambda: server.on_masked_upload(next(turn), 200), n)


def breakdown(n: int, users: int) -> list[str]:
    """Single-threaded cost of each piece of one arrival (medians of ``n`` calls, warm)."""
    key = KeyPair.generate()
    ctx = SeedContext("bench", 1, 0, os.urandom(16), key.public)
    sealed = seal_seed(os.urandom(32), ctx)
    rows = [
        (
            "open a sealed seed (X25519 + HKDF + AES-GCM)",
            "any",
            _time_ms(lambda: open_seed(key, sealed, ctx), 50 * n),
        )
    ]
    for d in (100_000, 1_000_000):
        rows.append(
            ("plain FedBuff arrival (validate + weighted add)", f"{d:,}", _plain_arrival_ms(d, n))
        )
        for bits in (32, 62):
            ring = Ring(bits)
            name = f"uint{ring.dtype.itemsize * 8}"
            rows.append(
                (
                    f"enclave: AES-256-CTR mask, weighted add ({name})",
                    f"{d:,}",
                    _enclave_mask_ms(ring, d, n),
                )
            )
            rows.append(
                (
                    f"aggregator: weighted add of a masked upload ({name})",
                    f"{d:,}",
                    _aggregator_add_ms(ring, d, n),
                )
            )
        rows.append(
            (
                "lightsecagg server: weighted add of a masked upload mod p (uint64)",
                f"{d:,}",
                _lsa_accumulate_ms(users, d, n),
            )
        )
        rows.append(
            (
                f"lightsecagg server: decode the aggregate mask from U shares, N = {users} "
                "(once per step)",
                f"{d:,}",
                _lsa_decode_ms(users, d, max(n // 4, 3)),
            )
        )
    return [f"| {a} | {b} | {c:.3f} |" for a, b, c in rows]


def table_row(c: Case, rs: list[Run]) -> str:
    """One configuration: medians over repeats; "—" where the backend has no such part."""

    def m(get: Callable[[Run], float | None], fmt: str, unit: str = "") -> str:
        xs = [v for r in rs if (v := get(r)) is not None]
        return format(statistics.median(xs), fmt) + unit if xs else "—"

    ratio = statistics.median(r.ratio for r in rs)
    met = "—" if c.mode == LSA else ("yes" if ratio <= TARGET else "no")
    return (
        f"| {c.codec} {c.frac_bits}/{c.weight_bits} | {rs[0].ring} | {c.dim:,} | {c.k} | "
        f"{c.label} | {m(lambda r: r.plain_ms, '.1f')} | {m(lambda r: r.secure_ms, '.1f')} | "
        f"**{ratio:.2f}x** | {met} | {m(lambda r: r.agg_cpu_ms, '.1f')} | "
        f"{m(lambda r: r.enclave_cpu_ms, '.1f')} | {m(lambda r: r.cpu_ratio, '.2f', 'x')} | "
        f"{m(lambda r: r.free_core_ratio, '.2f', 'x')} | "
        f"{m(lambda r: r.plain_shared_ms, '.1f')} | {m(lambda r: r.client_ms, '.2f')} | "
        f"{m(lambda r: r.buffer_client_ms, '.2f')} | {m(lambda r: r.up_mb, '.2f')} |"
    )


def make_cases(args: argparse.Namespace) -> tuple[list[Case], list[str]]:
    """The configurations to run, and a line for each lightsecagg one left out (and why)."""
    cases, skipped = [], []
    for label, f, s in CODECS:
        if label not in args.codecs:
            continue
        too_big = [k for k in args.k if not lsa_fits(f, s, k)]
        if LSA in args.modes and too_big:
            skipped.append(
                f"the {label} codec (f = {f}, S = {s}) at K = {', '.join(map(str, too_big))}: "
                f"K contributions of weight 2^{s} at 2^{f} per unit exceed the field's ~2^31 "
                "headroom (the product refuses the config)"
            )
        for d in args.params:
            for k in args.k:
                for mode in args.modes:
                    if mode != LSA:
                        cases.append(Case(label, f, s, d, k, mode))
                    elif k in too_big:
                        pass
                    elif d * k > LSA_LARGE and not args.lightsecagg_large:
                        skipped.append(
                            f"{d:,} params at K = {k} (`--lightsecagg-large`: ~30 s of "
                            "device-side work per step)"
                        )
                    else:
                        cases.append(Case(label, f, s, d, k, mode, args.lightsecagg_users))
    return cases, skipped


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="1 repeat, 2 steps")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/secure_buffer.md"))
    ap.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--k", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--codecs", nargs="+", default=[c[0] for c in CODECS])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument(
        "--lightsecagg-users", type=int, default=LSA_USERS, help="N, the lightsecagg group"
    )
    ap.add_argument(
        "--lightsecagg-large",
        action="store_true",
        help=f"also run lightsecagg where params x K > {LSA_LARGE:,} (1M x K = 100: ~5 min more)",
    )
    args = ap.parse_args()
    if LSA in args.modes and max(args.k) > args.lightsecagg_users:
        ap.error(
            f"--k {max(args.k)} > --lightsecagg-users {args.lightsecagg_users}: a lightsecagg "
            "buffer takes one update per user of the group"
        )
    repeats, steps = (1, 2) if args.quick else (args.repeats, args.steps)
    # One BLAS thread: both aggregators take a float64 norm of the pseudo-gradient per step,
    # and OpenBLAS's second thread on 2 busy cores turned that 0.05 ms dot into ~10 ms,
    # drowning the difference this benchmark measures.
    threadpool_limits(1)
    loads = [os.getloadavg()[0]]
    cases, skipped = make_cases(args)
    runs: dict[Case, list[Run]] = {c: [] for c in cases}
    for rep in range(repeats):
        for c in cases:
            r = run_case(c, steps)
            runs[c].append(r)
            print(f"rep {rep} {c}: {r}", flush=True)
        loads.append(os.getloadavg()[0])
    rows = [table_row(c, runs[c]) for c in cases]
    lines = [
        f"{repeats} repeats x {steps} steps per configuration (after one warm-up step), "
        "configurations interleaved within each repeat; every number is the median over "
        "repeats of the per-run median over steps. Ratio = secure wall / plain wall per step "
        f"(the target, for the TEE buffer: <= {TARGET}x), the median of per-step ratios. CPU "
        "ratio = (aggregator CPU + enclave CPU) / plain CPU: what the secure buffer costs in "
        "total, whichever core it runs on. Free-core bound = max(aggregator CPU, enclave CPU) / "
        "plain CPU: the lowest wall ratio a free core for each party would allow (derived from "
        "CPU times, not measured). f/S: fractional / weight bits; ring: the ring the product "
        "picked (`with_smallest_ring`: 32 = uint32 storage, 62 = uint64). Last columns: plain "
        "FedBuff fed one shared, cache-resident delta (the previous benchmark's baseline), the "
        "client's cost per upload (TEE: verify, encode, mask, seal; LightSecAgg: encode, fresh "
        "mask, Lagrange-code N shares, encrypt N - 1 of them, mask), each client's cost per "
        "buffer (LightSecAgg: decrypt its K shares and compute its aggregated share, mean over "
        "the N users; the TEE client does nothing per buffer), and the bytes one upload sends "
        "(plain: 4 B per parameter).",
        "",
        "LightSecAgg rows (`LightSecAggFedBuff` and its group built by the simulator's "
        "`build_lightsecagg_aggregator`, with the product's default "
        "`lightsecagg_privacy_fraction` 0.25 and `lightsecagg_survivor_fraction` 0.5): a group "
        f"of N = {args.lightsecagg_users} devices, K of which contribute to each buffer (at "
        f"K = {args.lightsecagg_users} every member does); field p = 2^32 - 5. Server time per "
        "step = routing the K contributions' encrypted shares + K weighted accumulations of "
        "masked uploads + taking U aggregated shares, the one-shot decoding of the aggregate "
        "mask and the server step, all in the aggregator's thread (no enclave, so no enclave "
        "CPU and no free-core bound). All N users answer each buffer (as the simulator asks "
        "them all); the server decodes at the U-th answer. LightSecAgg needs the whole weighted "
        "sum below p/2, so only the coarse codec fits."
        + ("" if not skipped else " Not run: " + "; ".join(skipped) + "."),
        "",
        "| codec f/S | ring | params | K | backend | plain ms/step | secure ms/step | ratio | "
        "target met | aggregator CPU ms | enclave CPU ms | CPU ratio | free-core bound | "
        "plain, one shared delta ms/step | client ms/update | client ms/buffer | "
        "MB up/update |",
        "|---|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Load average (1 min) of the machine before the run and after each repeat: "
        + " / ".join(f"{x:.1f}" for x in loads)
        + f" on {os.cpu_count()} cores.",
        "",
        "Cost of each piece of one arrival (or step), single-threaded, warm (median ms):",
        "",
        "| piece | params | ms |",
        "|---|---:|---:|",
        *breakdown(5 if args.quick else 20, args.lightsecagg_users),
        "",
        *NOTE,
    ]
    write_markdown(args.out, "Secure buffer (TEE, LightSecAgg) vs plain FedBuff", lines)


if __name__ == "__main__":
    main()
