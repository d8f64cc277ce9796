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

The update budget grows with Mc (at least ``budget_rounds`` FedAvgM rounds), and FedBuff's
staleness-compensating server lr is capped (``fedbuff_server_lr``). At Mc = 1,000 of 1,056
clients nearly the whole population is always training: FedAvgM's cohort is almost everyone
(each round waits for the slowest phone of nearly all), while the asynchronous methods can only
replace a finished client with one of the ~56 idle ones, which are the ones that just finished,
i.e. the fast phones with little data, so the slow clients' updates arrive rarely and very stale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
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
from asyncfl.errors import ConfigError, ConfigProblem
from asyncfl.experiments.common import (
    RunOutcome,
    RunSpec,
    fmt_number,
    markdown_table,
    phones_population,
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
    "plot_speedup",
    "run_speedup",
    "speedup_specs",
    "speedup_table_markdown",
    "update_budget",
]

ALGORITHMS = ("FedAvgM", "FedAsync", "FedBuff")
METRIC = "accuracy"


@dataclass(frozen=True)
class SpeedupSettings:
    concurrencies: tuple[int, ...] = (10, 100, 1000)
    target_accuracy: float = 0.40
    """Global next-character accuracy on all clients' held-out text."""
    max_updates: int = 6_000
    """Least client-update budget: a run stops after ``update_budget(s, Mc)`` updates whether or
    not it reached the target."""
    budget_rounds: int = 60
    """The budget is at least this many FedAvgM rounds (``budget_rounds * Mc`` updates): a fixed
    6,000 updates gave FedAvgM 6 rounds at Mc = 1,000; at Mc = 100 it needed about 60 rounds."""
    eval_updates: int = 200
    """Evaluate about every ``max(eval_updates, Mc)`` client updates (at least once per server
    step): one evaluation of all held-out text costs about as much wall time as 100 updates, so
    a fixed interval would dominate the long Mc = 1,000 runs."""
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
    """None: ``1 / w(min(Mc/K - 1, fedbuff_lr_max_staleness))``, undoing the staleness weight at
    FedBuff's typical staleness so its mean step is FedAvg's, up to a cap (see
    ``fedbuff_server_lr``; the paper tunes this server learning rate per task)."""
    fedbuff_lr_max_staleness: int = 9
    """Staleness beyond which the server lr no longer grows (cap 1 / w(9) = sqrt(10) = 3.16)."""
    fedasync_mixing: float = 0.6
    sec_per_char: tuple[float, float] = (0.015, 0.2)
    """As in the Papaya experiment: FedScale's per-sample latency range, per character."""
    seed: int = 0
    algorithms: tuple[str, ...] = ALGORITHMS
    """Which of FedAvgM, FedAsync, FedBuff to run (e.g. one per process, to use two cores)."""

    def __post_init__(self) -> None:
        # Validate before anything runs: a typo would otherwise silently drop a column.
        problems: list[ConfigProblem] = []
        bad = [a for a in self.algorithms if a not in ALGORITHMS]
        if bad or not self.algorithms or len(set(self.algorithms)) != len(self.algorithms):
            problems.append(
                ConfigProblem("algorithms", self.algorithms, f"distinct names among {ALGORITHMS}")
            )
        for name in ("max_updates", "budget_rounds", "eval_updates"):
            if getattr(self, name) < 1:
                problems.append(ConfigProblem(name, getattr(self, name), "an integer >= 1"))
        if self.fedbuff_lr_max_staleness < 0:
            problems.append(
                ConfigProblem(
                    "fedbuff_lr_max_staleness", self.fedbuff_lr_max_staleness, "an integer >= 0"
                )
            )
        if problems:
            raise ConfigError(problems)


SPEEDUP_FULL = SpeedupSettings()
SPEEDUP_QUICK = SpeedupSettings(
    concurrencies=(10, 100),
    target_accuracy=0.33,
    max_updates=3000,
    budget_rounds=30,
    eval_updates=100,
    num_roles=400,
)
SPEEDUP_TINY = SpeedupSettings(
    concurrencies=(2, 4),
    target_accuracy=0.2,
    max_updates=16,
    budget_rounds=1,
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
            if name not in s.algorithms:
                continue
            run = RunConfig(
                max_server_steps=None,
                max_client_updates=update_budget(s, mc),
                eval_every=max(1, math.floor(max(s.eval_updates, mc) / per_step)),
                target_metric=METRIC,
                target_value=s.target_accuracy,
                target_mode="max",
            )
            cfg = replace(base, algorithm=alg, server_optimizer=opt, run=run)
            specs.append(RunSpec(_label(name, mc), cfg))
    return specs


def update_budget(s: SpeedupSettings, mc: int) -> int:
    """Client updates a run at concurrency ``mc`` may use: at least ``budget_rounds`` FedAvgM
    rounds of cohort ``mc``, and never fewer than ``max_updates``."""
    return max(s.max_updates, s.budget_rounds * mc)


def fedbuff_server_lr(s: SpeedupSettings, mc: int) -> float:
    """FedBuff's server lr: ``1 / w(min(Mc/K - 1, fedbuff_lr_max_staleness))``.

    With Mc clients in flight and a step every K updates, a typical update is Mc/K - 1 steps
    stale; dividing by its weight w makes the mean step FedAvg's. The cap exists because that
    compensation also multiplies every *fresh* update, and because FedBuff's convergence bound
    (Nguyen et al. 2022, Thm. 1) needs the step to shrink, not grow, as staleness grows: the
    uncapped rule gave lr 10 at Mc = 1,000, where FedBuff stalled at 0.11 accuracy. The default
    cap (staleness 9, lr sqrt(10)) is the largest value measured to work (Mc = 100), so the
    Mc = 10 and 100 settings are the uncapped rule's.
    """
    if s.fedbuff_lr is not None:
        return s.fedbuff_lr
    stale = min(max(0, mc // s.buffer_size - 1), s.fedbuff_lr_max_staleness)
    return 1.0 / StalenessConfig(kind="polynomial", a=0.5).weight(stale)


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
    keys = [(alg, mc) for mc in s.concurrencies for alg in ALGORITHMS if alg in s.algorithms]
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
    plot_speedup(
        table.curves,
        s.concurrencies,
        out / "accuracy_vs_hours.png",
        target=s.target_accuracy,
        title=f"Shakespeare, {pop.source} (always online)",
    )
    return table


def plot_speedup(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    concurrencies: Sequence[int],
    path: Path,
    *,
    target: float,
    title: str,
) -> None:
    """Accuracy against simulated hours (log scale), one panel per concurrency (curves
    labelled ``"<algorithm> Mc=<mc>"``): the runs span minutes to days of simulated time, so a
    shared linear axis would squash the fast ones into its left edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(concurrencies), figsize=(4.2 * len(concurrencies), 3.8), squeeze=False
    )
    for ax, mc in zip(axes[0], concurrencies, strict=True):
        for alg in ALGORITHMS:
            if (xy := curves.get(_label(alg, mc))) is not None:
                # Log time: the asynchronous runs finish 10-100x sooner than FedAvgM's rounds;
                # the evaluation at time 0 has no place on it.
                pts = [(x, y) for x, y in zip(xy[0], xy[1], strict=True) if x > 0]
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=2, label=alg)
        ax.axhline(target, ls="--", color="grey", lw=1, label="target")
        ax.set_xscale("log")
        ax.set_title(f"Mc = {mc:,}")
        ax.set_xlabel("simulated time (hours, log scale)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("next-character accuracy (held-out)")
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
        f"text first reached {s.target_accuracy:.2f} (evaluated about every max({s.eval_updates}, "
        f"Mc) updates, and every round for FedAvgM), or 'not reached' within the update budget "
        + ", ".join(f"{update_budget(s, mc):,}" for mc in mcs)
        + f" (max({s.max_updates:,}, {s.budget_rounds} x Mc)). Shakespeare, {t.num_clients:,} "
        f"(play, role) clients, {s.seq_len}-character "
        f"samples, LSTM {s.embed_dim}-{s.lstm_hidden}x1, {t.population} population always "
        f"online, seed {s.seed}. FedAvgM: cohort Mc, server momentum {s.fedavgm_momentum}, lr "
        f"{s.fedavgm_lr}; FedAsync: mixing rate {s.fedasync_mixing}, staleness (1+s)^-0.5; "
        f"FedBuff: K = {s.buffer_size}, staleness (1+s)^-0.5, server lr "
        + ", ".join(f"{fedbuff_server_lr(s, mc):.2f}" for mc in mcs)
        + " (1 / the staleness weight at staleness min(Mc/K - 1, "
        f"{s.fedbuff_lr_max_staleness})). "
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
