"""The ``asyncfl`` command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from asyncfl.errors import AsyncFLError, ConfigError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="asyncfl: asynchronous federated learning at scale (FedBuff, FedAvg, FedAsync).",
)
console = Console(stderr=True)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """Simulate and serve federated learning."""
    if version:
        from importlib.metadata import version as pkg_version

        typer.echo(f"asyncfl {pkg_version('asyncfl')}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit()


def load_config_data(path: Path, overrides: list[str]) -> dict[str, Any]:
    from asyncfl.core.configload import apply_overrides

    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise typer.BadParameter(f"cannot read config {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise typer.BadParameter(f"config {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise typer.BadParameter(f"config {path} must be a YAML mapping, got {type(raw).__name__}")
    return apply_overrides(raw, overrides)


def _fmt_metrics(m: dict[str, float] | None) -> str:
    if not m:
        return ""
    if "perplexity" in m:
        return f"ppl {m['perplexity']:.2f}  acc {m['accuracy']:.3f}"
    return f"acc {m['accuracy']:.3f}  loss {m['loss']:.3f}"


@app.command()
def simulate(
    config: Annotated[Path, typer.Argument(help="YAML config (see docs/config.md).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("runs/latest"),
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config field: key.sub=value (repeatable)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Run one simulation and write config.yaml, metrics.jsonl, metrics.png, summary.json."""
    from asyncfl.core.configload import build_config
    from asyncfl.sim.config import SimConfig
    from asyncfl.sim.factory import build_simulator
    from asyncfl.sim.outputs import write_run
    from asyncfl.sim.simulator import Progress as SimProgress

    cfg = build_config(SimConfig, load_config_data(config, set_ or []))
    sim = build_simulator(cfg, log=lambda msg: console.print(f"[yellow]{msg}"))
    rc = cfg.run
    total = rc.max_server_steps
    last: dict[str, float] | None = None
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=False,
    ) as bar:
        task = bar.add_task(cfg.algorithm.name, total=total, info="")

        def on_progress(p: SimProgress) -> None:
            nonlocal last
            if p.metrics is not None:
                last = p.metrics
            bar.update(
                task,
                completed=p.server_steps,
                info=f"sim {p.sim_time_s / 3600:6.2f} h  steps {p.server_steps}  "
                f"updates {p.client_updates}  {_fmt_metrics(last)}",
            )

        result = sim.run(on_progress)
    summary = write_run(out, cfg, result, sim.pop.speed_score)
    console.print(
        f"[green]done[/] {result.algorithm}: {result.server_steps} steps, "
        f"{result.client_updates} updates, {result.sim_time_s / 3600:.2f} simulated h, "
        f"{result.wall_time_s:.1f} s wall; {_fmt_metrics(result.final)}  -> {out}"
    )
    typer.echo(json.dumps(summary["final"], indent=None))


@app.command("config-doc")
def config_doc() -> None:
    """Print the config reference (Markdown) generated from the config classes."""
    from asyncfl.cli.configdoc import render_config_reference
    from asyncfl.sim.config import SimConfig

    typer.echo(render_config_reference(SimConfig), nl=False)


from asyncfl.cli.experiment import experiment_app  # noqa: E402

app.add_typer(experiment_app, name="experiment")

from asyncfl.cli.service import client as _service_client  # noqa: E402
from asyncfl.cli.service import serve as _service_serve  # noqa: E402
from asyncfl.cli.service import status as _service_status  # noqa: E402
from asyncfl.cli.service import tee_trust as _service_tee_trust  # noqa: E402

app.command("serve")(_service_serve)
app.command("client")(_service_client)
app.command("status")(_service_status)
app.command("tee-trust")(_service_tee_trust)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except ConfigError as exc:
        console.print(f"[red]{exc}")
        sys.exit(2)
    except AsyncFLError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(1)
