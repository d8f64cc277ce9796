"""Client local training: one reusable model, many clients.

The simulator trains thousands of clients one after another with ONE model object whose
parameters are views into a single flat tensor: loading a global model is one ``copy_``
and reading the trained model back is one vector subtraction. No per-client model,
optimizer, process or thread is created (that churn is what makes other simulators slow).
The service's client runtime uses the same class for a single client.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from asyncfl.core.params import ParamSpec
from asyncfl.core.update import FloatVector
from asyncfl.training.config import ClientConfig
from asyncfl.training.flat_sgd import FlatSGD
from asyncfl.training.loss import cross_entropy

__all__ = ["LocalResult", "LocalTrainer"]


@dataclass(frozen=True, eq=False)
class LocalResult:
    delta: FloatVector
    """start - end, float32."""
    num_examples: int
    steps: int
    examples_processed: int


class LocalTrainer:
    """Trains ``model`` from a given flat parameter vector on one client's data."""

    def __init__(self, model: torch.nn.Module, cfg: ClientConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.spec = ParamSpec.from_module(model)
        self._flat = torch.zeros(self.spec.dim, dtype=torch.float32)
        self._flat_np = self._flat.numpy()  # shares memory with _flat
        self._bind_views()
        params = [p for p in model.parameters() if p.requires_grad]
        self._optimizer: torch.optim.Optimizer | FlatSGD
        self._optimizer = self._make_optimizer(params)
        self._generator = torch.Generator()

    def _make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer | FlatSGD:
        cfg = self.cfg
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        try:
            # One fused step over the flat vector: for the small models of cross-device FL,
            # torch.optim's per-tensor bookkeeping costs as much as the arithmetic.
            return FlatSGD(params, self._flat, cfg.lr, cfg.momentum, cfg.weight_decay)
        except ValueError:  # buffers (e.g. batch-norm statistics) share the flat vector
            return torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )

    def _bind_views(self) -> None:
        """Make every floating-point tensor of the model a view into ``self._flat``."""
        state = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for t in self.spec.tensors:
                tensor = state[t.name]
                view = self._flat[t.offset : t.offset + t.numel].view(t.shape)
                view.copy_(tensor.detach())
                tensor.data = view
        # A module may cache flattened weights (cuDNN RNNs); tell it they moved.
        for m in self.model.modules():
            if isinstance(m, torch.nn.RNNBase):
                m.flatten_parameters()

    def load(self, params: FloatVector) -> None:
        if params.shape != (self.spec.dim,):
            raise ValueError(f"params have shape {params.shape}, model needs ({self.spec.dim},)")
        np.copyto(self._flat_np, params)  # one copy; also accepts read-only arrays

    def current(self) -> FloatVector:
        return self._flat_np.copy()

    def train(
        self, params: FloatVector, x: torch.Tensor, y: torch.Tensor, seed: int
    ) -> LocalResult:
        """Train from ``params`` on (x, y); minibatch order is drawn from ``seed``."""
        n = int(y.shape[0])
        self.load(params)
        if n == 0:
            return LocalResult(np.zeros(self.spec.dim, np.float32), 0, 0, 0)
        opt = self._optimizer
        if isinstance(opt, FlatSGD):
            opt.reset()
        else:
            opt.state.clear()
        self._generator.manual_seed(seed)
        if not self.model.training:  # evaluation switched it; module.train() walks every module
            self.model.train()
        bs = min(self.cfg.batch_size, n)
        total_steps = (
            self.cfg.steps if self.cfg.steps is not None else self.cfg.epochs * -(-n // bs)
        )
        step = 0
        model = self.model
        while step < total_steps:
            perm = torch.randperm(n, generator=self._generator)
            for start in range(0, n, bs):
                if step >= total_steps:
                    break
                idx = perm[start : start + bs]
                opt.zero_grad()  # FlatSGD: one zero_; torch.optim: grads set to None
                # index_select: plain fancy indexing is ~1000x slower on multi-dim tensors
                # when torch runs with several threads on a busy machine.
                # The loss is not read back: a per-step .item() (or even keeping the loss
                # tensors) cost ~10% of a small client's training time.
                loss = cross_entropy(model(x.index_select(0, idx)), y.index_select(0, idx))
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                step += 1
        full, rem = divmod(step, -(-n // bs))
        processed = full * n + min(rem * bs, n)
        delta = params - self._flat_np
        return LocalResult(delta, n, step, processed)
