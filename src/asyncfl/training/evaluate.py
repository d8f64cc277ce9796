"""Evaluation of a global model: on all held-out data, and per client on its own split."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from asyncfl.data.federated import FederatedDataset
from asyncfl.training.loss import per_example_stats

__all__ = ["Evaluation", "evaluate", "top_fraction_mean"]


@dataclass(frozen=True, eq=False)
class Evaluation:
    loss: float
    """Mean cross-entropy per prediction over all held-out data."""
    accuracy: float
    client_loss: npt.NDArray[np.float64]
    """Mean loss on each client's held-out split (NaN for a client with none)."""
    client_accuracy: npt.NDArray[np.float64]
    per_token: bool

    def metrics(self, train_sizes: npt.NDArray[np.int64]) -> dict[str, float]:
        """Global metrics plus per-client means over all, the top 25% and top 1% by data size."""
        out = {"loss": self.loss, "accuracy": self.accuracy}
        if self.per_token:
            out["perplexity"] = math.exp(min(self.loss, 50.0))
        per_client = {"accuracy": self.client_accuracy}
        if self.per_token:
            per_client["perplexity"] = np.exp(np.minimum(self.client_loss, 50.0))
        for name, values in per_client.items():
            out[f"client_{name}_mean"] = top_fraction_mean(values, train_sizes, 1.0)
            out[f"client_{name}_top25"] = top_fraction_mean(values, train_sizes, 0.25)
            out[f"client_{name}_top1"] = top_fraction_mean(values, train_sizes, 0.01)
        return out


def top_fraction_mean(
    values: npt.NDArray[np.float64], sizes: npt.NDArray[np.int64], fraction: float
) -> float:
    """Mean of ``values`` over the ``fraction`` of clients with the most training data.

    At least one client is always included; clients without held-out data (NaN) are skipped.
    Ties in size are broken by client id so the result is deterministic.
    """
    valid = np.flatnonzero(~np.isnan(values))
    if valid.size == 0:
        return float("nan")
    order = valid[np.lexsort((valid, -sizes[valid]))]
    k = max(1, math.ceil(fraction * valid.size - 1e-9))
    return float(values[order[:k]].mean())


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: FederatedDataset, batch_size: int = 1024) -> Evaluation:
    """Evaluate ``model`` (already loaded) on every client's held-out split in one pass."""
    model.eval()
    n = int(data.y_test.shape[0])
    loss = np.empty(n, np.float64)
    correct = np.empty(n, np.float64)
    tokens = 1
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        l_b, c_b, tokens = per_example_stats(model(data.x_test[sl]), data.y_test[sl])
        loss[sl] = l_b.to(torch.float64).numpy()
        correct[sl] = c_b.numpy()
    offsets = data.test_offsets
    sizes = np.diff(offsets)
    client_loss = np.full(sizes.shape[0], np.nan)
    client_acc = np.full(sizes.shape[0], np.nan)
    has = sizes > 0
    # reduceat over the start offsets of non-empty clients sums each client's rows.
    if n > 0:
        starts = offsets[:-1][has]
        denom = sizes[has] * tokens
        client_loss[has] = np.add.reduceat(loss, starts) / denom
        client_acc[has] = np.add.reduceat(correct, starts) / denom
    total = max(n * tokens, 1)
    return Evaluation(
        loss=float(loss.sum() / total),
        accuracy=float(correct.sum() / total),
        client_loss=client_loss,
        client_accuracy=client_acc,
        per_token=data.task == "next_token",
    )
