"""Which model to train."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from asyncfl.errors import ConfigProblem

__all__ = ["ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    name: Literal["logistic", "mlp", "cnn", "lstm"] = "mlp"
    hidden: tuple[int, ...] = (64,)
    """Hidden widths of the MLP."""

    def validate(self) -> list[ConfigProblem]:
        if any(h < 1 for h in self.hidden):
            return [ConfigProblem("hidden", list(self.hidden), "a list of integers >= 1")]
        return []
