"""FedBuff's speedup over synchronous FL and FedAsync (Nguyen et al., "Federated Learning with
Buffered Asynchronous Aggregation", AISTATS 2022, Table 1: up to 3.3x faster than FedAvgM and
2.5x faster than FedAsync in simulated time to a target accuracy).

For each concurrency Mc (clients training at once) we run, until a target next-character
accuracy or a budget of client updates:

- **FedAvgM**: synchronous FedAvg with cohort Mc and server momentum (Hsu et al. 2019);
- **FedAsync** (Xie et al. 2019): Mc clients in flight, a server step per update (K = 1);
- **FedBuff**: Mc clients in flight, a server step every K = 10 updates.

Dataset: Shakespeare with every (play, role) as a client (1,056 roles), not FEMNIST, because
our FEMNIST sample has only 105 writers and Mc = 1,000 needs at least 1,000 clients that can
train at the same time. Devices: the FLASH phones with ``availability: always`` (the paper's
simulation draws client durations and keeps every client available; a daily cycle would cap
concurrency at the ~15% of phones online). We report, per (algorithm, Mc), the simulated hours
and the client updates at the first evaluation that reached the target, or "not reached".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from asyncfl.algorithms.factory import AlgorithmConfig
from asyncfl.algorithms.fedasync import FedAsyncConfig
from asyncfl.algorithms.fedavg import FedAvgConfig
from asyncfl.algorithms.fedbuff import FedBuffConfig
from asyncfl.core.server_opt import ServerOptimizerConfig
from asyncfl.core.weights import StalenessConfig
from asyncfl.data.registry import DataConfig, load_dataset
from asyncfl.experiments.common import (
    RunOutcome,
    RunSpec,
    fmt_number,
    markdown_table,
    phones_population,
    plot_curves,
    reached_at,
    run_specs,
    write_json,
)
from asyncfl.models.config import ModelConfig
from asyncfl.sim.config import RunConfig, SimConfig
from asyncfl.sim.phones import PhonePopulationConfig
from asyncfl.sim.simulator import Progress
from asyncfl.training.config import ClientConfig

__all__ = [
    "ALGORITHMS",
    "SPEEDUP_FULL",
    "SPEEDUP_QUICK",
    "SPEEDUP_TINY",
    "SpeedupRow",
    "SpeedupSettings",
    "SpeedupTable",
    "fedbuff_server_lr",
    "run_speedup",
    "speedup_specs",
    "speedup_table_markdown",
]

ALGORITHMS = ("FedAvgM", "FedAsync", "FedBuff")
METRIC = "accuracy"


@dataclass(frozen=True)
class SpeedupSettings:
    concurrencies: tuple[int, ...] = (10, 100, 1000)
    target_accuracy: float = 0.40
    """Global next-character accuracy on all clients' held-out text."""
    max_updates: int = 6_000
    """Client updates after which a run stops whether or not it reached the target."""
    eval_updates: int = 200
    """Evaluate about every this many client updates (at least once per server step)."""
    num_roles: int | None = None
    seq_len: int = 40
    embed_dim: int = 8
    lstm_hidden: int = 64
    batch_size: int = 16
    client_lr: float = 1.0
    buffer_size: int = 10
    fedavgm_lr: float = 0.3
    fedavgm_momentum: float = 0.9
    fedbuff_lr: float | None = None
    """None: ``1 / w(Mc/K - 1)``, undoing the staleness weight at FedBuff's typical staleness
    so its mean step is FedAvg's (the paper tunes this server learning rate per task)."""
    fedasync_mixing: float = 0.6
    sec_per_char: tuple[float, float] = (0.015, 0.2)
    """As in the Papaya experiment: FedScale's per-sample latency range, per character."""
    seed: int = 0


SPEEDUP_FULL = SpeedupSettings()
SPEEDUP_QUICK = SpeedupSettings(
    concurrencies=(10, 100),
    target_accuracy=0.33,
    max_updates=3000,
    eval_updates=100,
    num_roles=400,
)
SPEEDUP_TINY = SpeedupSettings(
    concurrencies=(2, 4),
    target_accuracy=0.2,
    max_updates=16,
    eval_updates=4,
    num_roles=30,
    seq_len=10,
    lstm_hidden=8,
    buffer_size=2,
)
"""A smoke-test size (seconds); its numbers mean nothing."""


@dataclass(frozen=True)
class SpeedupRow:
    algorithm: str
    concurrency: int
    reached: bool
    hours: float | None
    """Simulated hours at the first evaluation at or above the target (None: not reached)."""
    updates: int | None
    final_accuracy: float
    hours_run: float
    updates_run: int
    server_steps: int
    stop_reason: str


@dataclass(frozen=True)
class SpeedupTable:
    settings: SpeedupSettings
    rows: tuple[SpeedupRow, ...]
    population: str
    num_clients: int
    curves: dict[str, tuple[list[float], list[float]]]

    def row(self, algorithm: str, concurrency: int) -> SpeedupRow | None:
        for r in self.rows:
            if r.algorithm == algorithm and r.concurrency == concurrency:
                return r
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "experiment": "fedbuff-speedup",
            "settings": asdict(self.settings),
            "population": self.population,
            "num_clients": self.num_clients,
            "rows": [asdict(r) for r in self.rows],
            "speedups": speedups(self),
        }


def _label(alg: str, mc: int) -> str:
    return f"{alg} Mc={mc}"


def speedup_specs(s: SpeedupSettings, base: SimConfig, num_clients: int) -> list[RunSpec]:
    """One run per (algorithm, concurrency); concurrencies above ``num_clients`` are refused."""
    too_big = [mc for mc in s.concurrencies if mc > num_clients]
    if too_big:
        raise ValueError(
            f"concurrency {too_big} exceeds the {num_clients} clients of the dataset; "
            "choose concurrencies <= the number of clients"
        )
    specs: list[RunSpec] = []
    for mc in s.concurrencies:
        fb_lr = fedbuff_server_lr(s, mc)
        algs: list[tuple[str, AlgorithmConfig, ServerOptimizerConfig, int]] = [
            (
                "FedAvgM",
                FedAvgConfig(cohort_size=mc, example_weighting="linear"),
                ServerOptimizerConfig(
                    name="momentum", lr=s.fedavgm_lr, momentum=s.fedavgm_momentum
                ),
                mc,
            ),
            (
                "FedAsync",
                FedAsyncConfig(
                    concurrency=mc,
                    mixing_rate=s.fedasync_mixing,
                    staleness=StalenessConfig(kind="polynomial", a=0.5),
                ),
                ServerOptimizerConfig(name="sgd", lr=1.0),
                1,
            ),
            (
                "FedBuff",
                FedBuffConfig(
                    concurrency=mc,
                    buffer_size=s.buffer_size,
                    staleness=StalenessConfig(kind="polynomial", a=0.5),
                    example_weighting="equal",
                ),
                ServerOptimizerConfig(name="sgd", lr=fb_lr),
                s.buffer_size,
            ),
        ]
        for name, alg, opt, per_step in algs:
            run = RunConfig(
                max_server_steps=None,
                max_client_updates=s.max_updates,
                eval_every=max(1, math.floor(s.eval_updates / per_step)),
                target_metric=METRIC,
                target_value=s.target_accuracy,
                target_mode="max",
            )
            cfg = replace(base, algorithm=alg, server_optimizer=opt, run=run)
            specs.append(RunSpec(_label(name, mc), cfg))
    return specs


def fedbuff_server_lr(s: SpeedupSettings, mc: int) -> float:
    if s.fedbuff_lr is not None:
        return s.fedbuff_lr
    return 1.0 / StalenessConfig(kind="polynomial", a=0.5).weight(max(0, mc // s.buffer_size - 1))


def _base_config(s: SpeedupSettings) -> SimConfig:
    return SimConfig(
        seed=s.seed,
        data=DataConfig(
            name="shakespeare",
            num_clients=s.num_roles or 1,
            all_clients=s.num_roles is None,
            seq_len=s.seq_len,
        ),
        model=ModelConfig(
            name="lstm", embed_dim=s.embed_dim, lstm_hidden=s.lstm_hidden, lstm_layers=1
        ),
        client=ClientConfig(epochs=1, batch_size=s.batch_size, lr=s.client_lr),
    )


def _row(o: RunOutcome, mc: int, alg: str, target: float) -> SpeedupRow:
    r = o.result
    hit = reached_at(r.history, METRIC, target, "max")
    return SpeedupRow(
        algorithm=alg,
        concurrency=mc,
        reached=hit is not None,
        hours=None if hit is None else hit["sim_time_s"] / 3600.0,
        updates=None if hit is None else int(hit["client_updates"]),
        final_accuracy=r.final[METRIC],
        hours_run=r.sim_time_s / 3600.0,
        updates_run=r.client_updates,
        server_steps=r.server_steps,
        stop_reason=r.stop_reason,
    )


def run_speedup(
    s: SpeedupSettings,
    out: Path,
    *,
    log: Callable[[str], None] = lambda _m: None,
    on_start: Callable[[RunSpec], None] | None = None,
    on_progress: Callable[[RunSpec, Progress], None] | None = None,
    on_done: Callable[[RunOutcome], None] | None = None,
) -> SpeedupTable:
    """Run every (algorithm, concurrency); write table.json, table.md, accuracy_vs_hours.png."""
    out.mkdir(parents=True, exist_ok=True)
    base = _base_config(s)
    data = load_dataset(base.data, base.seed)
    phones = PhonePopulationConfig(
        availability="always",
        min_sec_per_example=s.seq_len * s.sec_per_char[0],
        max_sec_per_example=s.seq_len * s.sec_per_char[1],
    )
    base, pop = phones_population(base, data.num_clients, phones, log)
    specs = speedup_specs(s, base, data.num_clients)
    outcomes = run_specs(
        specs, data, pop, out, on_start=on_start, on_progress=on_progress, on_done=on_done
    )
    keys = [(alg, mc) for mc in s.concurrencies for alg in ALGORITHMS]
    table = SpeedupTable(
        settings=s,
        rows=tuple(
            _row(o, mc, alg, s.target_accuracy) for o, (alg, mc) in zip(outcomes, keys, strict=True)
        ),
        population=pop.source,
        num_clients=data.num_clients,
        curves={
            o.spec.label: (
                [h["sim_time_s"] / 3600.0 for h in o.result.history],
                [h[METRIC] for h in o.result.history],
            )
            for o in outcomes
        },
    )
    write_json(out / "table.json", table.to_json())
    (out / "table.md").write_text(speedup_table_markdown(table))
    plot_curves(
        table.curves,
        out / "accuracy_vs_hours.png",
        xlabel="simulated time (hours)",
        ylabel="next-character accuracy (held-out)",
        title=f"Shakespeare, {pop.source} (always online), target {s.target_accuracy:.2f}",
        hline=s.target_accuracy,
    )
    return table


def speedups(t: SpeedupTable) -> dict[str, dict[str, float | None]]:
    """FedBuff's speedup in simulated time over each baseline, per concurrency (None when
    either run missed the target)."""
    out: dict[str, dict[str, float | None]] = {}
    for mc in t.settings.concurrencies:
        fb = t.row("FedBuff", mc)
        per: dict[str, float | None] = {}
        for other in ("FedAvgM", "FedAsync"):
            o = t.row(other, mc)
            ok = fb is not None and fb.hours and o is not None and o.hours is not None
            per[other] = o.hours / fb.hours if ok and o and o.hours and fb and fb.hours else None
        out[str(mc)] = per
    return out


def _cell(r: SpeedupRow | None) -> str:
    if r is None:
        return "-"
    if not r.reached:
        return f"not reached ({fmt_number(r.updates_run)} upd., {r.hours_run:.2f} h)"
    return f"{fmt_number(r.hours)} h / {fmt_number(r.updates)} upd."


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}x"


def speedup_table_markdown(t: SpeedupTable) -> str:
    s = t.settings
    mcs: Sequence[int] = s.concurrencies
    rows = [[alg, *(_cell(t.row(alg, mc)) for mc in mcs)] for alg in ALGORITHMS]
    sp = speedups(t)
    rows.append(["FedBuff speedup vs FedAvgM", *(_x(sp[str(mc)]["FedAvgM"]) for mc in mcs)])
    rows.append(["FedBuff speedup vs FedAsync", *(_x(sp[str(mc)]["FedAsync"]) for mc in mcs)])
    head = markdown_table(["", *(f"Mc = {mc:,}" for mc in mcs)], rows)
    note = (
        f"Simulated hours / client updates until the global next-character accuracy on held-out "
        f"text first reached {s.target_accuracy:.2f} (evaluated about every {s.eval_updates} "
        f"updates, and every round for FedAvgM), or 'not reached' within {s.max_updates:,} "
        f"updates. Shakespeare, {t.num_clients:,} (play, role) clients, {s.seq_len}-character "
        f"samples, LSTM {s.embed_dim}-{s.lstm_hidden}x1, {t.population} population always "
        f"online, seed {s.seed}. FedAvgM: cohort Mc, server momentum {s.fedavgm_momentum}, lr "
        f"{s.fedavgm_lr}; FedAsync: mixing rate {s.fedasync_mixing}, staleness (1+s)^-0.5; "
        f"FedBuff: K = {s.buffer_size}, staleness (1+s)^-0.5, server lr "
        + ", ".join(f"{fedbuff_server_lr(s, mc):.2f}" for mc in mcs)
        + " (1 / the staleness weight at staleness Mc/K - 1). "
        "Final accuracy of every run:\n"
    )
    finals = markdown_table(
        ["", *(f"Mc = {mc:,}" for mc in mcs)],
        [
            [
                alg,
                *(fmt_number(r.final_accuracy, 3) if (r := t.row(alg, mc)) else "-" for mc in mcs),
            ]
            for alg in ALGORITHMS
        ],
    )
    return "\n".join([head, note, finals])
