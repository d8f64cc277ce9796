"""Multinomial logistic regression: ``softmax(W flatten(x) + b)`` (the convex model of the
FedProx synthetic and MNIST experiments, Li et al. 2020, Sec. 5.1). Returns logits."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LogisticRegression"]


class LogisticRegression(nn.Module):
    """Flatten every input row, then one affine map to ``num_classes`` logits."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.flatten(x))  # type: ignore[no-any-return]
