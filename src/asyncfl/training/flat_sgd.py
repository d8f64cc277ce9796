"""SGD on one flat parameter vector: one fused update per step instead of one per tensor.

The simulator trains thousands of tiny clients whose whole local training is a few
minibatch steps. For such models ``torch.optim.SGD.step`` (per-tensor bookkeeping,
~20 us) and ``zero_grad`` (~8 us) cost about as much as the arithmetic itself. When every
trainable tensor is a view into one flat parameter vector (``LocalTrainer`` makes it so)
and every gradient a view into one flat gradient vector, a step is one ``add_`` over the
whole model and zeroing the gradients is one ``zero_``. Autograd accumulates into an
existing dense ``.grad`` in place, so the gradient views stay bound across steps.

The update is torch's SGD (``torch.optim.SGD``, dampening 0, no Nesterov):
``g <- g + wd * p``; ``b <- mu * b + g`` (``b <- g`` on the first step); ``p <- p - lr * b``.
One difference, by design: a parameter that gets no gradient in a step (unused by that
forward pass) is treated as having a zero gradient, as ``zero_grad(set_to_none=False)``
would, so with momentum or weight decay it still moves; torch's SGD skips it.
"""

from __future__ import annotations

import torch

__all__ = ["FlatSGD"]


class FlatSGD:
    """SGD over ``flat``, whose gradient lives in the flat vector ``self.grad``.

    ``params`` must be contiguous views into ``flat`` that together cover all of it (so the
    fused step touches trainable values only); otherwise ``ValueError``, and the caller
    should use a ``torch.optim`` optimizer instead.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        flat: torch.Tensor,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        self.params = params
        self.flat = flat
        self.grad = torch.zeros_like(flat)
        self._grad_views = [
            self.grad[a:b].view(p.shape)
            for p, (a, b) in zip(params, _offsets(params, flat), strict=True)
        ]
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self._buf: torch.Tensor | None = None
        self.bind_grads()

    def bind_grads(self) -> None:
        """Make every ``param.grad`` its view into ``self.grad`` (someone may have reset it)."""
        for p, v in zip(self.params, self._grad_views, strict=True):
            if p.grad is not v:
                p.grad = v

    def reset(self) -> None:
        """Forget the momentum buffer (a new client starts fresh) and bind the gradients."""
        self._buf = None
        self.bind_grads()

    def zero_grad(self) -> None:
        self.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        g = self.grad
        if self.weight_decay:
            g.add_(self.flat, alpha=self.weight_decay)
        if self.momentum:
            if self._buf is None:
                self._buf = g.clone()
            else:
                self._buf.mul_(self.momentum).add_(g)
            g = self._buf
        self.flat.add_(g, alpha=-self.lr)


def _offsets(params: list[torch.nn.Parameter], flat: torch.Tensor) -> list[tuple[int, int]]:
    """Each param's [start, end) inside ``flat``; checks they tile it exactly."""
    if flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError("flat must be a contiguous 1-D tensor")
    size = flat.element_size()
    spans = []
    for p in params:
        if p.dtype != flat.dtype or not p.is_contiguous():
            raise ValueError(f"a parameter of shape {tuple(p.shape)} is not a view into flat")
        start, rem = divmod(p.data_ptr() - flat.data_ptr(), size)
        if rem or start < 0 or start + p.numel() > flat.numel():
            raise ValueError(f"a parameter of shape {tuple(p.shape)} is not a view into flat")
        spans.append((start, start + p.numel()))
    covered = 0
    for a, b in sorted(spans):
        if a != covered:
            raise ValueError("the parameters do not tile the flat vector exactly")
        covered = b
    if covered != flat.numel():
        raise ValueError("the parameters do not tile the flat vector exactly")
    return spans
