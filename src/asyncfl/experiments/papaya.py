"""Papaya's comparison of synchronous and buffered asynchronous FL (Huba et al., "Papaya:
Practical, Private, and Scalable Federated Learning", MLSys 2022; the table of the talk):

=============================  =============  =======  =======  ======
variant                        time to train  avg ppl  top 25%  top 1%
=============================  =============  =======  =======  ======
Basic synchronous FL           130 h          68       67       47
Synchronous FL with timeout    19 h           73       73       73
FedBuff                        18 h           57       56       39
=============================  =============  =======  =======  ======

Reproduced on Shakespeare (one client per (play, role)) with the FLASH phone population and
the SAME budget of accepted client updates for the three variants:

1. **basic sync**: FedAvg that waits for its whole cohort of C (no over-selection, no deadline);
2. **sync + timeout**: FedAvg that selects ``ceil(C (1 + o))`` clients with o = 0.3, keeps the
   first C, and closes the round at a deadline. The deadline is the ``1 / (1 + o)`` quantile of
   the population's expected client durations: of ``(1 + o) C`` random clients, ``C`` are then
   expected to finish by it, so the deadline only bites in rounds that drew more slow clients
   than average, and the slowest ~``o / (1 + o)`` of the population (23%) practically never
   report. Those are the clients with the most data on the slowest phones;
3. **FedBuff** (Nguyen et al., AISTATS 2022) with concurrency C and a buffer of K updates.

All three weight updates by their example counts and step the server with SGD, lr 1 (FedAvg),
so only who gets to contribute, and when, differs. "Time to train" is the simulated time at
which the shared update budget is used up; the table also gives the time to reach the worst
final average perplexity of the three (a level every variant reaches). Quality is per-client
perplexity of the final model on each client's held-out text: the mean over all clients, and
over the 25% and 1% of clients with the most training data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from asyncfl.algorithms.fedavg import FedAvgConfig
from asyncfl.algorithms.fedbuff import FedBuffConfig
from asyncfl.core.server_opt import ServerOptimizerConfig
from asyncfl.core.weights import StalenessConfig
from asyncfl.data.registry import DataConfig, load_dataset
from asyncfl.experiments.common import (
    RunOutcome,
    RunSpec,
    client_durations,
    fmt_number,
    markdown_table,
    phones_population,
    plot_curves,
    reached_at,
    run_specs,
    write_json,
)
from asyncfl.models.config import ModelConfig
from asyncfl.models.registry import build_model
from asyncfl.sim.config import RunConfig, SimConfig
from asyncfl.sim.phones import PhonePopulationConfig
from asyncfl.sim.simulator import Progress
from asyncfl.training.config import ClientConfig

__all__ = [
    "PAPAYA_FULL",
    "PAPAYA_QUICK",
    "PAPAYA_TINY",
    "PapayaRow",
    "PapayaSettings",
    "PapayaTable",
    "papaya_specs",
    "papaya_table_markdown",
    "run_papaya",
]

BASIC = "Basic synchronous FL"
TIMEOUT = "Synchronous FL with timeout"
FEDBUFF = "FedBuff"
METRIC = "client_perplexity_mean"


@dataclass(frozen=True)
class PapayaSettings:
    """Sizes of one Papaya reproduction (see :data:`PAPAYA_QUICK` / :data:`PAPAYA_FULL`)."""

    num_roles: int | None = None
    """Shakespeare clients to keep (a seeded subset); None keeps every (play, role)."""
    seq_len: int = 80
    embed_dim: int = 8
    lstm_hidden: int = 128
    lstm_layers: int = 1
    batch_size: int = 16
    client_lr: float = 1.0
    cohort_size: int = 50
    """C: the sync cohort and FedBuff's concurrency."""
    over_selection: float = 0.3
    buffer_size: int = 10
    """K: FedBuff updates per server step."""
    fedbuff_server_lr: float | None = None
    """None: ``1 / w(C/K - 1)``, undoing the staleness weight ``w(s) = (1+s)^-0.5`` at the
    typical staleness ``C/K - 1`` so that FedBuff's mean step is FedAvg's (server lr 1)."""
    update_budget: int = 5000
    """Accepted client updates every variant gets."""
    sec_per_char: tuple[float, float] = (0.015, 0.2)
    """Compute seconds per *character* on the fastest and slowest phones (FedScale's per-sample
    latency range, charged per predicted character: a sample is ``seq_len`` predictions)."""
    min_update_fraction: float = 0.5
    """A round closed by its deadline steps only with >= this fraction of C updates."""
    evals: int = 15
    """About this many evaluations per run (for the curves)."""
    seed: int = 0

    @property
    def deadline_quantile(self) -> float:
        return 1.0 / (1.0 + self.over_selection)


PAPAYA_FULL = PapayaSettings()
PAPAYA_QUICK = PapayaSettings(
    num_roles=300, seq_len=40, lstm_hidden=64, cohort_size=20, buffer_size=5, update_budget=800
)
PAPAYA_TINY = PapayaSettings(
    num_roles=40,
    seq_len=10,
    lstm_hidden=8,
    cohort_size=4,
    buffer_size=2,
    update_budget=24,
    evals=3,
)
"""A smoke-test size (seconds); its numbers mean nothing."""


@dataclass(frozen=True)
class PapayaRow:
    variant: str
    hours: float
    hours_to_target: float | None
    ppl_mean: float
    ppl_top25: float
    ppl_top1: float
    global_ppl: float
    client_updates: int
    server_steps: int
    dropped: int
    cancelled: int
    failed_rounds: int
    top25_update_share: float
    """Fraction of accepted updates that came from the 25% of clients with the most data."""
    never_contributed: int
    stop_reason: str


@dataclass(frozen=True)
class PapayaTable:
    settings: PapayaSettings
    rows: tuple[PapayaRow, ...]
    target_ppl: float
    deadline_s: float
    population: str
    curves: dict[str, tuple[list[float], list[float]]]
    fedbuff_server_lr: float

    def to_json(self) -> dict[str, Any]:
        return {
            "experiment": "papaya",
            "settings": asdict(self.settings),
            "target_client_perplexity_mean": self.target_ppl,
            "deadline_s": self.deadline_s,
            "population": self.population,
            "fedbuff_server_lr": self.fedbuff_server_lr,
            "rows": [asdict(r) for r in self.rows],
        }


def _base_config(s: PapayaSettings) -> SimConfig:
    return SimConfig(
        seed=s.seed,
        data=DataConfig(
            name="shakespeare",
            num_clients=s.num_roles or 1,
            all_clients=s.num_roles is None,
            seq_len=s.seq_len,
        ),
        model=ModelConfig(
            name="lstm", embed_dim=s.embed_dim, lstm_hidden=s.lstm_hidden, lstm_layers=s.lstm_layers
        ),
        client=ClientConfig(epochs=1, batch_size=s.batch_size, lr=s.client_lr),
        server_optimizer=ServerOptimizerConfig(name="sgd", lr=1.0),
        run=RunConfig(max_server_steps=None, max_client_updates=s.update_budget),
    )


def _eval_every(server_steps: float, evals: int) -> int:
    return max(1, math.floor(server_steps / max(evals, 1)))


def papaya_specs(s: PapayaSettings, base: SimConfig, deadline_s: float) -> list[RunSpec]:
    """The three variants of ``base`` (data, model, client, population already set)."""
    c = s.cohort_size
    sync_steps = s.update_budget / c

    def with_alg(alg: FedAvgConfig | FedBuffConfig, steps: float) -> SimConfig:
        run = RunConfig(
            max_server_steps=None,
            max_client_updates=s.update_budget,
            eval_every=_eval_every(steps, s.evals),
        )
        return SimConfig(
            seed=base.seed,
            data=base.data,
            model=base.model,
            client=base.client,
            server_optimizer=base.server_optimizer,
            algorithm=alg,
            population=base.population,
            run=run,
        )

    basic = FedAvgConfig(cohort_size=c, example_weighting="linear")
    timeout = FedAvgConfig(
        cohort_size=c,
        over_selection=s.over_selection,
        round_deadline_s=deadline_s,
        min_updates=max(1, math.ceil(s.min_update_fraction * c)),
        example_weighting="linear",
    )
    fedbuff = FedBuffConfig(
        concurrency=c,
        buffer_size=s.buffer_size,
        staleness=StalenessConfig(kind="polynomial", a=0.5),
        example_weighting="linear",
    )
    fb_lr = s.fedbuff_server_lr or fedbuff.staleness.weight(max(0, c // s.buffer_size - 1)) ** -1
    fb_cfg = with_alg(fedbuff, s.update_budget / s.buffer_size)
    fb_cfg = replace(fb_cfg, server_optimizer=ServerOptimizerConfig(name="sgd", lr=fb_lr))
    return [
        RunSpec(BASIC, with_alg(basic, sync_steps)),
        RunSpec(TIMEOUT, with_alg(timeout, sync_steps)),
        RunSpec(FEDBUFF, fb_cfg),
    ]


def _row(o: RunOutcome, target: float, top25: np.ndarray) -> PapayaRow:
    r = o.result
    hit = reached_at(r.history, METRIC, target, "min")
    part = r.participation
    total = max(int(part.sum()), 1)
    return PapayaRow(
        variant=o.spec.label,
        hours=r.sim_time_s / 3600.0,
        hours_to_target=None if hit is None else hit["sim_time_s"] / 3600.0,
        ppl_mean=r.final[METRIC],
        ppl_top25=r.final["client_perplexity_top25"],
        ppl_top1=r.final["client_perplexity_top1"],
        global_ppl=r.final["perplexity"],
        client_updates=r.client_updates,
        server_steps=r.server_steps,
        dropped=r.dropped_updates,
        cancelled=r.cancelled_updates,
        failed_rounds=r.failed_rounds,
        top25_update_share=float(part[top25].sum()) / total,
        never_contributed=int((part == 0).sum()),
        stop_reason=r.stop_reason,
    )


def run_papaya(
    s: PapayaSettings,
    out: Path,
    *,
    log: Callable[[str], None] = lambda _m: None,
    on_start: Callable[[RunSpec], None] | None = None,
    on_progress: Callable[[RunSpec, Progress], None] | None = None,
    on_done: Callable[[RunOutcome], None] | None = None,
) -> PapayaTable:
    """Run the three variants; write table.json, table.md, perplexity_vs_hours.png and one
    folder per run into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    base = _base_config(s)
    data = load_dataset(base.data, base.seed)
    phones = PhonePopulationConfig(
        availability="trace",
        min_sec_per_example=s.seq_len * s.sec_per_char[0],
        max_sec_per_example=s.seq_len * s.sec_per_char[1],
    )
    base, pop = phones_population(base, data.num_clients, phones, log)
    model = build_model(
        "lstm",
        data.input_shape,
        data.num_classes,
        embed_dim=s.embed_dim,
        lstm_hidden=s.lstm_hidden,
        lstm_layers=s.lstm_layers,
    )
    model_bytes = 4 * sum(p.numel() for p in model.parameters())
    durations = client_durations(pop, data.train_sizes, base.client, model_bytes)
    deadline = float(np.quantile(durations[data.train_sizes > 0], s.deadline_quantile))
    log(
        f"{data.num_clients} clients, {model_bytes // 4:,} parameters; client durations "
        f"p50 {np.median(durations):.0f} s, p90 {np.quantile(durations, 0.9):.0f} s, "
        f"max {durations.max():.0f} s; deadline "
        f"{deadline:.0f} s (p{100 * s.deadline_quantile:.0f})"
    )
    outcomes = run_specs(
        papaya_specs(s, base, deadline),
        data,
        pop,
        out,
        on_start=on_start,
        on_progress=on_progress,
        on_done=on_done,
    )
    target = max(o.result.final[METRIC] for o in outcomes)
    order = np.lexsort((np.arange(data.num_clients), -data.train_sizes))
    top25 = order[: max(1, math.ceil(0.25 * data.num_clients))]
    table = PapayaTable(
        settings=s,
        rows=tuple(_row(o, target, top25) for o in outcomes),
        target_ppl=target,
        deadline_s=deadline,
        population=pop.source,
        fedbuff_server_lr=next(
            o.spec.cfg.server_optimizer.lr for o in outcomes if o.spec.label == FEDBUFF
        ),
        curves={
            o.spec.label: (
                [h["sim_time_s"] / 3600.0 for h in o.result.history],
                [h[METRIC] for h in o.result.history],
            )
            for o in outcomes
        },
    )
    write_json(out / "table.json", table.to_json())
    (out / "table.md").write_text(papaya_table_markdown(table))
    plot_curves(
        table.curves,
        out / "perplexity_vs_hours.png",
        xlabel="simulated time (hours)",
        ylabel="mean per-client perplexity (held-out)",
        title=f"Shakespeare, {pop.source} population, {s.update_budget:,} client updates",
        logy=True,
    )
    return table


def _headline(rows: Sequence[PapayaRow]) -> list[list[str]]:
    return [
        [
            r.variant,
            f"{fmt_number(r.hours)} h",
            fmt_number(r.ppl_mean),
            fmt_number(r.ppl_top25),
            fmt_number(r.ppl_top1),
        ]
        for r in rows
    ]


def _explanation(b: PapayaRow, to: PapayaRow, f: PapayaRow) -> str:
    """Why, in the terms of this run's own numbers: each claim only where the numbers show it."""
    out: list[str] = []
    if to.top25_update_share < b.top25_update_share:
        out.append(
            "A client's task time grows with its data, so the timeout variant's over-selection "
            "and deadline dropped heavy-data clients (their share of updates fell from "
            f"{100 * b.top25_update_share:.0f}% to {100 * to.top25_update_share:.0f}%)"
            + (
                ", and its model is worse on them."
                if to.ppl_top25 > b.ppl_top25
                else "; here that did not make its model worse on them."
            )
        )
    if b.hours > f.hours:
        out.append("Basic sync keeps every client but waits for the slowest phone every round.")
    if f.ppl_top1 <= min(b.ppl_top1, to.ppl_top1):
        out.append(
            "FedBuff neither waits nor drops anyone: slow clients arrive late (stale, "
            "down-weighted) but arrive, and it has the best top-1% perplexity."
        )
    else:
        why = (
            f": its heavy-data clients sent only {100 * f.top25_update_share:.0f}% of its updates"
            if f.top25_update_share < 0.25
            else ""
        )
        out.append(f"FedBuff's top-1% perplexity is not the best in this run{why}.")
    return " ".join(out)


def _dur(hours: float) -> str:
    """Simulated time readable at any scale: minutes below an hour."""
    return f"{hours:.1f} h" if hours >= 1 else f"{60 * hours:.1f} min"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b > 0 else "-"


def papaya_table_markdown(t: PapayaTable) -> str:
    """The table (simulated hours and per-client perplexities), details, and what it shows."""
    s = t.settings
    head = markdown_table(
        ["variant", "time to train", "avg ppl", "top 25%", "top 1%"], _headline(t.rows)
    )
    detail = markdown_table(
        [
            "variant",
            f"h to avg ppl <= {t.target_ppl:.2f}",
            "global ppl",
            "updates",
            "server steps",
            "dropped",
            "cancelled",
            "failed rounds",
            "updates from top-25% clients",
            "never contributed",
        ],
        [
            [
                r.variant,
                fmt_number(r.hours_to_target),
                fmt_number(r.global_ppl),
                fmt_number(r.client_updates),
                fmt_number(r.server_steps),
                fmt_number(r.dropped),
                fmt_number(r.cancelled),
                fmt_number(r.failed_rounds),
                f"{100 * r.top25_update_share:.0f}%",
                fmt_number(r.never_contributed),
            ]
            for r in t.rows
        ],
    )
    by = {r.variant: r for r in t.rows}
    lines = [
        head,
        f"Shakespeare ({'all' if s.num_roles is None else s.num_roles} (play, role) clients, "
        f"{s.seq_len}-character samples), LSTM {s.embed_dim}-{s.lstm_hidden}x{s.lstm_layers}, "
        f"{t.population} population, seed {s.seed}; every variant had the same budget of "
        f"{s.update_budget:,} accepted client updates. Time to train = simulated hours until "
        f"the budget was used up. Perplexity is per character, per client on its own held-out "
        f"text, averaged over all clients / the 25% / the 1% with the most training data "
        f"(Papaya's numbers are word-level, so only the ordering is comparable). Cohort = FedBuff "
        f"concurrency = {s.cohort_size}; timeout variant: over-selection {s.over_selection}, "
        f"deadline {t.deadline_s:.0f} s (the {100 * s.deadline_quantile:.0f}th percentile of "
        f"expected client durations, so (1+o)C clients fill C by it on average); FedBuff buffer "
        f"K = {s.buffer_size}, polynomial staleness weight (1+s)^-0.5, server lr "
        f"{t.fedbuff_server_lr:.2f} (1 / that weight at the typical staleness C/K - 1).\n",
        detail,
    ]
    if {BASIC, TIMEOUT, FEDBUFF} <= by.keys():
        b, to, f = by[BASIC], by[TIMEOUT], by[FEDBUFF]
        lines.append(
            f"Measured: basic sync took {_ratio(b.hours, f.hours)} and the timeout variant "
            f"{_ratio(to.hours, f.hours)} FedBuff's simulated time ({_dur(b.hours)} and "
            f"{_dur(to.hours)} vs {_dur(f.hours)}). Top-1% perplexity: "
            f"FedBuff {f.ppl_top1:.2f}, basic sync {b.ppl_top1:.2f}, timeout {to.ppl_top1:.2f}; "
            f"the 25% of clients with the most data sent {100 * b.top25_update_share:.0f}% "
            f"(basic), {100 * to.top25_update_share:.0f}% (timeout) and "
            f"{100 * f.top25_update_share:.0f}% (FedBuff) of the updates. "
            + _explanation(b, to, f)
            + "\n"
        )
    return "\n".join(lines)
