"""``ParamSpec``: maps a PyTorch model's ``state_dict`` to one flat float32 vector and back.

Aggregation, privacy and secure sums all work on flat vectors; only training and
checkpoints see the per-tensor structure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from asyncfl.core.update import FloatVector

__all__ = ["ParamSpec", "TensorSpec"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass(frozen=True)
class ParamSpec:
    """The layout of a model's floating-point state in a flat vector (in ``state_dict`` order)."""

    tensors: tuple[TensorSpec, ...]

    @property
    def dim(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> ParamSpec:
        """Layout of every floating-point tensor in ``state`` (integer buffers are skipped)."""
        specs: list[TensorSpec] = []
        offset = 0
        for name, tensor in state.items():
            if not torch.is_floating_point(tensor):
                continue
            n = tensor.numel()
            specs.append(TensorSpec(name, tuple(tensor.shape), offset, n))
            offset += n
        return cls(tuple(specs))

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> ParamSpec:
        return cls.from_state_dict(module.state_dict())

    def flatten(self, state: Mapping[str, torch.Tensor]) -> FloatVector:
        """A fresh float32 vector holding ``state``'s tensors in layout order."""
        missing = [t.name for t in self.tensors if t.name not in state]
        if missing:
            raise KeyError(f"state_dict lacks tensors {missing}; the spec needs {self.names}")
        out = np.empty(self.dim, dtype=np.float32)
        for t in self.tensors:
            src = state[t.name]
            if tuple(src.shape) != t.shape:
                raise ValueError(f"tensor {t.name!r} has shape {tuple(src.shape)}, spec {t.shape}")
            out[t.offset : t.offset + t.numel] = (
                src.detach().reshape(-1).to(torch.float32).cpu().numpy()
            )
        return out

    def unflatten(self, vector: FloatVector) -> dict[str, torch.Tensor]:
        """A ``state_dict`` of fresh tensors (copies) from a flat vector."""
        if vector.shape != (self.dim,):
            raise ValueError(f"vector has shape {vector.shape}, spec needs ({self.dim},)")
        return {
            t.name: torch.from_numpy(vector[t.offset : t.offset + t.numel].copy()).reshape(t.shape)
            for t in self.tensors
        }

    def load_into(self, module: torch.nn.Module, vector: FloatVector) -> None:
        """Copy ``vector`` into ``module``'s tensors in place (no new tensors are allocated)."""
        if vector.shape != (self.dim,):
            raise ValueError(f"vector has shape {vector.shape}, spec needs ({self.dim},)")
        state = module.state_dict(keep_vars=True)
        src = torch.from_numpy(vector)
        with torch.no_grad():
            for t in self.tensors:
                state[t.name].copy_(src[t.offset : t.offset + t.numel].view(t.shape))
