"""The loss shared by training and evaluation, for classification and next-token data."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cross_entropy", "per_example_stats"]


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; ``logits`` (B, C) with ``y`` (B,) or (B, T, V) with ``y`` (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def per_example_stats(
    logits: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-example summed loss and number of correct predictions, and tokens per example."""
    flat = logits.reshape(-1, logits.shape[-1])
    target = y.reshape(-1)
    loss = F.cross_entropy(flat, target, reduction="none").reshape(y.shape)
    correct = (flat.argmax(dim=-1) == target).reshape(y.shape)
    if y.ndim == 1:
        return loss, correct.to(torch.float64), 1
    return loss.sum(dim=1), correct.to(torch.float64).sum(dim=1), int(y.shape[1])
