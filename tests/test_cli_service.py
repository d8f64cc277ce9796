"""`asyncfl tee-trust`: the values a device must trust for a tee task."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from asyncfl.cli.main import app
from asyncfl.core.configload import build_config
from asyncfl.service.config import ServiceConfig
from asyncfl.service.task import initial_params
from asyncfl.service.tee import expected_measurement_for, load_vendor


def _config(tmp: Path, mode: str) -> Path:
    (tmp / "secret").write_text("ab" * 32)
    cfg = {
        "server": {"host": "127.0.0.1", "port": 0, "insecure": True},
        "auth": {"secret_file": str(tmp / "secret")},
        "storage": {"dir": str(tmp / "state")},
        "tasks": [
            {
                "id": "t",
                "model": {"name": "logistic"},
                "input_shape": [6],
                "num_classes": 3,
                "algorithm": {"name": "fedbuff", "concurrency": 4, "buffer_size": 2},
                "secure_aggregation": {"mode": mode, "frac_bits": 16, "weight_bits": 8},
            }
        ],
    }
    path = tmp / "server.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_tee_trust_prints_vendor_key_and_measurement(tmp_path: Path) -> None:
    path = _config(tmp_path, "tee")
    res = CliRunner().invoke(app, ["tee-trust", str(path), "--task", "t"])
    assert res.exit_code == 0, res.output
    lines = dict(line.split(": ") for line in res.output.strip().splitlines())
    cfg = build_config(ServiceConfig, yaml.safe_load(path.read_text()))
    task = cfg.tasks[0]
    vendor = load_vendor(tmp_path / "state" / "t.tee-vendor.key")
    assert lines["tee_vendor_public"] == vendor.public.hex()
    dim = int(initial_params(task).shape[0])
    assert lines["tee_measurement"] == expected_measurement_for(task, dim).hex()


def test_tee_trust_refuses_unknown_or_plain_tasks(tmp_path: Path) -> None:
    path = _config(tmp_path, "none")
    runner = CliRunner()
    assert runner.invoke(app, ["tee-trust", str(path), "--task", "nope"]).exit_code == 2
    assert runner.invoke(app, ["tee-trust", str(path), "--task", "t"]).exit_code == 2
