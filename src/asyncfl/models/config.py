"""Which model to train."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from asyncfl.errors import ConfigProblem

__all__ = ["ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    name: Literal["logistic", "mlp", "cnn", "lstm"] = "mlp"
    """logistic regression, MLP, LEAF FEMNIST CNN, or LEAF character LSTM."""
    hidden: tuple[int, ...] = (64,)
    """Hidden widths of the MLP."""
    width: Literal["full", "small"] = "full"
    """CNN size: LEAF's FEMNIST CNN (``full``, 6.6M parameters) or a narrow one for CPU runs."""
    embed_dim: int = 8
    """LSTM: character embedding size (LEAF: 8)."""
    lstm_hidden: int = 256
    """LSTM: hidden units per layer (LEAF: 256)."""
    lstm_layers: int = 2
    """LSTM: stacked layers (LEAF: 2)."""

    def build(self, input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> nn.Module:
        """The model this config describes, with weights initialised from ``seed``."""
        from asyncfl.models.registry import build_model

        return build_model(
            self.name,
            input_shape,
            num_classes,
            hidden=self.hidden,
            width=self.width,
            embed_dim=self.embed_dim,
            lstm_hidden=self.lstm_hidden,
            lstm_layers=self.lstm_layers,
            seed=seed,
        )

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        if any(h < 1 for h in self.hidden):
            out.append(ConfigProblem("hidden", list(self.hidden), "a list of integers >= 1"))
        for name in ("embed_dim", "lstm_hidden", "lstm_layers"):
            if getattr(self, name) < 1:
                out.append(ConfigProblem(name, getattr(self, name), "an integer >= 1"))
        return out
