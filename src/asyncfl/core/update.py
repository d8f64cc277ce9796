"""The unit of federated work: a flat float32 update vector with its metadata."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from asyncfl.errors import UpdateRejected

__all__ = ["FloatVector", "Update"]

FloatVector = npt.NDArray[np.float32]


@dataclass(frozen=True, eq=False)
class Update:
    """One client's contribution.

    ``delta`` is ``start model - end model`` (a pseudo-gradient: the server *subtracts* it,
    scaled by its optimizer). ``base_version`` is the server model version the client
    started from; staleness is computed from it at arrival, never from hidden round state.
    """

    client_id: int
    base_version: int
    num_examples: int
    delta: FloatVector

    def validate(self, dim: int, server_version: int) -> None:
        """Raise :class:`UpdateRejected` if this update cannot be aggregated.

        Checks shape, dtype, finiteness and metadata against a model of ``dim`` parameters
        at ``server_version``. Pure: it never changes anything.
        """
        d = self.delta
        if not isinstance(d, np.ndarray) or d.dtype != np.float32 or d.ndim != 1:
            got = f"{type(d).__name__} {getattr(d, 'dtype', '?')} ndim={getattr(d, 'ndim', '?')}"
            raise UpdateRejected("bad_dtype", f"delta must be a 1-D float32 array, got {got}")
        if d.shape[0] != dim:
            raise UpdateRejected("bad_shape", f"delta has {d.shape[0]} values, model has {dim}")
        if self.num_examples < 0:
            raise UpdateRejected(
                "bad_num_examples", f"num_examples={self.num_examples} must be >= 0"
            )
        if self.base_version < 0 or self.base_version > server_version:
            raise UpdateRejected(
                "bad_version",
                f"base_version={self.base_version} outside [0, {server_version}]",
            )
        # A float64 sum of float32 values cannot overflow, and any NaN or Inf propagates into
        # it: one reduction, no temporary mask.
        if not math.isfinite(float(d.sum(dtype=np.float64))):
            raise UpdateRejected("not_finite", "delta contains NaN or Inf")
