"""LEAF's Shakespeare character model (Caldas et al. 2018, ``models/shakespeare/
stacked_lstm.py``; McMahan et al. 2017, Sec. 3): ``Embedding(vocab, 8) -> 2-layer
LSTM(256) -> Linear(vocab)``. Unlike LEAF, which predicts only the character after the
sequence, the output layer is applied at every position, giving ``(B, T, vocab)`` logits
for the next-token targets of :func:`asyncfl.data.load_shakespeare`."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CharLSTM"]


class CharLSTM(nn.Module):
    """Next-character language model over int64 token ids of shape ``(B, T)``."""

    def __init__(
        self, vocab_size: int, embed_dim: int = 8, hidden_size: int = 256, num_layers: int = 2
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embed(x))
        return self.head(hidden)  # type: ignore[no-any-return]
