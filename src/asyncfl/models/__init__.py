"""Reference models for the federated datasets (logistic regression, MLP, LEAF's FEMNIST CNN
and Shakespeare LSTM), built by name with :func:`build_model`."""

from asyncfl.models.cnn import CNN_WIDTHS, CNNWidth, FemnistCNN
from asyncfl.models.linear import LogisticRegression
from asyncfl.models.mlp import MLP
from asyncfl.models.registry import MODEL_NAMES, ModelName, build_model
from asyncfl.models.rnn import CharLSTM

__all__ = [
    "CNN_WIDTHS",
    "MLP",
    "MODEL_NAMES",
    "CNNWidth",
    "CharLSTM",
    "FemnistCNN",
    "LogisticRegression",
    "ModelName",
    "build_model",
]
