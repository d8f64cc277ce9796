"""Server optimizers applied to an aggregated pseudo-gradient (Reddi et al. 2021, Algorithm 2).

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2 (FedAdagrad / FedAdam / FedYogi), and Hsu, Qi, Brown,
"Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", 2019 (FedAvgM).

Sign convention. Reddi writes ``Δ = end - start`` and steps ``x += η m / (√v + τ)``. Our
pseudo-gradient is ``g = start - end = -Δ`` (see :class:`asyncfl.core.update.Update`), so every
rule below *subtracts*; ``m`` flips sign with ``g`` and ``v`` only sees ``g²``, so the two forms
are the same update. With ``t`` counting server steps from 1:

====================  =============================================================
``sgd``               ``x ← x − lr·g``  (``lr = 1``: FedAvg, x becomes the mean end model)
``momentum``          ``m ← β·m + g``;  ``x ← x − lr·m``;
                      Nesterov: ``x ← x − lr·(g + β·m)`` with the new ``m``
``adam``              ``m ← β₁·m + (1−β₁)·g``;  ``v ← β₂·v + (1−β₂)·g²``;
                      ``x ← x − lr·m / (√v + τ)``
``yogi``              same ``m``;  ``v ← v − (1−β₂)·g²·sign(v − g²)``; same step
``adagrad``           same ``m``;  ``v ← v + g²``; same step
====================  =============================================================

``m`` starts at 0 and ``v`` at ``τ²`` (Reddi's ``v₋₁ ≥ τ²``; override with
``initial_accumulator``). As in Reddi, ``β₁`` also applies to Adagrad; ``beta1=0`` gives
classical Adagrad (``m = g``, and no ``m`` buffer is kept at all).

Reddi applies no bias correction. ``bias_correction=True`` (Adam/Yogi only) divides ``m`` by
``1−β₁ᵗ`` and ``v`` by ``1−β₂ᵗ`` as Kingma & Ba do; with ``initial_accumulator=0`` FedAdam is
then exactly ``torch.optim.Adam(eps=tau)``. With ``v`` starting at ``τ²`` the correction slightly
over-scales ``v`` in the first steps, which is harmless because ``τ²`` is tiny.

Numerics: float32 state, updated in place (``out=``) so a step allocates only the returned
parameter vector. This code runs on 10M-parameter models every server step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from asyncfl.core.update import FloatVector
from asyncfl.errors import ConfigError, ConfigProblem

__all__ = [
    "ServerOptimizer",
    "ServerOptimizerConfig",
    "ServerOptimizerName",
    "make_server_optimizer",
]

ServerOptimizerName = Literal["sgd", "momentum", "adam", "yogi", "adagrad"]
_NAMES: tuple[str, ...] = get_args(ServerOptimizerName)
_ADAPTIVE: frozenset[str] = frozenset({"adam", "yogi", "adagrad"})

# Adaptive methods square g in float32; beyond this magnitude g² overflows to inf and v would be
# poisoned for every later step, so such a pseudo-gradient is refused before any state changes.
_MAX_ABS_ADAPTIVE = math.sqrt(float(np.finfo(np.float32).max))


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """Hyperparameters of the server optimizer (see the module docstring for the rules).

    ``momentum``/``nesterov`` are read by ``momentum`` only; ``beta1``/``beta2``/``tau`` and
    ``initial_accumulator`` (default ``tau**2``) by the adaptive methods (``beta2`` not by
    Adagrad); ``bias_correction`` by Adam and Yogi only.
    """

    name: ServerOptimizerName = "sgd"
    """sgd (FedAvg), momentum (FedAvgM), adam, yogi, adagrad (Reddi et al. 2021)."""
    lr: float = 1.0
    """Server learning rate; 1.0 with sgd applies the mean client delta as is."""
    momentum: float = 0.9
    """Momentum coefficient of ``momentum`` (FedAvgM)."""
    nesterov: bool = False
    """Nesterov momentum (``momentum`` only)."""
    beta1: float = 0.9
    """First-moment decay of adam/yogi/adagrad."""
    beta2: float = 0.99
    """Second-moment decay of adam/yogi."""
    tau: float = 1e-3
    """Adaptivity: added to sqrt(v) in the adaptive methods."""
    initial_accumulator: float | None = None
    """Initial v of the adaptive methods; null means tau**2."""
    bias_correction: bool = False
    """Adam-style bias correction (adam, yogi); Reddi et al. use none."""

    def validate(self, path: str = "") -> list[ConfigProblem]:
        """Every problem with this config (empty if it is usable); ``path`` prefixes field names."""
        problems: list[ConfigProblem] = []

        def bad(field: str, value: object, expected: str) -> None:
            problems.append(ConfigProblem(f"{path + '.' if path else ''}{field}", value, expected))

        if self.name not in _NAMES:
            bad("name", self.name, f"one of {list(_NAMES)}")
        if not _is_real(self.lr) or not (math.isfinite(self.lr) and self.lr > 0):
            bad("lr", self.lr, "a finite number > 0")
        for field in ("momentum", "beta1", "beta2"):
            value = getattr(self, field)
            if not _is_real(value) or not 0.0 <= value < 1.0:
                bad(field, value, "a number in [0, 1)")
        if not _is_real(self.tau) or not (math.isfinite(self.tau) and self.tau > 0):
            bad("tau", self.tau, "a finite number > 0 (it keeps the adaptive step bounded)")
        acc = self.initial_accumulator
        if acc is not None and (not _is_real(acc) or not (math.isfinite(acc) and acc >= 0)):
            bad("initial_accumulator", acc, "None (meaning tau**2) or a finite number >= 0")
        if not isinstance(self.nesterov, bool):
            bad("nesterov", self.nesterov, "true or false")
        elif self.nesterov and self.name != "momentum":
            bad("nesterov", self.nesterov, "false unless name is 'momentum'")
        if not isinstance(self.bias_correction, bool):
            bad("bias_correction", self.bias_correction, "true or false")
        elif self.bias_correction and self.name not in ("adam", "yogi"):
            bad("bias_correction", self.bias_correction, "false unless name is 'adam' or 'yogi'")
        return problems


def _is_real(value: object) -> bool:
    # bool is an int subclass; `lr: true` in a YAML file is a mistake, not 1.0.
    return isinstance(value, int | float) and not isinstance(value, bool)


class ServerOptimizer:
    """Steps a flat float32 model with a pseudo-gradient; holds ``m``/``v`` as needed.

    Build with :func:`make_server_optimizer`. :meth:`step` never mutates its inputs and
    changes no state if it raises.
    """

    def __init__(self, config: ServerOptimizerConfig, dim: int) -> None:
        problems = config.validate()
        if problems:
            raise ConfigError(problems)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int (the model size), got {dim!r}")
        self._cfg = config
        self._dim = dim
        self._steps = 0
        # m is needed by momentum, and by the adaptive methods unless beta1 = 0 (then m == g).
        needs_m = config.name == "momentum" or (config.name in _ADAPTIVE and config.beta1 > 0)
        self._m: FloatVector | None = np.zeros(dim, dtype=np.float32) if needs_m else None
        self._v: FloatVector | None = None
        if config.name in _ADAPTIVE:
            acc = (
                config.tau**2 if config.initial_accumulator is None else config.initial_accumulator
            )
            self._v = np.full(dim, acc, dtype=np.float32)

    @property
    def config(self) -> ServerOptimizerConfig:
        return self._cfg

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def steps(self) -> int:
        """Number of successful :meth:`step` calls (``t`` in the bias correction)."""
        return self._steps

    def step(self, params: FloatVector, pseudo_grad: FloatVector) -> FloatVector:
        """Return new parameters ``params − update(pseudo_grad)``; update ``m``/``v``.

        Raises ``ValueError`` (state unchanged) if either array is not a float32 vector of
        ``dim`` values, or if ``pseudo_grad`` is not finite (or, for adaptive methods, so large
        that its square overflows float32).
        """
        self._check_vector("params", params)
        self._check_vector("pseudo_grad", pseudo_grad)
        hi, lo = float(pseudo_grad.max()), float(pseudo_grad.min())
        if not (math.isfinite(hi) and math.isfinite(lo)):
            raise ValueError("pseudo_grad contains NaN or Inf; refusing to step the server model")
        if self._v is not None and max(hi, -lo) >= _MAX_ABS_ADAPTIVE:
            raise ValueError(
                f"pseudo_grad has |g| up to {max(hi, -lo):.3g}; its square overflows float32 "
                f"(limit {_MAX_ABS_ADAPTIVE:.3g}). Clip updates or lower the client lr."
            )

        cfg, g = self._cfg, pseudo_grad
        out = np.empty_like(params)  # the only full-size allocation; also used as scratch
        if cfg.name == "sgd":
            np.multiply(g, -cfg.lr, out=out)
        elif cfg.name == "momentum":
            m = self._m
            assert m is not None
            m *= cfg.momentum
            m += g
            if cfg.nesterov:
                np.multiply(m, cfg.momentum, out=out)
                out += g
                out *= -cfg.lr
            else:
                np.multiply(m, -cfg.lr, out=out)
        else:
            self._adaptive_direction(g, out)
        out += params
        self._steps += 1
        return out

    def _adaptive_direction(self, g: FloatVector, out: FloatVector) -> None:
        """Update m and v, and write ``−lr·m̂/(√v̂ + τ)`` into ``out`` (also used as scratch)."""
        cfg, m, v = self._cfg, self._m, self._v
        assert v is not None
        if m is not None:
            m *= cfg.beta1
            np.multiply(g, 1.0 - cfg.beta1, out=out)
            m += out
        if cfg.name == "adam":
            np.multiply(g, g, out=out)
            out *= 1.0 - cfg.beta2
            v *= cfg.beta2
            v += out
        elif cfg.name == "yogi":
            # v − (1−β₂)·g²·sign(v − g²), all in `out`: sign(v − g²)·g·g is exactly ±fl(g²) (or 0
            # where v == g², leaving v as it is). v stays >= 0: where it shrinks,
            # (1−β₂)·g² < g² < v.
            np.multiply(g, g, out=out)
            np.subtract(v, out, out=out)
            np.sign(out, out=out)
            out *= g
            out *= g
            out *= 1.0 - cfg.beta2
            v -= out
        else:  # adagrad
            np.multiply(g, g, out=out)
            v += out
        t = self._steps + 1
        step_scale = -cfg.lr
        if cfg.bias_correction:
            np.multiply(v, 1.0 / (1.0 - cfg.beta2**t), out=out)
            np.sqrt(out, out=out)
            step_scale /= 1.0 - cfg.beta1**t
        else:
            np.sqrt(v, out=out)
        out += cfg.tau
        np.divide(g if m is None else m, out, out=out)
        out *= step_scale

    def _check_vector(self, name: str, x: FloatVector) -> None:
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.shape != (self._dim,):
            got = f"{type(x).__name__} {getattr(x, 'dtype', '?')} {getattr(x, 'shape', '?')}"
            raise ValueError(f"{name} must be a float32 array of shape ({self._dim},), got {got}")

    def state_dict(self) -> dict[str, np.ndarray | int]:
        """Copies of the state: ``steps``, plus ``m``/``v`` where this optimizer keeps them."""
        state: dict[str, np.ndarray | int] = {"steps": self._steps}
        if self._m is not None:
            state["m"] = self._m.copy()
        if self._v is not None:
            state["v"] = self._v.copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray | int]) -> None:
        """Restore from :meth:`state_dict` of an optimizer with the same config and ``dim``.

        Everything is checked first; on ``ValueError`` nothing has changed.
        """
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(
                f"state has keys {sorted(state)}, this {self._cfg.name!r} optimizer "
                f"(beta1={self._cfg.beta1}) needs {sorted(expected)}"
            )
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 0:
            raise ValueError(f"state['steps'] must be an int >= 0, got {steps!r}")
        for key in ("m", "v"):
            if key in state:
                arr = state[key]
                if (
                    not isinstance(arr, np.ndarray)
                    or arr.dtype != np.float32
                    or arr.shape != (self._dim,)
                ):
                    got = f"{type(arr).__name__} {getattr(arr, 'dtype', '?')} "
                    got += f"{getattr(arr, 'shape', '?')}"
                    raise ValueError(
                        f"state[{key!r}] must be a float32 array of shape ({self._dim},), got {got}"
                    )
                if not np.isfinite(arr).all():
                    raise ValueError(f"state[{key!r}] contains NaN or Inf")
                if key == "v" and bool((arr < 0).any()):
                    raise ValueError("state['v'] has negative entries; it is a sum of squares")
        if self._m is not None:
            np.copyto(self._m, state["m"])
        if self._v is not None:
            np.copyto(self._v, state["v"])
        self._steps = int(steps)


def make_server_optimizer(cfg: ServerOptimizerConfig, dim: int) -> ServerOptimizer:
    """A fresh optimizer for ``dim`` parameters; raises ``ConfigError`` if ``cfg`` is bad."""
    return ServerOptimizer(cfg, dim)
