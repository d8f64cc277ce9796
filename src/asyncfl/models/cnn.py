"""LEAF's FEMNIST CNN (Caldas et al. 2018, ``models/femnist/cnn.py``; the "CNN" of McMahan
et al. 2017): ``conv5x5(32) -> ReLU -> maxpool2 -> conv5x5(64) -> ReLU -> maxpool2 ->
fc(2048) -> ReLU -> fc(num_classes)`` with "same" padding. ``width="small"`` keeps the
architecture with 8/16 channels and a 128-unit dense layer, for fast CPU simulations."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = ["CNN_WIDTHS", "CNNWidth", "FemnistCNN"]

CNNWidth = Literal["full", "small"]
# (conv1 channels, conv2 channels, dense units)
CNN_WIDTHS: dict[CNNWidth, tuple[int, int, int]] = {"full": (32, 64, 2048), "small": (8, 16, 128)}


class FemnistCNN(nn.Module):
    """Two conv/pool blocks and two dense layers on ``(C, H, W)`` images; returns logits."""

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, width: CNNWidth = "full"
    ) -> None:
        super().__init__()
        channels, height, wide = input_shape
        c1, c2, dense = CNN_WIDTHS[width]
        self.features = nn.Sequential(
            nn.Conv2d(channels, c1, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        # "same" convolutions keep H x W; each pool floors it by 2.
        flat = c2 * (height // 4) * (wide // 4)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, dense),
            nn.ReLU(),
            nn.Linear(dense, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))  # type: ignore[no-any-return]
