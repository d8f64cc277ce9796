"""Synchronous rounds through SecAgg / SecAgg+: the server only ever learns the sum.

Each client that finishes training encodes its update on the device
(``FixedPointCodec.encode(delta, weight)``: clipped, scaled, weighted by its integer
example weight) and keeps it; when the round closes, the round's reporting clients run the
full protocol (:func:`asyncfl.secure.secagg.run_secagg_round`, real X25519/AES/Shamir) and
the aggregator receives the unmasked, decoded weighted sum and nothing else.

Modelling choices (documented in docs/security.md):
- the protocol runs among the clients that reported before the round closed (production
  systems start AdvertiseKeys at selection; running it at the close keeps the simulated
  cohort and the protocol's participants the same set);
- each participant may drop at each protocol stage with ``stage_dropout_prob``; the
  protocol recovers the survivors' sum, or the round fails cleanly below the threshold;
- protocol compute and bytes are recorded, not added to simulated time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from asyncfl.core.update import FloatVector
from asyncfl.errors import ConfigProblem
from asyncfl.secure.fixedpoint import FixedPointCodec
from asyncfl.secure.ring import RingVector
from asyncfl.secure.secagg import SecAggConfig, Stage, choose_parameters, run_secagg_round

__all__ = ["SecureAggregationConfig", "SecureRoundRunner", "SecureRoundStats"]

SecureMode = Literal["none", "secagg", "secagg+", "tee", "lightsecagg"]
TeeBackendKind = Literal["inprocess", "subprocess"]


@dataclass(frozen=True)
class SecureAggregationConfig:
    mode: SecureMode = "none"
    """none, secagg (all-to-all, Bonawitz et al. 2017) or secagg+ (k-regular graph, Bell et
    al. 2020) for synchronous FedAvg; tee (secure buffer in a TEE, Papaya 2022) or lightsecagg
    (coded masks, no TEE, So et al. 2021/2022) for FedBuff and FedAsync."""
    clip: float = 1.0
    """Fixed-point range: each coordinate of an update is clipped to [-clip, clip]."""
    frac_bits: int = 24
    """Fixed-point fractional bits (decoding error <= 2^-frac_bits per coordinate)."""
    ring_bits: int = 62
    """Arithmetic modulo 2^ring_bits; headroom so the weighted sum never wraps. tee: the
    2^32 ring (uint32, half the memory traffic) is used instead whenever a full release
    (K contributions of the largest weight, plus DP noise) fits in it."""
    threshold_fraction: float = 0.5
    """SecAgg: Shamir threshold t = floor(n * fraction) + 1."""
    corrupt_fraction: float = 0.05
    """SecAgg+: fraction of corrupt clients the graph must tolerate."""
    dropout_fraction: float = 0.1
    """SecAgg+: fraction of protocol dropouts the graph must tolerate."""
    stage_dropout_prob: float = 0.0
    """Probability that a participant drops at each protocol stage (simulated)."""
    weight_bits: int = 12
    """tee: staleness weights are quantised to multiples of 2^-weight_bits in the ring."""
    tee_fit_ring32: bool = True
    """tee: when a full release (K contributions of the largest weight, plus the DP noise tail)
    does not fit the 2^32 ring at frac_bits/weight_bits, lower them a bit at a time (to no
    less than 16 and 8) until it does: half the upload, keystream and memory traffic of the
    2^62 ring per update, decoding error 2^-frac_bits actually used (reported as ring_bits and
    frac_bits in the run summary). false: keep frac_bits/weight_bits exact (ring_bits ring)."""
    tee_backend: TeeBackendKind = "inprocess"
    """tee: run the enclave in this process or in its own OS process (subprocess)."""
    lightsecagg_privacy_fraction: float = 0.25
    """lightsecagg: privacy threshold T = max(1, floor(N * fraction)) of the N clients: any T
    colluding with the server learn nothing beyond the buffer's sum."""
    lightsecagg_survivor_fraction: float = 0.5
    """lightsecagg: U = max(T + 1, ceil(N * fraction)) answering clients unmask a buffer;
    N - U may drop. Needs frac_bits + weight_bits + log2(K * clip) <= 31 (field p ~ 2^32)."""

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        if not self.clip > 0:
            out.append(ConfigProblem("clip", self.clip, "a number > 0"))
        if not 1 <= self.frac_bits < self.ring_bits:
            out.append(ConfigProblem("frac_bits", self.frac_bits, "in [1, ring_bits)"))
        if not 16 <= self.ring_bits <= 64:
            out.append(ConfigProblem("ring_bits", self.ring_bits, "in [16, 64]"))
        if not 0 < self.threshold_fraction < 1:
            out.append(ConfigProblem("threshold_fraction", self.threshold_fraction, "in (0, 1)"))
        if not 0 <= self.corrupt_fraction + self.dropout_fraction < 0.5:
            out.append(
                ConfigProblem(
                    "dropout_fraction",
                    self.dropout_fraction,
                    "corrupt_fraction + dropout_fraction in [0, 0.5)",
                )
            )
        if not 0 <= self.stage_dropout_prob < 1:
            out.append(ConfigProblem("stage_dropout_prob", self.stage_dropout_prob, "in [0, 1)"))
        if not 0 <= self.weight_bits <= 24:
            out.append(ConfigProblem("weight_bits", self.weight_bits, "an integer in [0, 24]"))
        if not (0 < self.lightsecagg_privacy_fraction < self.lightsecagg_survivor_fraction <= 1):
            out.append(
                ConfigProblem(
                    "lightsecagg_survivor_fraction",
                    (self.lightsecagg_privacy_fraction, self.lightsecagg_survivor_fraction),
                    "0 < lightsecagg_privacy_fraction < lightsecagg_survivor_fraction <= 1",
                )
            )
        if self.tee_backend not in ("inprocess", "subprocess"):
            out.append(ConfigProblem("tee_backend", self.tee_backend, "inprocess or subprocess"))
        return out


@dataclass
class SecureRoundStats:
    rounds: int = 0
    failed_rounds: int = 0
    participants: int = 0
    protocol_dropouts: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    client_seconds: dict[str, float] = field(default_factory=dict)
    server_seconds: dict[str, float] = field(default_factory=dict)
    max_decode_error_bound: float = 0.0

    def summary(self) -> dict[str, object]:
        n = max(self.participants, 1)
        return {
            "rounds": self.rounds,
            "failed_rounds": self.failed_rounds,
            "participants": self.participants,
            "protocol_dropouts": self.protocol_dropouts,
            "bytes_up_per_client": self.bytes_up / n,
            "bytes_down_per_client": self.bytes_down / n,
            "client_seconds_per_client_by_stage": {
                k: v / n for k, v in self.client_seconds.items()
            },
            "server_seconds_by_stage": self.server_seconds,
            "decode_error_bound": self.max_decode_error_bound,
        }


class SecureRoundRunner:
    """Holds the round's encoded inputs (conceptually on the clients) and runs the protocol."""

    def __init__(self, cfg: SecureAggregationConfig, dim: int, rng: np.random.Generator) -> None:
        self.cfg = cfg
        self.dim = dim
        self.codec = FixedPointCodec(
            clip=cfg.clip, frac_bits=cfg.frac_bits, ring_bits=cfg.ring_bits
        )
        self._rng = rng
        self._inputs: dict[int, RingVector] = {}
        self._weights: dict[int, int] = {}
        self.stats = SecureRoundStats()

    @property
    def count(self) -> int:
        return len(self._inputs)

    def submit(self, client: int, delta: FloatVector, weight: int) -> None:
        """Client-side: encode (clip, scale, weight) and keep the input for the protocol."""
        if client in self._inputs:
            raise ValueError(f"client {client} already submitted to this round")
        self._inputs[client] = self.codec.encode(delta, weight, self._rng)
        self._weights[client] = weight

    def discard(self) -> int:
        n = len(self._inputs)
        self._inputs.clear()
        self._weights.clear()
        return n

    def close(self, min_inputs: int = 2) -> tuple[FloatVector | None, float, int]:
        """Run the protocol; return (weighted sum, total weight, survivors) or (None, 0, 0).

        The server does not unmask a sum of fewer than ``min_inputs`` inputs (with distributed
        DP noise, such a sum would carry less noise than calibrated): it aborts the round after
        MaskedInputCollection, when it knows whose masked inputs it holds.
        """
        ids = sorted(self._inputs)
        n = len(ids)
        self.stats.rounds += 1
        if n < max(2, min_inputs):
            # A "sum" of one input is that input: secure aggregation cannot hide it.
            self.stats.failed_rounds += 1
            self.discard()
            return None, 0.0, 0
        if self.cfg.mode == "secagg+" and n >= 3:
            params = choose_parameters(n, self.cfg.corrupt_fraction, self.cfg.dropout_fraction)
            config = SecAggConfig.secagg_plus(ids, self.dim, params, self._rng, self.cfg.ring_bits)
        else:
            t = min(n, int(n * self.cfg.threshold_fraction) + 1)
            config = SecAggConfig.secagg(ids, self.dim, t, self.cfg.ring_bits)
        drops: dict[Stage, set[int]] = {s: set() for s in Stage}
        alive = set(ids)
        if self.cfg.stage_dropout_prob > 0:
            for stage in Stage:
                for c in sorted(alive):
                    if self._rng.random() < self.cfg.stage_dropout_prob:
                        drops[stage].add(c)
                alive -= drops[stage]
        in_sum = set(ids) - drops[Stage.ADVERTISE_KEYS] - drops[Stage.SHARE_KEYS]
        in_sum -= drops[Stage.MASKED_INPUT]
        if len(in_sum) < min_inputs:
            self.stats.failed_rounds += 1
            self.stats.protocol_dropouts += n - len(in_sum)
            self.discard()
            return None, 0.0, 0
        # Keys and masks come from os.urandom: masks cancel, so the simulation stays
        # deterministic while the cryptography is real.
        res = run_secagg_round(self._inputs, config, drops, seed=None)
        st = self.stats
        st.participants += n
        st.protocol_dropouts += n - len(res.survivors)
        st.bytes_up += sum(res.bytes_up.values())
        st.bytes_down += sum(res.bytes_down.values())
        for stage, sec in res.client_seconds.items():
            st.client_seconds[stage.name] = st.client_seconds.get(stage.name, 0.0) + sec
        for stage, sec in res.server_seconds.items():
            st.server_seconds[stage.name] = st.server_seconds.get(stage.name, 0.0) + sec
        weights = self._weights.copy()
        self.discard()
        if res.sum is None:
            st.failed_rounds += 1
            return None, 0.0, 0
        total = sum(weights[c] for c in res.survivors)
        if total <= 0:
            return None, 0.0, 0
        mean = self.codec.decode_sum(res.sum, total)
        st.max_decode_error_bound = max(st.max_decode_error_bound, self.codec.error_bound(total))
        return (mean * np.float32(total)).astype(np.float32), float(total), len(res.survivors)
