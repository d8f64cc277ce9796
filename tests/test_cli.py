"""The CLI end to end: outputs written, bad configs refused before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from asyncfl.cli.main import app

ROOT = Path(__file__).resolve().parents[1]


def test_simulate_writes_outputs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = CliRunner().invoke(
        app,
        [
            "simulate",
            str(ROOT / "configs" / "fedbuff_synthetic.yaml"),
            "--out",
            str(out),
            "--quiet",
            "--set",
            "run.max_server_steps=20",
            "--set",
            "run.eval_every=10",
            "--set",
            "data.num_clients=40",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "algorithm",
        "sim_time_s",
        "server_steps",
        "client_updates",
        "dropped_updates",
        "bytes_up",
        "bytes_down",
        "wall_time_s",
        "final",
    ):
        assert key in summary
    assert summary["server_steps"] == 20 and summary["client_updates"] >= 100
    assert 0.0 < summary["final"]["accuracy"] <= 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["server_steps"] for r in rows] == [0, 10, 20]
    assert (out / "metrics.png").stat().st_size > 1000
    assert "max_server_steps: 20" in (out / "config.yaml").read_text()


def test_bad_config_lists_problems_and_runs_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("algorithm: {name: fedbuff, buffer_size: 0}\nclient: {lr: -1}\n")
    out = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, "-m", "asyncfl.cli", "simulate", str(cfg), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "algorithm.buffer_size: got 0" in proc.stderr and "client.lr: got -1" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("arg", ["--help", "--version"])
def test_help_and_version(arg: str) -> None:
    res = CliRunner().invoke(app, [arg])
    assert res.exit_code == 0 and ("asyncfl" in res.output)
