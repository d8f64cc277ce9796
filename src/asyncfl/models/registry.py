"""Build a reference model by name with a seeded, reproducible initialisation.

Models take ``x`` exactly as :class:`asyncfl.data.FederatedDataset` stores it: float32
feature rows or images for ``logistic``/``mlp``/``cnn``, int64 token ids ``(B, T)`` for
``lstm``. They all return logits.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from asyncfl.errors import ConfigError, ConfigProblem
from asyncfl.models.cnn import CNN_WIDTHS, CNNWidth, FemnistCNN
from asyncfl.models.linear import LogisticRegression
from asyncfl.models.mlp import MLP
from asyncfl.models.rnn import CharLSTM

__all__ = ["MODEL_NAMES", "ModelName", "build_model"]

ModelName = Literal["logistic", "mlp", "cnn", "lstm"]
MODEL_NAMES: tuple[ModelName, ...] = get_args(ModelName)


def _problems(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: tuple[int, ...],
    width: str,
    sizes: dict[str, int],
    seed: int,
) -> list[ConfigProblem]:
    p: list[ConfigProblem] = []
    if name not in MODEL_NAMES:
        p.append(ConfigProblem("model.name", name, f"one of {list(MODEL_NAMES)}"))
    if not input_shape or any(int(d) < 1 for d in input_shape):
        p.append(ConfigProblem("model.input_shape", input_shape, "a non-empty tuple of sizes >= 1"))
    if num_classes < 2:
        p.append(ConfigProblem("model.num_classes", num_classes, "an int >= 2"))
    if seed < 0:
        p.append(ConfigProblem("model.seed", seed, "an int >= 0"))
    if name == "mlp" and any(h < 1 for h in hidden):
        p.append(ConfigProblem("model.hidden", hidden, "layer widths >= 1"))
    if name == "cnn":
        if width not in CNN_WIDTHS:
            p.append(ConfigProblem("model.width", width, f"one of {list(CNN_WIDTHS)}"))
        if len(input_shape) != 3 or any(int(d) < 4 for d in input_shape[1:]):
            p.append(
                ConfigProblem("model.input_shape", input_shape, "(channels, H, W) with H, W >= 4")
            )
    if name == "lstm":
        if len(input_shape) != 1:
            p.append(ConfigProblem("model.input_shape", input_shape, "(seq_len,) token ids"))
        p.extend(ConfigProblem(f"model.{k}", v, "an int >= 1") for k, v in sizes.items() if v < 1)
    return p


def build_model(
    name: ModelName,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    hidden: tuple[int, ...] = (64,),
    width: CNNWidth = "full",
    embed_dim: int = 8,
    lstm_hidden: int = 256,
    lstm_layers: int = 2,
    seed: int = 0,
) -> nn.Module:
    """Build ``name`` for inputs of ``input_shape`` and ``num_classes`` outputs (vocabulary
    size for ``lstm``).

    ``hidden`` sets the MLP's layer widths, ``width`` the CNN's size ("full" is LEAF's),
    ``embed_dim``/``lstm_hidden``/``lstm_layers`` the LSTM. The same arguments and ``seed``
    give bit-identical initial weights; the global torch RNG is left untouched (the
    initialisation runs inside :func:`torch.random.fork_rng`). Raises
    :class:`ConfigError` listing every bad argument.
    """
    sizes = {"embed_dim": embed_dim, "lstm_hidden": lstm_hidden, "lstm_layers": lstm_layers}
    problems = _problems(name, input_shape, num_classes, hidden, width, sizes, seed)
    if problems:
        raise ConfigError(problems)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "logistic":
            return LogisticRegression(input_shape, num_classes)
        if name == "mlp":
            return MLP(input_shape, num_classes, hidden)
        if name == "cnn":
            c, h, w = input_shape
            return FemnistCNN((c, h, w), num_classes, width)
        return CharLSTM(num_classes, embed_dim, lstm_hidden, lstm_layers)
