"""Shared machinery of the reproduced experiments: run several configs on one dataset and one
device population, find when a target was reached, and tabulate.

Every variant of an experiment sees the *same* clients (data) on the *same* devices
(population): only the algorithm differs, so a difference in time or quality comes from the
algorithm, not from a different draw of phones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from asyncfl.core.configload import build_config, to_plain
from asyncfl.data.federated import FederatedDataset
from asyncfl.data.registry import default_shared_data
from asyncfl.errors import ConfigError
from asyncfl.sim.config import SimConfig
from asyncfl.sim.devices import DevicePopulation
from asyncfl.sim.factory import build_population, build_simulator
from asyncfl.sim.outputs import write_run
from asyncfl.sim.phones import PhonePopulationConfig, load_phone_population
from asyncfl.sim.seeding import rng_for
from asyncfl.sim.simulator import Progress, SimResult
from asyncfl.training.config import ClientConfig

__all__ = [
    "RunOutcome",
    "RunSpec",
    "client_durations",
    "fmt_number",
    "markdown_table",
    "phones_population",
    "plot_curves",
    "reached_at",
    "run_specs",
    "slug",
    "write_json",
]

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class RunSpec:
    """One variant of an experiment: a display label and its complete config."""

    label: str
    cfg: SimConfig


@dataclass(frozen=True, eq=False)
class RunOutcome:
    spec: RunSpec
    result: SimResult
    summary: dict[str, Any]
    out_dir: Path


def slug(label: str) -> str:
    """A folder name for ``label``: lower-case letters, digits and '_' only."""
    out = "".join(c if c.isalnum() else "_" for c in label.lower())
    while "__" in out:
        out = out.replace("__", "_")
    return out.strip("_") or "run"


def phones_population(
    cfg: SimConfig,
    size: int,
    phones: PhonePopulationConfig,
    log: Callable[[str], None],
) -> tuple[SimConfig, DevicePopulation]:
    """``cfg`` with the real phone population ``phones`` selected, and that population for
    ``size`` clients.

    Preferred path: ``population.kind: phones`` in :class:`SimConfig` (built by the simulator
    factory). If this build of asyncfl does not accept that kind yet, the FLASH trace is loaded
    directly with :func:`load_phone_population` (same devices, same mapping) and ``cfg`` keeps
    its population section; ``log`` says which path was taken.
    """
    section = {"kind": "phones", "phones": to_plain(phones)}
    try:
        pop_cfg = build_config(SimConfig, {"population": section})
    except ConfigError:
        log(
            "population.kind 'phones' not accepted by SimConfig yet: "
            "loading the FLASH trace directly"
        )
        pop = load_phone_population(
            phones,
            size,
            rng_for(cfg.seed, "population"),
            default_shared_data() / "devices",
            log=log,
        )
        return cfg, pop
    with_phones = replace(cfg, population=pop_cfg.population)
    return with_phones, build_population(with_phones, size, log)


def client_durations(
    pop: DevicePopulation,
    train_sizes: npt.NDArray[np.int64],
    client: ClientConfig,
    model_bytes: int,
) -> F64:
    """Expected task duration of every client (download + compute + upload at mean bandwidth),
    the simulator's duration model without its per-transfer jitter."""
    n_proc = np.array([client.examples_processed(int(n)) for n in train_sizes], dtype=np.float64)
    return np.asarray(
        model_bytes / pop.downlink_bps
        + n_proc * pop.sec_per_example
        + model_bytes / pop.uplink_bps,
        dtype=np.float64,
    )


def run_specs(
    specs: Sequence[RunSpec],
    data: FederatedDataset,
    population: DevicePopulation,
    out: Path,
    *,
    on_start: Callable[[RunSpec], None] | None = None,
    on_progress: Callable[[RunSpec, Progress], None] | None = None,
    on_done: Callable[[RunOutcome], None] | None = None,
) -> list[RunOutcome]:
    """Run every spec on the same data and devices; write each run into ``out/<slug(label)>``."""
    labels = [slug(s.label) for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"run labels must give distinct folder names, got {labels}")
    outcomes: list[RunOutcome] = []
    for spec, name in zip(specs, labels, strict=True):
        if on_start is not None:
            on_start(spec)
        sim = build_simulator(spec.cfg, data=data, population=population)
        result = sim.run(None if on_progress is None else partial(_forward, on_progress, spec))
        run_dir = out / name
        summary = write_run(run_dir, spec.cfg, result, population.speed_score)
        outcome = RunOutcome(spec, result, summary, run_dir)
        outcomes.append(outcome)
        if on_done is not None:
            on_done(outcome)
    return outcomes


def _forward(report: Callable[[RunSpec, Progress], None], spec: RunSpec, p: Progress) -> None:
    report(spec, p)


def reached_at(
    history: Sequence[Mapping[str, float]], metric: str, value: float, mode: Literal["max", "min"]
) -> Mapping[str, float] | None:
    """The first evaluation row whose ``metric`` reached ``value`` (None if none did)."""
    for row in history:
        v = row.get(metric)
        if v is None or not math.isfinite(v):
            continue
        if (v >= value) if mode == "max" else (v <= value):
            return row
    return None


def fmt_number(v: float | int | None, digits: int = 2) -> str:
    """A table cell: '-' for missing or non-finite, thousands separators for integers."""
    if v is None:
        return "-"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if not math.isfinite(v):
        return "-"
    return f"{v:,.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table; every row must have one cell per header."""
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"row {i} has {len(row)} cells, expected {len(headers)}: {list(row)}")
    cells = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(c[j]) for c in cells) for j in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)]) + "\n"


def write_json(path: Path, data: object) -> None:
    """JSON with NaN/Inf written as null (JSON has no NaN)."""

    def clean(v: object) -> object:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        if isinstance(v, np.generic):
            return clean(v.item())
        return v

    path.write_text(json.dumps(clean(data), indent=2) + "\n")


def plot_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    hline: float | None = None,
    logy: bool = False,
) -> None:
    """One line per label (x, y) into a PNG; ``hline`` draws a dashed target level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (x, y) in curves.items():
        ax.plot(list(x), list(y), marker="o", ms=3, label=label)
    if hline is not None:
        ax.axhline(hline, ls="--", color="grey", lw=1, label="target")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
