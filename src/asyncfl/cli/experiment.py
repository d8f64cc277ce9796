"""``asyncfl experiment``: the reproduced experiments (Papaya's table, FedBuff's speedup, DP)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from asyncfl.experiments.common import RunOutcome, RunSpec
from asyncfl.sim.simulator import Progress as SimProgress

__all__ = ["experiment_app"]

T = TypeVar("T")

experiment_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=(
        "Reproduce published experiments (Papaya's sync-vs-FedBuff table, FedBuff's speedup, "
        "utility against privacy)."
    ),
)
console = Console(stderr=True)

OutOpt = Annotated[Path | None, typer.Option("--out", help="Output folder.")]
QuickOpt = Annotated[bool, typer.Option("--quick", help="A few-minute version on 2 CPU cores.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of data subset, devices and training.")]
TinyOpt = Annotated[bool, typer.Option("--tiny", hidden=True, help="Smoke-test size (seconds).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress output.")]


class _Reporter:
    """A progress bar for the run in flight and one printed line per finished run."""

    def __init__(self, bar: Progress, budget: Callable[[RunSpec], int | None], quiet: bool) -> None:
        self.bar = bar
        self.quiet = quiet
        self.budget = budget
        self.task: TaskID | None = None
        self.t0 = time.perf_counter()

    def start(self, spec: RunSpec) -> None:
        self.task = self.bar.add_task(spec.label, total=self.budget(spec), info="")

    def progress(self, spec: RunSpec, p: SimProgress) -> None:
        del spec
        if self.task is not None:
            self.bar.update(
                self.task,
                completed=p.client_updates,
                info=f"sim {p.sim_time_s / 3600:7.2f} h  steps {p.server_steps}",
            )

    def done(self, o: RunOutcome) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
            self.task = None
        if self.quiet:
            return
        r, f = o.result, o.result.final
        quality = (
            f"client ppl {f['client_perplexity_mean']:.2f}"
            if "client_perplexity_mean" in f
            else f"acc {f.get('accuracy', float('nan')):.3f}"
        )
        self.bar.console.print(
            f"[green]done[/] {o.spec.label}: {r.client_updates:,} updates, "
            f"{r.server_steps:,} steps, {r.sim_time_s / 3600:.2f} simulated h, {quality}, "
            f"{r.stop_reason}, {r.wall_time_s:.0f} s wall -> {o.out_dir}"
        )


@contextmanager
def _reporter(quiet: bool, budget: Callable[[RunSpec], int | None]) -> Iterator[_Reporter]:
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} updates  {task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    ) as bar:
        yield _Reporter(bar, budget, quiet)


def _log(quiet: bool) -> Callable[[str], None]:
    return (lambda _m: None) if quiet else (lambda m: console.print(f"[dim]{m}"))


def _updates_budget(spec: RunSpec) -> int | None:
    return spec.cfg.run.max_client_updates


def _execute(
    name: str,
    dest: Path,
    quiet: bool,
    budget: Callable[[RunSpec], int | None],
    run: Callable[..., T],
    markdown: Callable[[T], str],
) -> None:
    """Run one experiment with a progress bar, then print its table (all commands share this)."""
    t0 = time.perf_counter()
    with _reporter(quiet, budget) as rep:
        table = run(
            dest, log=_log(quiet), on_start=rep.start, on_progress=rep.progress, on_done=rep.done
        )
    if not quiet:
        console.print(f"[green]{name}[/] finished in {time.perf_counter() - t0:.0f} s -> {dest}")
    typer.echo(markdown(table))


@experiment_app.command()
def papaya(
    out: OutOpt = None,
    quick: QuickOpt = False,
    seed: SeedOpt = 0,
    budget: Annotated[
        int | None, typer.Option("--budget", help="Client updates per variant (default: preset).")
    ] = None,
    tiny: TinyOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Papaya's table: basic sync FL vs sync FL with timeout vs FedBuff on Shakespeare with the
    FLASH phones, same update budget; writes table.json, table.md, perplexity_vs_hours.png."""
    from asyncfl.experiments.papaya import (
        PAPAYA_FULL,
        PAPAYA_QUICK,
        PAPAYA_TINY,
        papaya_table_markdown,
        run_papaya,
    )

    s = PAPAYA_TINY if tiny else PAPAYA_QUICK if quick else PAPAYA_FULL
    s = replace(s, seed=seed, update_budget=budget or s.update_budget)
    dest = out or Path("runs/papaya_quick" if quick else "runs/papaya")
    _execute("papaya", dest, quiet, _updates_budget, partial(run_papaya, s), papaya_table_markdown)


@experiment_app.command("fedbuff-speedup")
def fedbuff_speedup(
    out: OutOpt = None,
    quick: QuickOpt = False,
    seed: SeedOpt = 0,
    concurrency: Annotated[
        list[int] | None,
        typer.Option("--concurrency", help="Concurrency levels (repeatable; default: preset)."),
    ] = None,
    target: Annotated[
        float | None, typer.Option("--target", help="Target accuracy (default: preset).")
    ] = None,
    algorithm: Annotated[
        list[str] | None,
        typer.Option(
            "--algorithm",
            help="FedAvgM, FedAsync or FedBuff (repeatable; default: all three). Runs of one "
            "column in separate processes use separate cores.",
        ),
    ] = None,
    tiny: TinyOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """FedBuff's speedup: simulated time and client updates to a target accuracy for FedBuff,
    FedAvgM and FedAsync at several concurrencies; writes table.json, table.md, a plot."""
    from asyncfl.errors import ConfigError
    from asyncfl.experiments.speedup import (
        SPEEDUP_FULL,
        SPEEDUP_QUICK,
        SPEEDUP_TINY,
        run_speedup,
        speedup_table_markdown,
    )

    s = SPEEDUP_TINY if tiny else SPEEDUP_QUICK if quick else SPEEDUP_FULL
    try:
        s = replace(
            s,
            seed=seed,
            concurrencies=tuple(concurrency) if concurrency else s.concurrencies,
            target_accuracy=target if target is not None else s.target_accuracy,
            algorithms=tuple(algorithm) if algorithm else s.algorithms,
        )
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--algorithm") from exc
    dest = out or Path("runs/fedbuff_speedup_quick" if quick else "runs/fedbuff_speedup")
    _execute(
        "fedbuff-speedup",
        dest,
        quiet,
        _updates_budget,
        partial(run_speedup, s),
        speedup_table_markdown,
    )


@experiment_app.command("dp")
def dp(
    out: OutOpt = None,
    quick: QuickOpt = False,
    seed: SeedOpt = 0,
    epsilon: Annotated[
        list[float] | None,
        typer.Option("--epsilon", help="Target epsilons (repeatable; default: 1 2 4 8)."),
    ] = None,
    tiny: TinyOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Utility against privacy: final accuracy of DP-FedAvg and DP-FedBuff on Shakespeare at
    target epsilon 1, 2, 4, 8 and inf (z calibrated per target for a fixed number of steps);
    writes table.json, table.md, accuracy_vs_epsilon.png."""
    import logging

    from asyncfl.experiments.dp import DP_FULL, DP_QUICK, DP_TINY, dp_table_markdown, run_dp

    # dp-accounting logs a warning for every RDP order it cannot evaluate (harmless: that
    # order is skipped and the bound stays valid); hundreds of them would bury the progress.
    logging.getLogger("absl").setLevel(logging.ERROR)
    s = DP_TINY if tiny else DP_QUICK if quick else DP_FULL
    try:
        s = replace(s, seed=seed, epsilons=tuple(epsilon) if epsilon else s.epsilons)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--epsilon") from exc
    dest = out or Path("runs/dp_quick" if quick else "runs/dp")
    # The bar counts client updates: T steps of C (FedAvg) or K (FedBuff) updates each.
    steps = s.server_steps * s.cohort
    _execute("dp", dest, quiet, lambda _spec: steps, partial(run_dp, s), dp_table_markdown)
