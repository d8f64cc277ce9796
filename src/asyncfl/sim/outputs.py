"""Write a run's outputs: resolved config, metrics.jsonl, summary.json and a plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from asyncfl.core.configload import to_plain
from asyncfl.sim.config import SimConfig
from asyncfl.sim.simulator import SimResult

__all__ = ["participation_summary", "summary_dict", "write_run"]


def _clean(v: Any) -> Any:
    """JSON-safe: NaN/Inf become null (JSON has no NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        return _clean(v.item())
    return v


def participation_summary(result: SimResult, speed_score: np.ndarray) -> dict[str, Any]:
    """Updates per quartile of device speed (q1 = slowest) and clients that never contributed."""
    part = result.participation
    out: dict[str, Any] = {"never_contributed": int((part == 0).sum()), "clients": int(part.size)}
    if part.size and speed_score.size == part.size:
        edges = np.quantile(speed_score, [0.25, 0.5, 0.75])
        q = np.searchsorted(edges, speed_score, side="right")
        out["updates_by_speed_quartile"] = {f"q{i + 1}": int(part[q == i].sum()) for i in range(4)}
    return out


def summary_dict(cfg: SimConfig, result: SimResult, speed_score: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = _clean(
        {
            "algorithm": result.algorithm,
            "seed": cfg.seed,
            "sim_time_s": result.sim_time_s,
            "server_steps": result.server_steps,
            "client_updates": result.client_updates,
            "dropped_updates": result.dropped_updates,
            "cancelled_updates": result.cancelled_updates,
            "discarded_updates": result.discarded_updates,
            "failed_rounds": result.failed_rounds,
            "rejected": result.rejected,
            "bytes_up": result.bytes_up,
            "bytes_down": result.bytes_down,
            "wall_time_s": result.wall_time_s,
            "train_wall_time_s": result.train_wall_time_s,
            "eval_wall_time_s": result.eval_wall_time_s,
            "stop_reason": result.stop_reason,
            "staleness": {str(k): v for k, v in sorted(result.staleness_counts.items())},
            "participation": participation_summary(result, speed_score),
            "secure_aggregation": result.secure,
            "privacy": result.privacy,
            "final": result.final,
        }
    )
    return out


def _plot(result: SimResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = result.history
    key = "perplexity" if hist and "perplexity" in hist[0] else "accuracy"
    hours = [r["sim_time_s"] / 3600 for r in hist]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(hours, [r[key] for r in hist], marker="o", ms=3, label="global held-out")
    ckey = f"client_{key}_mean"
    if hist and ckey in hist[0]:
        ax.plot(hours, [r[ckey] for r in hist], ls="--", label="mean over clients")
    ax.set_xlabel("simulated time (hours)")
    ax.set_ylabel(key)
    ax.set_title(f"{result.algorithm}: {key} vs simulated time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_run(
    out: Path, cfg: SimConfig, result: SimResult, speed_score: np.ndarray
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_plain(cfg), sort_keys=False))
    with (out / "metrics.jsonl").open("w") as f:
        for row in result.history:
            f.write(json.dumps(_clean(row)) + "\n")
    summary = summary_dict(cfg, result, speed_score)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(result, out / "metrics.png")
    return summary
