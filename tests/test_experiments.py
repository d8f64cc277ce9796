"""The reproduced experiments at smoke-test size: files written, shared update budget, tables."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from asyncfl.cli.experiment import experiment_app
from asyncfl.errors import ConfigError
from asyncfl.experiments.common import fmt_number, markdown_table, reached_at, slug
from asyncfl.experiments.dp import CLIP_ONLY_NOISE, DP_TINY
from asyncfl.experiments.papaya import PAPAYA_TINY, run_papaya
from asyncfl.experiments.speedup import (
    SPEEDUP_FULL,
    SPEEDUP_TINY,
    SpeedupRow,
    SpeedupTable,
    fedbuff_server_lr,
    speedup_specs,
    speedup_table_markdown,
    speedups,
    update_budget,
)
from asyncfl.sim.config import SimConfig


def test_papaya_tiny_writes_table_with_shared_budget(tmp_path: Path) -> None:
    s = replace(PAPAYA_TINY, update_budget=12, evals=2)
    table = run_papaya(s, tmp_path)
    data = json.loads((tmp_path / "table.json").read_text())
    assert [r["variant"] for r in data["rows"]] == [
        "Basic synchronous FL",
        "Synchronous FL with timeout",
        "FedBuff",
    ]
    for row in data["rows"]:
        # Same budget of accepted updates for every variant, and it is what ended each run.
        assert row["client_updates"] == 12
        assert row["stop_reason"] == "max_client_updates"
        assert row["hours"] > 0
        for key in ("ppl_mean", "ppl_top25", "ppl_top1"):
            assert math.isfinite(row[key]) and row[key] > 1.0
    assert data["deadline_s"] > 0
    # Only the timeout variant over-selects, so only it can cancel clients.
    by = {r["variant"]: r for r in data["rows"]}
    assert by["Basic synchronous FL"]["cancelled"] == 0 and by["FedBuff"]["cancelled"] == 0
    md = (tmp_path / "table.md").read_text()
    assert md.splitlines()[0].split("|")[1:-1] == [
        " variant                     ",
        " time to train ",
        " avg ppl ",
        " top 25% ",
        " top 1% ",
    ]
    assert (tmp_path / "perplexity_vs_hours.png").stat().st_size > 1000
    for r in table.rows:
        run_dir = tmp_path / slug(r.variant)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["client_updates"] == 12
        assert (run_dir / "metrics.jsonl").read_text().strip()


def test_speedup_cli_tiny(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        experiment_app,
        ["fedbuff-speedup", "--tiny", "--quiet", "--concurrency", "3", "--out", str(tmp_path)],
    )
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "table.json").read_text())
    rows = data["rows"]
    assert [(r["algorithm"], r["concurrency"]) for r in rows] == [
        ("FedAvgM", 3),
        ("FedAsync", 3),
        ("FedBuff", 3),
    ]
    for r in rows:
        assert r["updates_run"] <= update_budget(SPEEDUP_TINY, 3) == SPEEDUP_TINY.max_updates
        # Reached <=> a time and update count are reported, and they lie within the run.
        assert r["reached"] == (r["hours"] is not None)
        if r["reached"]:
            assert r["updates"] <= r["updates_run"] and r["hours"] <= r["hours_run"] + 1e-9
    assert set(data["speedups"]) == {"3"}
    assert (tmp_path / "accuracy_vs_hours.png").exists()
    assert "| FedBuff speedup vs FedAvgM" in res.output


def test_speedup_cli_runs_only_the_chosen_algorithm(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        experiment_app,
        [
            "fedbuff-speedup",
            "--tiny",
            "--quiet",
            "--concurrency",
            "3",
            "--algorithm",
            "FedBuff",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert [(r["algorithm"], r["concurrency"]) for r in rows] == [("FedBuff", 3)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["fedbuff_mc_3"]
    bad = CliRunner().invoke(
        experiment_app, ["fedbuff-speedup", "--tiny", "--quiet", "--algorithm", "FedProx"]
    )
    assert bad.exit_code != 0 and "FedProx" in bad.output


def test_speedup_settings_reject_unknown_algorithm_and_bad_budget() -> None:
    with pytest.raises(ConfigError) as err:
        replace(SPEEDUP_TINY, algorithms=("FedBuff", "fedbuff"), budget_rounds=0)
    assert {p.path for p in err.value.problems} == {"algorithms", "budget_rounds"}
    assert "fedbuff" in str(err.value)


def test_speedup_budget_and_fedbuff_lr_per_concurrency() -> None:
    s = SPEEDUP_FULL
    # Reference written out by hand: budget max(6000, 60 Mc); lr = sqrt(1 + min(Mc/10 - 1, 9)),
    # the inverse of the (1 + staleness)^-0.5 weight with the staleness capped at 9.
    assert [update_budget(s, mc) for mc in (10, 100, 1000)] == [6000, 6000, 60000]
    assert [fedbuff_server_lr(s, mc) for mc in (10, 100, 1000)] == pytest.approx(
        [1.0, 10**0.5, 10**0.5], rel=1e-12
    )
    # Below the cap the rule is untouched: Mc = 50, K = 10 -> staleness 4 -> lr sqrt(5).
    assert fedbuff_server_lr(s, 50) == pytest.approx(5**0.5, rel=1e-12)
    uncapped = replace(s, fedbuff_lr_max_staleness=1000)
    assert fedbuff_server_lr(uncapped, 1000) == pytest.approx(10.0, rel=1e-12)
    assert fedbuff_server_lr(replace(s, fedbuff_lr=0.7), 1000) == 0.7


def test_speedup_specs_scale_budget_and_eval_interval_with_concurrency() -> None:
    s = replace(SPEEDUP_FULL, concurrencies=(100, 1000), algorithms=("FedAvgM", "FedBuff"))
    specs = speedup_specs(s, SimConfig(), num_clients=1056)
    got = [
        (sp.label, sp.cfg.run.max_client_updates, sp.cfg.run.eval_every, sp.cfg.server_optimizer.lr)
        for sp in specs
    ]
    # FedAvgM evaluates every round (one step = Mc updates); FedBuff every max(200, Mc) / K
    # steps; the budget is 60 rounds at Mc = 1,000 and the 6,000 floor at Mc = 100.
    assert got == [
        ("FedAvgM Mc=100", 6000, 2, 0.3),
        ("FedBuff Mc=100", 6000, 20, pytest.approx(10**0.5)),
        ("FedAvgM Mc=1000", 60000, 1, 0.3),
        ("FedBuff Mc=1000", 60000, 100, pytest.approx(10**0.5)),
    ]


def test_markdown_table_exact() -> None:
    got = markdown_table(["a", "long header"], [["xyz", "1"], ["", "22"]])
    assert got == (
        "| a   | long header |\n"
        "|-----|-------------|\n"
        "| xyz | 1           |\n"
        "|     | 22          |\n"
    )
    with pytest.raises(ValueError, match="row 0 has 1 cells, expected 2"):
        markdown_table(["a", "b"], [["only one"]])


def test_fmt_number_and_slug() -> None:
    assert fmt_number(1234567) == "1,234,567"
    assert fmt_number(3.14159, 3) == "3.142"
    assert fmt_number(None) == "-" and fmt_number(float("nan")) == "-"
    assert slug("Synchronous FL with timeout") == "synchronous_fl_with_timeout"
    assert slug("FedBuff Mc=1000") == "fedbuff_mc_1000"


def test_reached_at_first_row_in_either_direction() -> None:
    hist = [
        {"m": 5.0, "t": 0.0},
        {"m": float("nan"), "t": 1.0},
        {"m": 3.0, "t": 2.0},
        {"m": 2.0, "t": 3.0},
    ]
    assert reached_at(hist, "m", 3.0, "min") == hist[2]
    assert reached_at(hist, "m", 4.0, "max") == hist[0]
    assert reached_at(hist, "m", 1.0, "min") is None
    assert reached_at(hist, "missing", 1.0, "max") is None


def _row(alg: str, mc: int, hours: float | None) -> SpeedupRow:
    return SpeedupRow(
        algorithm=alg,
        concurrency=mc,
        reached=hours is not None,
        hours=hours,
        updates=None if hours is None else 100,
        final_accuracy=0.3,
        hours_run=10.0,
        updates_run=500,
        server_steps=50,
        stop_reason="target_reached" if hours is not None else "max_client_updates",
    )


def test_speedups_and_table_from_rows() -> None:
    s = replace(SPEEDUP_TINY, concurrencies=(10, 100))
    t = SpeedupTable(
        settings=s,
        rows=(
            _row("FedAvgM", 10, 6.6),
            _row("FedAsync", 10, 3.0),
            _row("FedBuff", 10, 2.0),
            _row("FedAvgM", 100, None),
            _row("FedAsync", 100, 5.0),
            _row("FedBuff", 100, 4.0),
        ),
        population="phones",
        num_clients=30,
        curves={},
    )
    sp = speedups(t)
    assert sp["10"]["FedAvgM"] == pytest.approx(3.3)
    assert sp["10"]["FedAsync"] == pytest.approx(1.5)
    assert sp["100"]["FedAvgM"] is None  # the baseline missed the target: no ratio
    assert sp["100"]["FedAsync"] == pytest.approx(1.25)
    md = speedup_table_markdown(t)
    lines = md.splitlines()
    assert lines[0].split("|")[2].strip() == "Mc = 10"
    assert "2.00 h / 100 upd." in lines[4]
    assert "not reached (500 upd., 10.00 h)" in lines[2]
    assert "| FedBuff speedup vs FedAvgM  | 3.3x" in md


def test_dp_cli_tiny_epsilon_within_target_and_inf_rows_noise_free(tmp_path: Path) -> None:
    res = CliRunner().invoke(experiment_app, ["dp", "--tiny", "--quiet", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "table.json").read_text())
    rows = data["rows"]
    # JSON has no inf: the two epsilon = inf rows carry null.
    assert [(r["algorithm"], r["kind"], r["target_epsilon"]) for r in rows] == [
        ("FedAvg", "dp", 4.0),
        ("FedAvg", "clip_only", None),
        ("FedAvg", "no_dp", None),
        ("FedBuff", "dp", 4.0),
        ("FedBuff", "clip_only", None),
        ("FedBuff", "no_dp", None),
    ]
    assert data["delta"] == pytest.approx(1 / (10 * data["num_clients"]))
    for r in rows:
        # Every run takes the planned T steps: the budget guard never cut a calibrated run.
        assert r["server_steps"] == r["steps_planned"] == DP_TINY.server_steps
        assert r["stop_reason"] == "max_server_steps"
        summary = json.loads((tmp_path / slug(_dp_label(r)) / "summary.json").read_text())
        if r["kind"] == "dp":
            # Spent at most the target (calibration guarantees <=), and not far below it.
            assert 0.5 * r["target_epsilon"] < r["epsilon_spent"] <= r["target_epsilon"]
            assert summary["privacy"]["epsilon"] == pytest.approx(r["epsilon_spent"])
            assert summary["privacy"]["noise_source"] == "seeded"
            assert summary["privacy"]["formal_guarantee"] is False
            assert r["noise_multiplier"] > 0.1
        elif r["kind"] == "clip_only":
            assert r["noise_multiplier"] == CLIP_ONLY_NOISE
            assert summary["privacy"]["noise_multiplier"] == CLIP_ONLY_NOISE
        else:
            assert r["noise_multiplier"] is None and r["epsilon_spent"] is None
            assert summary["privacy"] is None
    by = {(r["algorithm"], r["kind"]): r for r in rows}
    # Same target, different accountants: FedAvg's replace-one analysis (z / 2) needs more z.
    assert by["FedAvg", "dp"]["sampling"] == "fixed_size"
    assert by["FedBuff", "dp"]["sampling"] == "async_approx"
    assert by["FedAvg", "dp"]["noise_multiplier"] > by["FedBuff", "dp"]["noise_multiplier"]
    assert (tmp_path / "accuracy_vs_epsilon.png").stat().st_size > 1000
    assert "| FedBuff   | inf" in (tmp_path / "table.md").read_text()
    assert "| algorithm |" in res.output


def _dp_label(r: dict[str, object]) -> str:
    if r["kind"] == "dp":
        return f"{r['algorithm']} eps={r['target_epsilon']:g}"
    return f"{r['algorithm']} {'clip only' if r['kind'] == 'clip_only' else 'no DP'}"


def test_dp_settings_refuse_non_finite_targets() -> None:
    with pytest.raises(ValueError, match="inf is always run"):
        replace(DP_TINY, epsilons=(1.0, math.inf))
    with pytest.raises(ValueError, match="fedbuff_concurrency=3 < cohort=5"):
        replace(DP_TINY, fedbuff_concurrency=3)
