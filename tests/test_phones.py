"""The FLASH phone population: parsing, speed map, networks, availability, sampling, errors."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from asyncfl.errors import ConfigError, DataError
from asyncfl.sim.devices import DAY_S, DevicePopulation
from asyncfl.sim.phones import (
    DEVICES_FILE,
    PROFILES_FILE,
    PhonePopulationConfig,
    describe_population,
    load_phone_population,
    read_phone_trace,
    score_to_sec_per_example,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "devices"
needs_shared = pytest.mark.skipif(
    not (SHARED / DEVICES_FILE).is_file(),
    reason=f"shared FLASH device trace not present at {SHARED}",
)
WEEK = 604_800.0


def _device(guid: str, cpu_f: object, ai: object, charged: object) -> dict[str, object]:
    return {
        "guid": guid,
        "model": {"Processor": "x", "CPU-F Score": cpu_f, "AI Score": ai},
        "battery_charged_on_duration": charged,
    }


TINY_DEVICES = [
    _device("a", "2.0", "10.0", 60_480.0),  # 10% of the week
    _device("b", "50.0", "400.0", 0.0),  # never charges
    _device("c", "", "", 151_200.0),  # missing score
    _device("d", "n/a", "7", 302_400.0),  # non-numeric CPU-F, numeric AI
    _device("e", 9.5, "35.5", 700_000.0),  # JSON number; more than a week
    _device("f", "130", "999", 30_240.0),
    _device("g", "-3", "5", 1000.0),  # a non-positive score is not a throughput
    _device("h", "20", "80", "lots"),  # no usable charging time
    "not an object",
]
TINY_PROFILES = {
    "p1": {"down_u": 8000.0, "down_sigma": 2000.0, "up_u": 1000.0, "up_sigma": 500.0},
    "p2": {"down_u": 2400.0, "down_sigma": 1200.0, "up_u": 4000.0, "up_sigma": 400.0},
    "bad": {"down_u": 0.0, "down_sigma": 1.0, "up_u": 100.0, "up_sigma": 1.0},
}


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    (tmp_path / DEVICES_FILE).write_text(json.dumps(TINY_DEVICES))
    (tmp_path / PROFILES_FILE).write_text(json.dumps(TINY_PROFILES))
    return tmp_path


@pytest.fixture(scope="module")
def real_pop() -> DevicePopulation:
    if not (SHARED / DEVICES_FILE).is_file():
        pytest.skip(f"shared FLASH device trace not present at {SHARED}")
    return load_phone_population(PhonePopulationConfig(), 10_000, np.random.default_rng(7), SHARED)


# -- parsing (no shared data needed) ----------------------------------------------------------
def test_tiny_trace_skips_and_counts_unusable_devices(tiny: Path) -> None:
    tr = read_phone_trace(tiny)
    assert tr.guids == ("a", "b", "e", "f")
    assert tr.skipped == ("c", "d", "g", "h", "#8")
    assert tr.imputed == ()
    np.testing.assert_array_equal(tr.scores, [2.0, 50.0, 9.5, 130.0])
    np.testing.assert_array_equal(tr.charged_s, [60_480.0, 0.0, 700_000.0, 30_240.0])
    assert tr.profile_ids == ("p1", "p2") and tr.profiles_skipped == ("bad",)
    # Mean of sigma/mean over both profiles and both directions, written out.
    assert tr.jitter == pytest.approx((0.25 + 0.5 + 0.5 + 0.1) / 4, rel=1e-12)


def test_tiny_trace_imputes_the_median_and_reads_the_ai_score(tiny: Path) -> None:
    tr = read_phone_trace(tiny, score="cpu_f", missing_score="impute_median")
    assert tr.guids == ("a", "b", "c", "d", "e", "f", "g")
    assert tr.imputed == ("c", "d", "g")
    median = float(np.median([2.0, 50.0, 9.5, 130.0]))  # 29.75
    np.testing.assert_array_equal(tr.scores, [2.0, 50.0, median, median, 9.5, 130.0, median])
    ai = read_phone_trace(tiny, score="ai")
    assert ai.guids == ("a", "b", "d", "e", "f", "g")
    np.testing.assert_array_equal(ai.scores, [10.0, 400.0, 7.0, 35.5, 999.0, 5.0])


def test_tiny_population_matches_a_hand_computation(tiny: Path) -> None:
    cfg = PhonePopulationConfig(anchor_quantile=0.0, dropout_prob=0.1)
    size = 400
    pop = load_phone_population(cfg, size, np.random.default_rng(3), tiny)
    assert pop.source == "phones" and pop.size == size
    # Per-client reference, written as a plain loop with math.log: anchors = min 2 and max 130.
    by_score = {2.0: 60_480.0, 50.0: 0.0, 9.5: 700_000.0, 130.0: 30_240.0}
    for i in range(size):
        s = float(pop.speed_score[i])
        u = (math.log(s) - math.log(2.0)) / (math.log(130.0) - math.log(2.0))
        assert pop.sec_per_example[i] == pytest.approx(0.2 * (0.015 / 0.2) ** u, rel=1e-12)
        frac = min(by_score[s] / WEEK, 1.0)
        assert pop.window_length_s[i] == pytest.approx(frac * DAY_S, rel=1e-12)
        kbps = {8000.0: 1000.0, 2400.0: 4000.0}[float(pop.downlink_bps[i]) * 8 / 1000]
        assert pop.uplink_bps[i] * 8 / 1000 == pytest.approx(kbps)
    assert set(pop.speed_score.tolist()) == set(by_score)  # with replacement, all drawn
    assert pop.bandwidth_jitter == pytest.approx(0.3375)
    np.testing.assert_array_equal(pop.dropout_prob, np.full(size, 0.1))
    assert np.all((pop.window_start_s >= 0) & (pop.window_start_s < DAY_S))


def test_log_reports_skips_and_never_charging(tiny: Path) -> None:
    lines: list[str] = []
    load_phone_population(
        PhonePopulationConfig(path=str(tiny)),
        5,
        np.random.default_rng(0),
        Path("/x"),
        log=lines.append,
    )
    assert len(lines) == 1
    assert "5 skipped: c, d, g, h, #8" in lines[0] and "1 never charge" in lines[0]


def test_score_map_endpoints_clipping_and_degenerate_anchor() -> None:
    s = np.array([0.5, 1.0, 10.0, 100.0, 400.0])
    spe = score_to_sec_per_example(s, (1.0, 100.0), 0.015, 0.2)
    assert spe[0] == spe[1] == pytest.approx(0.2)
    assert spe[3] == spe[4] == pytest.approx(0.015)
    assert spe[2] == pytest.approx(math.sqrt(0.2 * 0.015))  # log-midpoint of the scores
    same = score_to_sec_per_example(s, (5.0, 5.0), 0.015, 0.2)
    np.testing.assert_allclose(same, math.sqrt(0.015 * 0.2))


def test_always_availability_changes_only_the_windows(tiny: Path) -> None:
    base = PhonePopulationConfig(path=str(tiny))
    a = load_phone_population(base, 50, np.random.default_rng(1), Path("/x"))
    b = load_phone_population(
        replace(base, availability="always"), 50, np.random.default_rng(1), Path("/x")
    )
    np.testing.assert_array_equal(a.sec_per_example, b.sec_per_example)
    np.testing.assert_array_equal(a.downlink_bps, b.downlink_bps)
    assert b.available(12_345.0).all()


# -- errors ------------------------------------------------------------------------------------
def test_missing_folder_or_file_raises_data_error(tmp_path: Path) -> None:
    cfg = PhonePopulationConfig()
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        load_phone_population(cfg, 10, np.random.default_rng(0), missing)
    (tmp_path / DEVICES_FILE).write_text(json.dumps(TINY_DEVICES))
    with pytest.raises(DataError, match=PROFILES_FILE):
        load_phone_population(
            replace(cfg, path=str(tmp_path)), 10, np.random.default_rng(0), missing
        )
    (tmp_path / PROFILES_FILE).write_text("{not json")
    with pytest.raises(DataError, match="cannot read"):
        read_phone_trace(tmp_path)
    (tmp_path / DEVICES_FILE).write_text(json.dumps([_device("z", "", "", 5.0)]))
    with pytest.raises(DataError, match="no device has a usable 'CPU-F Score'"):
        read_phone_trace(tmp_path)


def test_config_validation_lists_every_problem_with_relative_paths() -> None:
    bad = PhonePopulationConfig(
        path=" ",
        min_sec_per_example=0.0,
        max_sec_per_example=-1.0,
        anchor_quantile=0.5,
        dropout_prob=1.0,
        bandwidth_jitter=-0.1,
        peak_hour=24.0,
        spread_hours=-1.0,
    )
    paths = [p.path for p in bad.validate()]
    assert paths == [
        "path",
        "min_sec_per_example",
        "max_sec_per_example",
        "anchor_quantile",
        "dropout_prob",
        "bandwidth_jitter",
        "peak_hour",
        "spread_hours",
    ]
    assert PhonePopulationConfig().validate() == []
    with pytest.raises(ConfigError, match="anchor_quantile"):
        load_phone_population(bad, 1, np.random.default_rng(0), SHARED)


# -- describe_population vs an independent sampled reference -----------------------------------
def test_hourly_online_fraction_matches_sampling_available(tiny: Path) -> None:
    rng = np.random.default_rng(11)
    n = 300
    length = rng.uniform(0, 1.2, n) * DAY_S  # includes always-online (>= DAY_S) clients
    length[:7] = 0.0
    pop = DevicePopulation(
        sec_per_example=np.full(n, 0.1),
        downlink_bps=np.ones(n),
        uplink_bps=np.ones(n),
        dropout_prob=np.zeros(n),
        window_start_s=rng.uniform(0, DAY_S, n),
        window_length_s=length,
    )
    d = describe_population(pop)
    per_hour = 120  # every 30 s; each window edge misplaces at most 30 s of the hour
    for h in range(24):
        ts = h * 3600.0 + (np.arange(per_hour) + 0.5) * 3600.0 / per_hour
        ref = np.mean([pop.available(float(t)).mean() for t in ts])
        assert d[f"online_h{h:02d}"] == pytest.approx(ref, abs=2 / per_hour)
    assert d["never_online"] == pytest.approx(7 / n)
    assert d["availability_mean"] == pytest.approx(np.minimum(length / DAY_S, 1).mean())


# -- the real FLASH trace ----------------------------------------------------------------------
@needs_shared
def test_real_trace_parses() -> None:
    tr = read_phone_trace(SHARED)
    assert len(tr.guids) + len(tr.skipped) == 1000
    assert len(tr.skipped) == 5  # five devices have empty score strings
    assert len(tr.profile_ids) == 19 and tr.profiles_skipped == ()
    assert 0.3 < tr.jitter < 0.5
    imp = read_phone_trace(SHARED, missing_score="impute_median")
    assert len(imp.guids) == 1000 and len(imp.imputed) == 5


@needs_shared
def test_real_ranges(real_pop: DevicePopulation) -> None:
    spe = real_pop.sec_per_example
    assert spe.min() == pytest.approx(0.015) and spe.max() == pytest.approx(0.2)
    assert 0.025 < float(np.median(spe)) < 0.05
    down = real_pop.downlink_bps * 8 / 1e6
    up = real_pop.uplink_bps * 8 / 1e6
    assert down.min() >= 2.3 and down.max() <= 17.4  # FLASH: 2.4-17 Mbit/s
    assert up.min() >= 0.4 and up.max() <= 6.7  # FLASH: 0.4-6.6 Mbit/s
    assert real_pop.source == "phones" and real_pop.size == 10_000


@needs_shared
def test_real_speed_order_follows_chip_score(real_pop: DevicePopulation) -> None:
    order = np.argsort(real_pop.speed_score, kind="stable")
    spe = real_pop.sec_per_example[order]
    assert np.all(np.diff(spe) <= 0)  # higher score -> never slower
    inside = (spe > 0.015) & (spe < 0.2)  # strictly faster between the clipped ends
    scores = real_pop.speed_score[order][inside]
    strict = np.diff(scores) > 0
    assert np.all(np.diff(spe[inside])[strict] < 0)


@needs_shared
def test_real_availability_follows_a_daily_cycle(real_pop: DevicePopulation) -> None:
    d = describe_population(real_pop)
    night = np.mean([d[f"online_h{h:02d}"] for h in (0, 1, 2, 3, 4)])
    day = np.mean([d[f"online_h{h:02d}"] for h in (12, 13, 14, 15, 16)])
    assert night > 1.4 * day
    assert d["online_peak_hour"] in (0.0, 1.0, 2.0, 3.0, 4.0)
    # The mean over the day equals the mean charging fraction (~16% on FLASH).
    hourly = [d[f"online_h{h:02d}"] for h in range(24)]
    assert np.mean(hourly) == pytest.approx(d["availability_mean"], rel=1e-9)
    assert 0.12 < d["availability_mean"] < 0.21
    assert 0.01 < d["never_online"] < 0.05  # 24 of 995 devices never charge


@needs_shared
def test_real_sampling_is_deterministic_under_a_seed() -> None:
    cfg = PhonePopulationConfig()
    a = load_phone_population(cfg, 10_000, np.random.default_rng(42), SHARED)
    b = load_phone_population(cfg, 10_000, np.random.default_rng(42), SHARED)
    c = load_phone_population(cfg, 10_000, np.random.default_rng(43), SHARED)
    for name in (
        "sec_per_example",
        "downlink_bps",
        "uplink_bps",
        "window_start_s",
        "window_length_s",
        "speed_score",
    ):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.window_start_s, c.window_start_s)
    # With replacement: 10,000 clients from 995 devices repeat devices.
    assert np.unique(a.speed_score).size < 300


# -- never-charging devices in DevicePopulation ------------------------------------------------
def _never_online() -> DevicePopulation:
    z = np.zeros(1)
    return DevicePopulation(z + 0.1, z + 1, z + 1, z, z + 3600.0, z)


def test_zero_length_window_is_never_online() -> None:
    pop = _never_online()
    ts = np.arange(0, 2 * DAY_S, 97.0)
    assert not any(pop.available(float(t))[0] for t in ts)


def test_next_online_of_a_never_online_client_is_infinite() -> None:
    assert np.isinf(_never_online().next_online(5000.0, np.array([0]))[0])
