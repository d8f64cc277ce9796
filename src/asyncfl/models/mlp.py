"""Multi-layer perceptron: flatten, then ``Linear -> ReLU`` per hidden width, then a linear
layer to the class logits (the "2NN" of McMahan et al. 2017, Sec. 3, with widths as a
parameter)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """``Flatten -> [Linear(h_i) -> ReLU]* -> Linear(num_classes)``; returns logits."""

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...]
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]
