"""Utility against privacy for DP-FedAvg and DP-FedBuff: final accuracy / perplexity at target
epsilon in {1, 2, 4, 8, inf} on Shakespeare (user-level DP, McMahan et al., "Learning
Differentially Private Recurrent Language Models", ICLR 2018; FedBuff with DP as in Nguyen et
al., AISTATS 2022, section 5).

Method. Every run takes the same number T of server steps, each on C = K updates clipped to L2
norm ``clip_norm`` (equal weights, fixed denominator; :mod:`asyncfl.sim.dp`). For each target
epsilon the noise multiplier z is the smallest one with epsilon(delta) <= target after T steps
(:func:`asyncfl.privacy.calibrate_noise_multiplier`), computed under the SAME sampling
assumption the simulator's accountant uses for that algorithm:

- FedAvg: a cohort of exactly C of the N users, drawn uniformly without replacement, under
  replace-one adjacency (``fixed_size``; the accountant records a Gaussian of multiplier z / 2,
  since replacing one user moves the sum by up to 2 C);
- FedBuff: one Poisson-sampled Gaussian of multiplier z with q = K / N per server step under
  add/remove adjacency (``async_approx``): asynchronous arrival is not Poisson sampling, so this
  is the field's standard approximation, not a proof.

The run also carries ``privacy.epsilon_budget = target`` as a guard, and the table reports the
epsilon the run's own accountant spent. Two rows per algorithm have epsilon = inf: the run
without DP, and "clip only" (clipping and the fixed denominator, noise multiplier 1e-6, i.e.
noise std 1e-6 C / K per coordinate, negligible) that separates the cost of clipping from the
cost of noise. Noise comes from the seeded generator (reproducible, NO formal guarantee);
``secure`` is the simulator's default.

Dataset: Shakespeare with every (play, role) as a user (1,056 users), the largest natural
population in this repository (FEMNIST's sample has 105 writers, too few for q = C / N to be
small). Devices: the FLASH phones, always online, so FedAvg's cohort really is a uniform draw
from all N users, as its accountant assumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from asyncfl.algorithms.factory import AlgorithmConfig
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
    run_specs,
    write_json,
)
from asyncfl.models.config import ModelConfig
from asyncfl.privacy import calibrate_noise_multiplier
from asyncfl.privacy.config import SamplingScheme
from asyncfl.sim.config import RunConfig, SimConfig
from asyncfl.sim.dp import DPSection
from asyncfl.sim.phones import PhonePopulationConfig
from asyncfl.sim.simulator import Progress
from asyncfl.training.config import ClientConfig

__all__ = [
    "CLIP_ONLY_NOISE",
    "DP_ALGORITHMS",
    "DP_FULL",
    "DP_QUICK",
    "DP_TINY",
    "DPAlgorithm",
    "DPRow",
    "DPSettings",
    "DPTable",
    "DPVariant",
    "dp_specs",
    "dp_table_markdown",
    "dp_variants",
    "fedbuff_server_lr",
    "plot_metric_vs_epsilon",
    "run_dp",
]

DPAlgorithm = Literal["FedAvg", "FedBuff"]
DP_ALGORITHMS: tuple[DPAlgorithm, ...] = ("FedAvg", "FedBuff")
CLIP_ONLY_NOISE = 1e-6
"""z of the "clip only" rows: the simulator needs z > 0; the noise std on the mean is
z C / K, some 1e-8 here, far below float32 resolution of the parameters."""
METRIC = "accuracy"


@dataclass(frozen=True)
class DPSettings:
    epsilons: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    """Target epsilons (finite); epsilon = inf is always run (no DP, and clip only)."""
    server_steps: int = 20
    """T: server steps of every run; z is calibrated so that epsilon(T) = target."""
    cohort: int = 100
    """Updates per server step: FedAvg's cohort C and FedBuff's buffer K."""
    fedbuff_concurrency: int = 200
    """Mc: FedBuff's clients in flight."""
    clip_norm: float = 1.0
    """L2 clip norm of every update (the median update norm at initialisation is ~2.7)."""
    delta: float | None = None
    """None: 1 / (10 N), the simulator's default."""
    accountant: Literal["rdp"] = "rdp"
    """rdp only: dp-accounting's PLD has no fixed-size (without replacement) sampling."""
    calibration_tolerance: float = 1e-3
    """Absolute tolerance of the z search (the result always has epsilon <= target)."""
    eval_every: int = 10
    """Evaluate every this many server steps (and at the end)."""
    num_roles: int | None = None
    """None: every (play, role) of Shakespeare."""
    seq_len: int = 40
    embed_dim: int = 8
    lstm_hidden: int = 64
    batch_size: int = 16
    local_steps: int = 10
    """Minibatch steps per client update (fixed, so every update costs the same)."""
    client_lr: float = 1.0
    fedavg_lr: float = 1.0
    fedbuff_lr: float | None = None
    """None: 1 / w(Mc/K - 1), as in the speedup experiment (undoes the typical staleness
    weight so FedBuff's mean step is FedAvg's)."""
    sec_per_char: tuple[float, float] = (0.015, 0.2)
    """As in the Papaya experiment: FedScale's per-sample latency range, per character."""
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [e for e in self.epsilons if not (math.isfinite(e) and e > 0)]
        if bad or not self.epsilons:
            raise ValueError(
                f"epsilons={self.epsilons!r}: give finite targets > 0 (inf is always run)"
            )
        if self.server_steps < 1 or self.cohort < 1:
            raise ValueError(
                f"server_steps={self.server_steps}, cohort={self.cohort}: both must be >= 1"
            )
        if self.fedbuff_concurrency < self.cohort:
            raise ValueError(
                f"fedbuff_concurrency={self.fedbuff_concurrency} < cohort={self.cohort}: "
                "FedBuff needs at least K clients in flight to fill its buffer"
            )


DP_FULL = DPSettings()
DP_QUICK = DPSettings(
    epsilons=(1.0, 8.0), server_steps=10, cohort=20, fedbuff_concurrency=40, eval_every=5
)
"""A few minutes: the two ends of the epsilon range, C = K = 20 (q = 0.019)."""
DP_TINY = DPSettings(
    epsilons=(4.0,),
    server_steps=3,
    cohort=5,
    fedbuff_concurrency=8,
    calibration_tolerance=0.05,
    eval_every=3,
    num_roles=30,
    seq_len=10,
    lstm_hidden=8,
    local_steps=2,
)
"""A smoke-test size (seconds); its numbers mean nothing."""


@dataclass(frozen=True)
class DPVariant:
    """One run of the experiment before it is run."""

    algorithm: DPAlgorithm
    kind: Literal["dp", "clip_only", "no_dp"]
    target_epsilon: float
    """math.inf for clip_only and no_dp."""
    noise_multiplier: float | None
    """None: no DP at all."""
    sampling: SamplingScheme
    q: float

    @property
    def label(self) -> str:
        if self.kind == "dp":
            return f"{self.algorithm} eps={self.target_epsilon:g}"
        return f"{self.algorithm} {'clip only' if self.kind == 'clip_only' else 'no DP'}"


@dataclass(frozen=True)
class DPRow:
    algorithm: str
    kind: str
    target_epsilon: float
    """math.inf (written as null in JSON) for clip only and no DP."""
    epsilon_spent: float | None
    """From the run's accountant (None without DP)."""
    delta: float | None
    noise_multiplier: float | None
    clip_norm: float | None
    sampling: str | None
    q: float
    steps_planned: int
    server_steps: int
    client_updates: int
    accuracy: float
    perplexity: float
    client_perplexity_mean: float
    hours: float
    stop_reason: str
    wall_s: float


@dataclass(frozen=True)
class DPTable:
    settings: DPSettings
    rows: tuple[DPRow, ...]
    num_clients: int
    population: str
    delta: float

    def row(self, algorithm: str, kind: str, target: float = math.inf) -> DPRow | None:
        for r in self.rows:
            if r.algorithm == algorithm and r.kind == kind and r.target_epsilon == target:
                return r
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "experiment": "dp",
            "settings": asdict(self.settings),
            "num_clients": self.num_clients,
            "population": self.population,
            "delta": self.delta,
            "rows": [asdict(r) for r in self.rows],
        }


def _sampling(alg: DPAlgorithm) -> SamplingScheme:
    # What DPSection.sampling = "auto" resolves to in the simulator, for each algorithm.
    return "fixed_size" if alg == "FedAvg" else "async_approx"


def dp_variants(s: DPSettings, num_clients: int, delta: float) -> list[DPVariant]:
    """Per algorithm: one calibrated run per target epsilon, then clip only, then no DP."""
    if s.cohort > num_clients:
        raise ValueError(
            f"cohort={s.cohort} exceeds the {num_clients} users; choose cohort <= users"
        )
    out: list[DPVariant] = []
    q = s.cohort / num_clients
    for alg in DP_ALGORITHMS:
        sampling = _sampling(alg)
        for eps in s.epsilons:
            z = calibrate_noise_multiplier(
                eps,
                delta,
                s.server_steps,
                q,
                sampling=sampling,
                accountant=s.accountant,
                population=num_clients,
                tolerance=s.calibration_tolerance,
            )
            out.append(DPVariant(alg, "dp", eps, z, sampling, q))
        out.append(DPVariant(alg, "clip_only", math.inf, CLIP_ONLY_NOISE, sampling, q))
        out.append(DPVariant(alg, "no_dp", math.inf, None, sampling, q))
    return out


def fedbuff_server_lr(s: DPSettings) -> float:
    """FedBuff's server lr: the setting, or 1 / w(Mc/K - 1) (undoes the typical staleness)."""
    if s.fedbuff_lr is not None:
        return s.fedbuff_lr
    typical = max(0, s.fedbuff_concurrency // s.cohort - 1)
    return 1.0 / StalenessConfig(kind="polynomial", a=0.5).weight(typical)


def dp_specs(
    s: DPSettings, base: SimConfig, variants: Sequence[DPVariant], delta: float
) -> list[RunSpec]:
    """One run per variant; every run uses equal weights (DP needs them), so the no-DP rows
    differ from the DP rows only in clipping and noise."""
    specs: list[RunSpec] = []
    for v in variants:
        alg: AlgorithmConfig
        if v.algorithm == "FedAvg":
            alg = FedAvgConfig(cohort_size=s.cohort, example_weighting="equal")
            lr = s.fedavg_lr
        else:
            alg = FedBuffConfig(
                concurrency=s.fedbuff_concurrency,
                buffer_size=s.cohort,
                staleness=StalenessConfig(kind="polynomial", a=0.5),
                example_weighting="equal",
            )
            lr = fedbuff_server_lr(s)
        privacy = (
            DPSection()
            if v.noise_multiplier is None
            else DPSection(
                enabled=True,
                noise_multiplier=v.noise_multiplier,
                clip_norm=s.clip_norm,
                delta=delta,
                # The guard: a step that would take epsilon above the target is refused.
                epsilon_budget=v.target_epsilon if v.kind == "dp" else None,
                accountant=s.accountant,
                sampling=v.sampling,
                noise_source="seeded",
            )
        )
        run = RunConfig(max_server_steps=s.server_steps, eval_every=s.eval_every)
        cfg = replace(
            base,
            algorithm=alg,
            server_optimizer=ServerOptimizerConfig(name="sgd", lr=lr),
            run=run,
            privacy=privacy,
        )
        specs.append(RunSpec(v.label, cfg))
    return specs


def _base_config(s: DPSettings) -> SimConfig:
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
        client=ClientConfig(steps=s.local_steps, batch_size=s.batch_size, lr=s.client_lr),
    )


def _row(o: RunOutcome, v: DPVariant, s: DPSettings) -> DPRow:
    r = o.result
    p = r.privacy
    eps = p.get("epsilon") if p is not None else None
    return DPRow(
        algorithm=v.algorithm,
        kind=v.kind,
        target_epsilon=v.target_epsilon,
        epsilon_spent=float(eps) if isinstance(eps, int | float) else None,
        delta=float(d) if p is not None and isinstance(d := p.get("delta"), float) else None,
        noise_multiplier=v.noise_multiplier,
        clip_norm=s.clip_norm if v.noise_multiplier is not None else None,
        sampling=v.sampling if v.noise_multiplier is not None else None,
        q=v.q,
        steps_planned=s.server_steps,
        server_steps=r.server_steps,
        client_updates=r.client_updates,
        accuracy=r.final[METRIC],
        perplexity=r.final.get("perplexity", math.nan),
        client_perplexity_mean=r.final.get("client_perplexity_mean", math.nan),
        hours=r.sim_time_s / 3600.0,
        stop_reason=r.stop_reason,
        wall_s=r.wall_time_s,
    )


def run_dp(
    s: DPSettings,
    out: Path,
    *,
    log: Callable[[str], None] = lambda _m: None,
    on_start: Callable[[RunSpec], None] | None = None,
    on_progress: Callable[[RunSpec, Progress], None] | None = None,
    on_done: Callable[[RunOutcome], None] | None = None,
) -> DPTable:
    """Calibrate z per (algorithm, target epsilon), run every variant on the same users and
    devices; write table.json, table.md, accuracy_vs_epsilon.png and one folder per run."""
    out.mkdir(parents=True, exist_ok=True)
    base = _base_config(s)
    data = load_dataset(base.data, base.seed)
    n = data.num_clients
    delta = s.delta if s.delta is not None else 1.0 / (10.0 * n)
    phones = PhonePopulationConfig(
        availability="always",
        min_sec_per_example=s.seq_len * s.sec_per_char[0],
        max_sec_per_example=s.seq_len * s.sec_per_char[1],
    )
    base, pop = phones_population(base, n, phones, log)
    log(f"calibrating z for epsilon {list(s.epsilons)} after T = {s.server_steps} steps")
    variants = dp_variants(s, n, delta)
    for v in variants:
        if v.kind == "dp":
            log(f"{v.label}: z = {v.noise_multiplier:.4f} ({v.sampling}, q = {v.q:.4f})")
    outcomes = run_specs(
        dp_specs(s, base, variants, delta),
        data,
        pop,
        out,
        on_start=on_start,
        on_progress=on_progress,
        on_done=on_done,
    )
    table = DPTable(
        settings=s,
        rows=tuple(_row(o, v, s) for o, v in zip(outcomes, variants, strict=True)),
        num_clients=n,
        population=pop.source,
        delta=delta,
    )
    write_json(out / "table.json", table.to_json())
    (out / "table.md").write_text(dp_table_markdown(table))
    plot_metric_vs_epsilon(table, out / "accuracy_vs_epsilon.png")
    return table


def _eps_cell(r: DPRow) -> str:
    if r.kind != "dp":
        return "inf"
    return f"{r.target_epsilon:g}"


def _kind_cell(r: DPRow) -> str:
    return {"dp": "clip + noise", "clip_only": "clip only", "no_dp": "no DP"}[r.kind]


def dp_table_markdown(t: DPTable) -> str:
    s = t.settings
    rows = [
        [
            r.algorithm,
            _eps_cell(r),
            _kind_cell(r),
            "-" if r.kind != "dp" or r.epsilon_spent is None else f"{r.epsilon_spent:.3f}",
            "-"
            if r.noise_multiplier is None
            else ("~0" if r.kind == "clip_only" else f"{r.noise_multiplier:.3f}"),
            f"{r.q:.4f}",
            f"{r.server_steps} / {r.steps_planned}",
            fmt_number(r.accuracy, 3),
            fmt_number(r.perplexity, 2),
        ]
        for r in t.rows
    ]
    head = markdown_table(
        [
            "algorithm",
            "target eps",
            "mechanism",
            "eps spent",
            "z",
            "q",
            "steps",
            "accuracy",
            "perplexity",
        ],
        rows,
    )
    fb_lr = fedbuff_server_lr(s)
    note = (
        f"Shakespeare, {t.num_clients:,} (play, role) users, {s.seq_len}-character samples, LSTM "
        f"{s.embed_dim}-{s.lstm_hidden}x1, {s.local_steps} local SGD steps of batch "
        f"{s.batch_size} at lr {s.client_lr}; {t.population} population always online; seed "
        f"{s.seed}. T = {s.server_steps} server steps of C = K = {s.cohort} updates clipped to "
        f"L2 norm {s.clip_norm:g}, equal weights; delta = {t.delta:.3g}. FedAvg: server SGD lr "
        f"{s.fedavg_lr:g}, accountant 'fixed_size' (replace-one). FedBuff: Mc = "
        f"{s.fedbuff_concurrency}, staleness (1+s)^-0.5, server lr {fb_lr:.3g}, accountant "
        "'async_approx' (add/remove; an approximation). Accuracy and perplexity: next character "
        "on all users' held-out text after the last step. Noise: seeded (no formal guarantee).\n"
    )
    return "\n".join([head, note])


def plot_metric_vs_epsilon(t: DPTable, path: Path) -> None:
    """Final accuracy against target epsilon, log-x, one line per algorithm; epsilon = inf (no
    DP) is drawn at the right end, and clip only as a hollow marker there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted({r.target_epsilon for r in t.rows if r.kind == "dp"})
    x_inf = finite[-1] * 2.0 if finite else 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for alg in DP_ALGORITHMS:
        dp_rows = sorted(
            (r for r in t.rows if r.algorithm == alg and r.kind == "dp"),
            key=lambda r: r.target_epsilon,
        )
        xs = [r.target_epsilon for r in dp_rows]
        ys = [r.accuracy for r in dp_rows]
        no_dp = t.row(alg, "no_dp")
        if no_dp is not None:
            xs.append(x_inf)
            ys.append(no_dp.accuracy)
        (line,) = ax.plot(xs, ys, marker="o", ms=4, label=alg)
        clip = t.row(alg, "clip_only")
        if clip is not None:
            ax.plot(
                [x_inf],
                [clip.accuracy],
                marker="s",
                ms=7,
                mfc="none",
                color=line.get_color(),
                ls="none",
                label=f"{alg} clip only",
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks([*finite, x_inf])
    ax.set_xticklabels([f"{e:g}" for e in finite] + ["inf\n(no DP)"])
    ax.minorticks_off()
    ax.set_xlabel("target epsilon (user level)")
    ax.set_ylabel("next-character accuracy (held-out)")
    ax.set_title(
        f"Shakespeare, N = {t.num_clients:,}, C = K = {t.settings.cohort}, "
        f"T = {t.settings.server_steps}"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
