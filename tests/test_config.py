"""Config loading: every problem reported with path, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from asyncfl.algorithms import FedAsyncConfig, FedAvgConfig, FedBuffConfig
from asyncfl.core.configload import apply_overrides, build_config, to_plain
from asyncfl.errors import ConfigError
from asyncfl.sim.config import SimConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_build() -> None:
    cfg = build_config(SimConfig, {})
    assert isinstance(cfg.algorithm, FedBuffConfig)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid_and_round_trip(path: Path) -> None:
    cfg = build_config(SimConfig, yaml.safe_load(path.read_text()))
    again = build_config(SimConfig, yaml.safe_load(yaml.safe_dump(to_plain(cfg))))
    assert again == cfg


def test_tagged_union_selects_algorithm() -> None:
    cfg = build_config(SimConfig, {"algorithm": {"name": "fedavg", "cohort_size": 7}})
    assert cfg.algorithm == FedAvgConfig(cohort_size=7)
    cfg = build_config(SimConfig, {"algorithm": {"name": "fedasync", "mixing_rate": 0.3}})
    assert isinstance(cfg.algorithm, FedAsyncConfig) and cfg.algorithm.mixing_rate == 0.3


def test_every_problem_is_reported_at_once() -> None:
    bad = {
        "seed": "zero",
        "data": {"name": "mnist", "num_clients": 0},
        "client": {"lr": -1, "batch_size": 0, "bogus": 1},
        "algorithm": {"name": "fedbuff", "buffer_size": 0, "staleness": {"kind": "hinge", "a": -2}},
        "server_optimizer": {"name": "adam", "beta1": 1.5},
        "run": {"eval_every": 0},
    }
    with pytest.raises(ConfigError) as info:
        build_config(SimConfig, bad)
    paths = {p.path for p in info.value.problems}
    assert {
        "seed",
        "data.name",
        "client.bogus",
        "algorithm.buffer_size",
        "algorithm.staleness.a",
        "server_optimizer.beta1",
        "run.eval_every",
    } <= paths
    text = str(info.value)
    assert "seed: got 'zero'; expected an integer" in text
    assert "data.name: got 'mnist'; expected one of 'synthetic'" in text


def test_range_checks_run_when_types_are_right() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(SimConfig, {"client": {"lr": -1, "batch_size": 0}, "data": {"num_clients": 0}})
    paths = sorted(p.path for p in info.value.problems)
    assert paths == ["client.batch_size", "client.lr", "data.num_clients"]


def test_unknown_algorithm_name() -> None:
    with pytest.raises(ConfigError, match=r"algorithm\.name: got 'fedprox'"):
        build_config(SimConfig, {"algorithm": {"name": "fedprox"}})


def test_bool_is_not_an_int_and_ints_are_floats() -> None:
    with pytest.raises(ConfigError, match="seed: got True"):
        build_config(SimConfig, {"seed": True})
    cfg = build_config(SimConfig, {"client": {"lr": 1}})
    assert cfg.client.lr == 1.0 and isinstance(cfg.client.lr, float)


def test_overrides() -> None:
    data = {"algorithm": {"name": "fedbuff"}}
    out = apply_overrides(data, ["algorithm.buffer_size=3", "model.hidden=[8, 4]", "seed=5"])
    assert data == {"algorithm": {"name": "fedbuff"}}  # input untouched
    cfg = build_config(SimConfig, out)
    assert cfg.algorithm.buffer_size == 3 and cfg.model.hidden == (8, 4) and cfg.seed == 5  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="is not a mapping"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_config_reference_doc_is_current() -> None:
    from asyncfl.cli.configdoc import render_config_reference

    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == render_config_reference(SimConfig), (
        "docs/config.md is stale: run `.venv/bin/asyncfl config-doc > docs/config.md`"
    )
