"""The real phone population: FLASH devices joined to AI-Benchmark chip scores.

Source: the FLASH smartphone trace (Yang et al., "Characterizing Impacts of Heterogeneity in
Federated Learning upon Large-Scale Smartphone Data", WWW 2021): 1,000 Android devices with
their chip's AI-Benchmark scores and a week of charging time, plus 19 measured mobile network
profiles. The folder is not shipped with the package; callers pass it (``PhonePopulationConfig
.path`` or a default directory) and fall back to the synthetic population on :class:`DataError`.

How each per-client array of :class:`DevicePopulation` is derived:

* **Compute** (``sec_per_example``). The chip's ``CPU-F Score`` (float CPU inference) is the
  default: on-device training runs float32 backpropagation on the CPU, whereas the ``AI Score``
  also rewards INT8/FP16 NPU inference paths that training does not use (hence its ~360x span
  against CPU-F's). The score is a throughput, so cost falls as the score rises. A *log-linear*
  (power-law) map sends the trace's score range onto FedScale's published per-sample latency
  range (Lai et al., ICML 2022: ~15-200 ms on phones)::

      u   = clip((ln s - ln s_lo) / (ln s_hi - ln s_lo), 0, 1)
      spe = max_spe * (min_spe / max_spe) ** u        # i.e. spe ∝ s ** -alpha

  with ``s_lo``/``s_hi`` the trace's ``anchor_quantile`` and ``1 - anchor_quantile`` score
  quantiles, so the slowest chips cost ``max_spe`` and the fastest ``min_spe``. On FLASH the
  CPU-F score spans 0.4-165 (400x); pure inverse proportionality (alpha = 1) would imply a
  400x latency span, against the ~13x that FedScale measured, so alpha is fitted instead
  (about 0.49 with the defaults). The map is monotone, so the speed ordering is the chip
  ordering, and it keeps the shape of the log-score distribution.
* **Network** (``downlink_bps``/``uplink_bps``, bytes/s). Each client draws one of the 19
  profiles uniformly (the trace gives no profile frequencies, and no link between a phone and
  its network); its mean bandwidth is the profile's mean (kbit/s * 1000 / 8). Per-transfer
  speed is drawn by :meth:`DevicePopulation.transfer_seconds` around that mean with relative
  std ``bandwidth_jitter``, by default the mean sigma/mean ratio over all profiles and both
  directions (one scalar, because the population stores one).
* **Availability** (``window_start_s``/``window_length_s``). A device is eligible only while
  charging (and idle, on Wi-Fi), so ``battery_charged_on_duration / 604800 s`` (one week) is
  its fraction of the day online. It gets one daily window of that length centred at
  ``peak_hour + spread_hours * N(0, 1)`` hours: 02:00 (night charging), with a spread fitted
  to the amplitude of FedScale's measured daily cycle (see ``spread_hours``). Devices that
  never charge get a zero-length window: never online, but kept, because real populations
  contain them. Devices charging more than a week's worth (7 of them, a trace artefact) are
  clipped to always online.
* **Scaling**: clients sample devices (and profiles, and window centres) with replacement.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from asyncfl.errors import ConfigError, ConfigProblem, DataError
from asyncfl.sim.devices import DAY_S, DevicePopulation

__all__ = [
    "DEVICES_FILE",
    "PROFILES_FILE",
    "SCORE_COLUMNS",
    "PhonePopulationConfig",
    "PhoneTrace",
    "describe_population",
    "load_phone_population",
    "read_phone_trace",
    "score_to_sec_per_example",
]

F64 = npt.NDArray[np.float64]
ScoreName = Literal["cpu_f", "ai"]
MissingScore = Literal["skip", "impute_median"]

DEVICES_FILE = "devices.json"
PROFILES_FILE = "network_profiles.json"
WEEK_S = 7 * DAY_S
SCORE_COLUMNS: dict[str, str] = {"cpu_f": "CPU-F Score", "ai": "AI Score"}


@dataclass(frozen=True)
class PhonePopulationConfig:
    """How the FLASH phones become a simulated population (see the module docstring)."""

    path: str | None = None
    """Folder with devices.json and network_profiles.json; None = the caller's default."""
    score: ScoreName = "cpu_f"
    """Which chip score sets compute speed: float CPU score (default) or overall AI score."""
    min_sec_per_example: float = 0.015
    """Seconds per example of the fastest chips (FedScale: ~15 ms)."""
    max_sec_per_example: float = 0.2
    """Seconds per example of the slowest chips (FedScale: ~200 ms)."""
    anchor_quantile: float = 0.01
    """Score quantiles (q, 1 - q) mapped to max/min cost; chips beyond them are clipped, so a
    handful of 2010 outliers do not stretch the map for everyone else. 0 = min and max."""
    missing_score: MissingScore = "skip"
    """Devices without a usable score: drop them, or give them the median score."""
    dropout_prob: float = 0.0
    """Probability that a client abandons a task at a uniformly random moment of it."""
    bandwidth_jitter: float | None = None
    """Relative std of per-transfer bandwidth; None = mean sigma/mean of the profiles."""
    availability: Literal["trace", "always"] = "trace"
    """'trace': daily window from charging time; 'always': every client always online."""
    peak_hour: float = 2.0
    """Hour of the day (0-24) around which charging windows are centred."""
    spread_hours: float = 7.0
    """Std, in hours, of the window centre around ``peak_hour``. 7 h reproduces the amplitude
    of FedScale's daily cycle (15-24% online, max/min ~1.6): on FLASH it gives 12-21% online,
    max/min ~1.75. A few hours (3 h: 2.5-39%, ~16x) would leave almost no one online by day."""

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        if self.path is not None and not str(self.path).strip():
            out.append(ConfigProblem("path", self.path, "null or a folder path"))
        if self.score not in SCORE_COLUMNS:
            out.append(ConfigProblem("score", self.score, f"one of {sorted(SCORE_COLUMNS)}"))
        lo, hi = self.min_sec_per_example, self.max_sec_per_example
        if not (math.isfinite(lo) and lo > 0):
            out.append(ConfigProblem("min_sec_per_example", lo, "a finite number > 0"))
        if not (math.isfinite(hi) and hi >= lo):
            out.append(
                ConfigProblem("max_sec_per_example", hi, "a finite number >= min_sec_per_example")
            )
        if not 0.0 <= self.anchor_quantile < 0.5:
            out.append(
                ConfigProblem("anchor_quantile", self.anchor_quantile, "a number in [0, 0.5)")
            )
        if self.missing_score not in ("skip", "impute_median"):
            out.append(
                ConfigProblem("missing_score", self.missing_score, "'skip' or 'impute_median'")
            )
        if not 0.0 <= self.dropout_prob < 1.0:
            out.append(ConfigProblem("dropout_prob", self.dropout_prob, "a probability in [0, 1)"))
        j = self.bandwidth_jitter
        if j is not None and not (math.isfinite(j) and j >= 0):
            out.append(ConfigProblem("bandwidth_jitter", j, "null or a finite number >= 0"))
        if self.availability not in ("trace", "always"):
            out.append(ConfigProblem("availability", self.availability, "'trace' or 'always'"))
        if not 0.0 <= self.peak_hour < 24.0:
            out.append(ConfigProblem("peak_hour", self.peak_hour, "an hour in [0, 24)"))
        if not (math.isfinite(self.spread_hours) and self.spread_hours >= 0):
            out.append(ConfigProblem("spread_hours", self.spread_hours, "a number >= 0"))
        return out


@dataclass(frozen=True, eq=False)
class PhoneTrace:
    """The parsed trace: one row per usable device, one per usable network profile."""

    guids: tuple[str, ...]
    scores: F64
    """The chosen chip score of each device (imputed ones hold the median)."""
    charged_s: F64
    """Seconds on the charger over the one-week trace."""
    skipped: tuple[str, ...]
    """Devices dropped: no usable score (with ``missing_score='skip'``) or charging time."""
    imputed: tuple[str, ...]
    """Devices whose missing score was replaced by the median."""
    profile_ids: tuple[str, ...]
    down_kbps: F64
    down_sigma_kbps: F64
    up_kbps: F64
    up_sigma_kbps: F64
    profiles_skipped: tuple[str, ...]

    @property
    def jitter(self) -> float:
        """Mean relative std of bandwidth over profiles and both directions."""
        down = self.down_sigma_kbps / self.down_kbps
        ratios = np.concatenate([down, self.up_sigma_kbps / self.up_kbps])
        return float(ratios.mean())


def _number(value: object) -> float | None:
    """A finite float from a JSON number or numeric string; None for '', 'n/a', null, bool."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return out if math.isfinite(out) else None


def _load_json(path: Path) -> object:
    if not path.is_file():
        raise DataError(
            f"phone population file {path} not found; point population.phones.path at a folder "
            f"holding {DEVICES_FILE} and {PROFILES_FILE} (the FLASH trace, shared/data/devices), "
            "or use the synthetic population"
        )
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}; replace it with the FLASH trace file") from exc


def read_phone_trace(
    folder: Path, score: ScoreName = "cpu_f", missing_score: MissingScore = "skip"
) -> PhoneTrace:
    """Parse ``folder/devices.json`` and ``folder/network_profiles.json``.

    Malformed entries are skipped and listed rather than failing the whole trace; the trace
    fails (:class:`DataError`) only when a file is absent or unreadable, or nothing is usable.
    """
    if not folder.is_dir():
        raise DataError(
            f"phone population folder {folder} does not exist; set population.phones.path to a "
            f"folder holding {DEVICES_FILE} and {PROFILES_FILE} (the FLASH trace, "
            "shared/data/devices), or use the synthetic population"
        )
    column = SCORE_COLUMNS[score]
    raw = _load_json(folder / DEVICES_FILE)
    if not isinstance(raw, list):
        raise DataError(f"{folder / DEVICES_FILE} holds a {type(raw).__name__}; expected a list")
    guids: list[str] = []
    scores: list[float | None] = []
    charged: list[float] = []
    skipped: list[str] = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            skipped.append(f"#{i}")
            continue
        guid = str(entry.get("guid", f"#{i}"))
        model = entry.get("model")
        s = _number(model.get(column)) if isinstance(model, dict) else None
        c = _number(entry.get("battery_charged_on_duration"))
        # A score is a throughput: zero or negative would mean infinite cost, so it is missing.
        if s is not None and s <= 0:
            s = None
        if c is None or c < 0 or (s is None and missing_score == "skip"):
            skipped.append(guid)
            continue
        guids.append(guid)
        scores.append(s)
        charged.append(c)
    known = [s for s in scores if s is not None]
    if not known:
        raise DataError(
            f"{folder / DEVICES_FILE}: no device has a usable {column!r} and charging time "
            f"({len(raw)} entries); replace it with the FLASH trace file"
        )
    median = float(np.median(known))
    imputed = tuple(g for g, s in zip(guids, scores, strict=True) if s is None)
    prof = _read_profiles(folder / PROFILES_FILE)
    return PhoneTrace(
        guids=tuple(guids),
        scores=np.array([median if s is None else s for s in scores], dtype=np.float64),
        charged_s=np.array(charged, dtype=np.float64),
        skipped=tuple(skipped),
        imputed=imputed,
        profile_ids=prof[0],
        down_kbps=prof[1][:, 0],
        down_sigma_kbps=prof[1][:, 1],
        up_kbps=prof[1][:, 2],
        up_sigma_kbps=prof[1][:, 3],
        profiles_skipped=prof[2],
    )


def _read_profiles(path: Path) -> tuple[tuple[str, ...], F64, tuple[str, ...]]:
    raw = _load_json(path)
    if not isinstance(raw, dict):
        raise DataError(f"{path} holds a {type(raw).__name__}; expected an object of profiles")
    ids: list[str] = []
    rows: list[list[float]] = []
    skipped: list[str] = []
    for pid, p in raw.items():
        keys = ("down_u", "down_sigma", "up_u", "up_sigma")
        vals = [_number(p.get(k)) if isinstance(p, dict) else None for k in keys]
        nums = [v for v in vals if v is not None]
        # Means must be > 0 (they divide transfer sizes); sigmas >= 0.
        if len(nums) != 4 or nums[0] <= 0 or nums[2] <= 0 or nums[1] < 0 or nums[3] < 0:
            skipped.append(str(pid))
            continue
        ids.append(str(pid))
        rows.append(nums)
    if not rows:
        raise DataError(
            f"{path}: no usable profile (each needs down_u, up_u > 0 and down_sigma, "
            "up_sigma >= 0 in kbit/s); replace it with the FLASH trace file"
        )
    return tuple(ids), np.array(rows, dtype=np.float64), tuple(skipped)


def score_to_sec_per_example(
    scores: F64, anchors: tuple[float, float], min_spe: float, max_spe: float
) -> F64:
    """The log-linear map of the module docstring: score ``anchors[0]`` (and below) costs
    ``max_spe``, score ``anchors[1]`` (and above) ``min_spe``.

    Equal anchors (a one-chip population) give every device the geometric mean of the range.
    """
    lo, hi = math.log(anchors[0]), math.log(anchors[1])
    if hi <= lo:
        return np.full(scores.shape, math.sqrt(min_spe * max_spe))
    u = np.clip((np.log(scores) - lo) / (hi - lo), 0.0, 1.0)
    return np.asarray(max_spe * (min_spe / max_spe) ** u, dtype=np.float64)


def _ignore(_msg: str) -> None:
    return None


def load_phone_population(
    cfg: PhonePopulationConfig,
    size: int,
    rng: np.random.Generator,
    default_dir: Path,
    *,
    log: Callable[[str], None] = _ignore,
) -> DevicePopulation:
    """``size`` clients sampled with replacement from the FLASH phones (module docstring).

    Raises :class:`ConfigError` for a bad config and :class:`DataError` when the folder or a
    file is missing or unusable (the caller then falls back to the synthetic population).
    ``log`` receives one line saying what was skipped, imputed and clipped.
    """
    problems = cfg.validate()
    if problems:
        raise ConfigError(problems)
    if size < 0:
        raise ValueError(f"size must be >= 0 clients, got {size}")
    folder = default_dir if cfg.path is None else Path(cfg.path)
    trace = read_phone_trace(folder, cfg.score, cfg.missing_score)
    q = cfg.anchor_quantile
    anchors = (float(np.quantile(trace.scores, q)), float(np.quantile(trace.scores, 1 - q)))
    spe_trace = score_to_sec_per_example(
        trace.scores, anchors, cfg.min_sec_per_example, cfg.max_sec_per_example
    )
    frac_trace = np.minimum(trace.charged_s / WEEK_S, 1.0)

    # Fixed draw order, and every draw made whatever the options: a seed gives the same
    # devices and networks with availability 'trace' or 'always'.
    dev = rng.integers(0, trace.scores.shape[0], size)
    prof = rng.integers(0, len(trace.profile_ids), size)
    centre_h = cfg.peak_hour + cfg.spread_hours * rng.standard_normal(size)

    if cfg.availability == "always":
        start, length = np.zeros(size), np.full(size, DAY_S)
    else:
        length = frac_trace[dev] * DAY_S
        start = (centre_h * 3600.0 - length / 2) % DAY_S
    jitter = trace.jitter if cfg.bandwidth_jitter is None else cfg.bandwidth_jitter
    log(
        f"phones: {len(trace.guids)} devices from {folder / DEVICES_FILE} "
        f"({len(trace.skipped)} skipped: {_head(trace.skipped)}; {len(trace.imputed)} "
        f"{SCORE_COLUMNS[cfg.score]!r} imputed with the median: {_head(trace.imputed)}); "
        f"{int((trace.charged_s == 0).sum())} never charge (never online), "
        f"{int((trace.charged_s >= WEEK_S).sum())} charge a full week (always online); "
        f"{len(trace.profile_ids)} network profiles ({len(trace.profiles_skipped)} skipped); "
        f"score anchors {anchors[0]:g}..{anchors[1]:g} -> "
        f"{cfg.max_sec_per_example:g}..{cfg.min_sec_per_example:g} s/example"
    )
    return DevicePopulation(
        sec_per_example=spe_trace[dev],
        downlink_bps=trace.down_kbps[prof] * 1000.0 / 8.0,
        uplink_bps=trace.up_kbps[prof] * 1000.0 / 8.0,
        dropout_prob=np.full(size, cfg.dropout_prob),
        window_start_s=start,
        window_length_s=length,
        speed_score=trace.scores[dev].copy(),
        bandwidth_jitter=jitter,
        source="phones",
    )


def _head(names: tuple[str, ...], n: int = 5) -> str:
    if not names:
        return "none"
    more = f", ... (+{len(names) - n})" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _hourly_online(start: F64, length: F64) -> F64:
    """Mean fraction of clients online during each hour of the day, exactly (not sampled).

    A window is the circular interval [start, start + length) with start in [0, DAY_S); its
    overlap with hour [a, b) is summed over the shifts -DAY_S, 0 (and the window may spill into
    the next day, which the shift -DAY_S folds back onto the morning).
    """
    s = np.mod(start, DAY_S)
    e = s + np.minimum(length, DAY_S)
    out = np.empty(24)
    for h in range(24):
        a, b = h * 3600.0, (h + 1) * 3600.0
        overlap = np.zeros_like(s)
        for shift in (-DAY_S, 0.0):
            overlap += np.clip(np.minimum(e + shift, b) - np.maximum(s + shift, a), 0.0, None)
        out[h] = float(overlap.mean()) / 3600.0 if s.size else 0.0
    return out


def describe_population(pop: DevicePopulation) -> dict[str, float]:
    """Summary statistics for docs and sanity checks.

    Keys: ``size``; ``sec_per_example_p10/p50/p90``; ``down_mbps_*`` and ``up_mbps_*`` (mean
    link speed, Mbit/s) at the same quantiles; ``availability_mean`` and ``availability_p10/
    p50/p90`` (fraction of the day online); ``never_online`` and ``always_online`` (fractions
    of clients); ``online_h00`` .. ``online_h23`` (mean fraction of clients online in that hour
    of the day), ``online_min``/``online_max`` over those hours and ``online_peak_hour``.
    """
    out: dict[str, float] = {"size": float(pop.size)}
    if pop.size == 0:
        return out
    qs = (10, 50, 90)
    frac = np.minimum(pop.window_length_s / DAY_S, 1.0)
    arrays = {
        "sec_per_example": pop.sec_per_example,
        "down_mbps": pop.downlink_bps * 8 / 1e6,
        "up_mbps": pop.uplink_bps * 8 / 1e6,
        "availability": frac,
    }
    for name, arr in arrays.items():
        for q, v in zip(qs, np.percentile(arr, qs), strict=True):
            out[f"{name}_p{q}"] = float(v)
    out["availability_mean"] = float(frac.mean())
    out["never_online"] = float((pop.window_length_s <= 0).mean())
    out["always_online"] = float((pop.window_length_s >= DAY_S).mean())
    hourly = _hourly_online(pop.window_start_s, pop.window_length_s)
    for h in range(24):
        out[f"online_h{h:02d}"] = float(hourly[h])
    out["online_min"] = float(hourly.min())
    out["online_max"] = float(hourly.max())
    out["online_peak_hour"] = float(np.argmax(hourly))
    return out
