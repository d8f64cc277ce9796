"""Device populations: how fast each client computes and communicates, and when it is online.

A population is a set of per-client arrays (struct of arrays, so a million clients cost a
few tens of MB and every query is vectorised). Availability follows a daily cycle: client
``i`` is online while ``(t - window_start_i) mod 1 day < window_length_i``; most windows
open at night, when phones charge (FedScale reports 15-24% of clients online at a time,
following a 24-hour cycle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from asyncfl.errors import ConfigProblem

__all__ = [
    "DAY_S",
    "AvailabilityConfig",
    "DevicePopulation",
    "SyntheticPopulationConfig",
    "synthetic_population",
]

DAY_S = 86_400.0
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class AvailabilityConfig:
    kind: Literal["always", "daily"] = "daily"
    """always: every device always online; daily: one window a day, mostly at night."""
    mean_fraction: float = 0.5
    """Mean fraction of the day a client is online (Beta-distributed across clients)."""
    peak_hour: float = 2.0
    """Hour of the day (0-24) around which most windows are centred (night charging)."""
    spread_hours: float = 3.0
    """Std of the window centre around ``peak_hour``."""

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        if not 0.0 < self.mean_fraction <= 1.0:
            out.append(ConfigProblem("mean_fraction", self.mean_fraction, "a number in (0, 1]"))
        if not 0.0 <= self.peak_hour < 24.0:
            out.append(ConfigProblem("peak_hour", self.peak_hour, "an hour in [0, 24)"))
        if self.spread_hours < 0:
            out.append(ConfigProblem("spread_hours", self.spread_hours, "a number >= 0"))
        return out


@dataclass(frozen=True)
class SyntheticPopulationConfig:
    """Synthetic devices: FedScale's fallback, speed factor ~ lognormal(mu, sigma)."""

    sec_per_example: float = 0.02
    """Compute seconds per example of a speed-factor-1 device (phones: ~15-200 ms)."""
    speed_mu: float = 1.0
    """mu of the lognormal speed factor (FedScale: 1)."""
    speed_sigma: float = 0.6
    """sigma of the lognormal speed factor (FedScale: 0.6): the spread of device speeds."""
    downlink_mbps: float = 8.0
    """Median downlink in Mbit/s (FLASH profiles: 2.4-17)."""
    uplink_mbps: float = 2.0
    """Median uplink in Mbit/s (FLASH profiles: 0.4-6.6)."""
    bandwidth_sigma: float = 0.5
    """log-std of per-device bandwidth around the medians."""
    dropout_prob: float = 0.0
    """Probability that a client abandons a task at a uniformly random moment of it."""
    availability: AvailabilityConfig = field(default_factory=AvailabilityConfig)
    """When each device is online."""

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        for name in ("sec_per_example", "downlink_mbps", "uplink_mbps"):
            if not getattr(self, name) > 0:
                out.append(ConfigProblem(name, getattr(self, name), "a number > 0"))
        for name in ("speed_sigma", "bandwidth_sigma"):
            if getattr(self, name) < 0:
                out.append(ConfigProblem(name, getattr(self, name), "a number >= 0"))
        if not 0.0 <= self.dropout_prob < 1.0:
            out.append(ConfigProblem("dropout_prob", self.dropout_prob, "a probability in [0, 1)"))
        out += [
            ConfigProblem(f"availability.{p.path}", p.value, p.expected)
            for p in self.availability.validate()
        ]
        return out


@dataclass(frozen=True, eq=False)
class DevicePopulation:
    """Per-client device arrays, all of length ``size``."""

    sec_per_example: F64
    downlink_bps: F64
    """Bytes per second."""
    uplink_bps: F64
    dropout_prob: F64
    window_start_s: F64
    """Second of the day when the client's daily online window opens."""
    window_length_s: F64
    """Length of the window in seconds; >= DAY_S means always online."""
    speed_score: F64 = field(default_factory=lambda: np.zeros(0))
    """Higher = faster; used to bucket participation by device speed."""
    bandwidth_jitter: float = 0.0
    """Relative std of per-transfer bandwidth around the device's mean (0 = fixed)."""
    source: str = "synthetic"

    @property
    def size(self) -> int:
        return int(self.sec_per_example.shape[0])

    def available(self, t: float, clients: I64 | None = None) -> npt.NDArray[np.bool_]:
        start = self.window_start_s if clients is None else self.window_start_s[clients]
        length = self.window_length_s if clients is None else self.window_length_s[clients]
        return ((t - start) % DAY_S) < length

    def window_end(self, t: float, clients: I64) -> F64:
        """When the online window containing ``t`` closes (inf for always-online clients)."""
        start = self.window_start_s[clients]
        length = self.window_length_s[clients]
        into = (t - start) % DAY_S
        end = t - into + length
        return np.where(length >= DAY_S, np.inf, end)

    def next_online(self, t: float, clients: I64) -> F64:
        """Earliest time >= t at which each client is online (inf: never)."""
        start = self.window_start_s[clients]
        length = self.window_length_s[clients]
        into = (t - start) % DAY_S
        nxt = np.where(into < length, t, t + (DAY_S - into))
        return np.where(length <= 0, np.inf, nxt)  # a zero-length window never opens

    def transfer_seconds_one(
        self, client: int, bytes_down: int, bytes_up: int, rng: np.random.Generator
    ) -> tuple[float, float]:
        """:meth:`transfer_seconds` for one client, on Python floats (the per-update hot path)."""
        down = float(self.downlink_bps[client])
        up = float(self.uplink_bps[client])
        if self.bandwidth_jitter > 0:
            j = self.bandwidth_jitter
            down *= max(1.0 + j * float(rng.standard_normal()), 0.05)
            up *= max(1.0 + j * float(rng.standard_normal()), 0.05)
        return bytes_down / down, bytes_up / up

    def window_end_one(self, t: float, client: int) -> float:
        """:meth:`window_end` for one client."""
        length = float(self.window_length_s[client])
        if length >= DAY_S:
            return math.inf
        into = (t - float(self.window_start_s[client])) % DAY_S
        return t - into + length

    def transfer_seconds(
        self, clients: I64, bytes_down: int, bytes_up: int, rng: np.random.Generator
    ) -> tuple[F64, F64]:
        down = self.downlink_bps[clients]
        up = self.uplink_bps[clients]
        if self.bandwidth_jitter > 0:
            # Per-transfer speed ~ Normal(mean, jitter * mean), truncated above zero.
            lo = 0.05
            down = down * np.maximum(
                1 + self.bandwidth_jitter * rng.standard_normal(down.shape), lo
            )
            up = up * np.maximum(1 + self.bandwidth_jitter * rng.standard_normal(up.shape), lo)
        return bytes_down / down, bytes_up / up


def synthetic_population(
    cfg: SyntheticPopulationConfig, size: int, rng: np.random.Generator
) -> DevicePopulation:
    factor = rng.lognormal(cfg.speed_mu, cfg.speed_sigma, size)
    # Normalise so cfg.sec_per_example is the median device's cost.
    spe = cfg.sec_per_example * factor / np.exp(cfg.speed_mu)
    down = cfg.downlink_mbps * 1e6 / 8 * rng.lognormal(0.0, cfg.bandwidth_sigma, size)
    up = cfg.uplink_mbps * 1e6 / 8 * rng.lognormal(0.0, cfg.bandwidth_sigma, size)
    av = cfg.availability
    if av.kind == "always":
        start = np.zeros(size)
        length = np.full(size, DAY_S)
    else:
        m = av.mean_fraction
        if m >= 1.0:
            frac = np.ones(size)
        else:
            conc = 4.0  # Beta(a, b) with mean m and a + b = 4: broad but not U-shaped.
            frac = rng.beta(m * conc, (1 - m) * conc, size)
        length = frac * DAY_S
        centre = (av.peak_hour + av.spread_hours * rng.standard_normal(size)) * 3600.0
        start = (centre - length / 2) % DAY_S
    return DevicePopulation(
        sec_per_example=spe,
        downlink_bps=down,
        uplink_bps=up,
        dropout_prob=np.full(size, cfg.dropout_prob),
        window_start_s=start,
        window_length_s=length,
        speed_score=1.0 / spe,
        source="synthetic",
    )
