"""Client-side training hyperparameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from asyncfl.errors import ConfigProblem

__all__ = ["ClientConfig"]


@dataclass(frozen=True)
class ClientConfig:
    """How a client trains locally before it reports ``delta = start - end``."""

    epochs: int = 1
    """Passes over the client's data (ignored when ``steps`` is set)."""
    steps: int | None = None
    """Exact number of minibatch steps instead of epochs (cycles over the data)."""
    batch_size: int = 32
    """Minibatch size (a client with fewer examples uses one full batch)."""
    lr: float = 0.05
    """Client learning rate."""
    optimizer: Literal["sgd", "adam"] = "sgd"
    """Client optimizer; its state is reset for every update."""
    momentum: float = 0.0
    """SGD momentum of the client optimizer."""
    weight_decay: float = 0.0
    """L2 weight decay of the client optimizer."""

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        if self.epochs < 1:
            out.append(ConfigProblem("epochs", self.epochs, "an integer >= 1"))
        if self.steps is not None and self.steps < 1:
            out.append(ConfigProblem("steps", self.steps, "null or an integer >= 1"))
        if self.batch_size < 1:
            out.append(ConfigProblem("batch_size", self.batch_size, "an integer >= 1"))
        if not self.lr > 0:
            out.append(ConfigProblem("lr", self.lr, "a number > 0"))
        if not 0 <= self.momentum < 1:
            out.append(ConfigProblem("momentum", self.momentum, "a number in [0, 1)"))
        if self.weight_decay < 0:
            out.append(ConfigProblem("weight_decay", self.weight_decay, "a number >= 0"))
        return out

    def examples_processed(self, num_examples: int) -> int:
        """Examples a client with ``num_examples`` touches (what its compute time scales with)."""
        if self.steps is not None:
            return self.steps * min(self.batch_size, max(num_examples, 0))
        return self.epochs * num_examples
