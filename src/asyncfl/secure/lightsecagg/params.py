"""Parameters of one LightSecAgg group: ``N`` users, privacy threshold ``T``, target ``U``.

So et al. (LightSecAgg, MLSys 2022, §4; buffered asynchronous variant: "Secure aggregation
for buffered asynchronous federated learning", 2021) guarantee, for ``N`` users of which any
``T`` may collude with the server and up to ``N - U`` may drop before unmasking:

- privacy: ``1 <= T`` and ``T < U`` (``U - T`` mask pieces carry the mask, ``T`` random
  pieces hide it from any ``T`` coded shares);
- dropout resiliency: the aggregate mask is decoded from any ``U`` of the ``N`` users, so
  ``U <= N``.

Each mask of length ``d`` is cut into ``U - T`` pieces of ``ceil(d / (U - T))`` elements
(zero-filled at the end: those tail positions are masked by nothing and carry no data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from asyncfl.errors import ConfigError, ConfigProblem
from asyncfl.secure.lightsecagg.field import P

__all__ = ["LightSecAggParams"]

_MAX_SURVIVORS = 1 << 21  # inner dimension of field.matmul


@dataclass(frozen=True)
class LightSecAggParams:
    """One group: users ``0..num_users-1`` share masks with each other."""

    num_users: int
    """N: users holding coded mask shares (every user of the group)."""
    privacy_threshold: int
    """T: any T users colluding with the server learn nothing beyond the aggregate."""
    target_survivors: int
    """U: any U users answering an unmasking request suffice; N - U may drop."""
    dim: int
    """d: length of every update and mask."""
    min_contributions: int = 1
    """Users refuse to help unmask a buffer of fewer distinct contributions than this (K)."""

    def __post_init__(self) -> None:
        problems: list[ConfigProblem] = []
        n, t, u = self.num_users, self.privacy_threshold, self.target_survivors
        if n < 2:
            problems.append(ConfigProblem("num_users", n, "an integer >= 2"))
        if not 1 <= t < u:
            problems.append(
                ConfigProblem("privacy_threshold", t, f"an integer in [1, target_survivors={u})")
            )
        if not u <= min(n, _MAX_SURVIVORS):
            problems.append(
                ConfigProblem("target_survivors", u, f"an integer <= num_users={n} (and <= 2^21)")
            )
        if n + u >= P:
            problems.append(ConfigProblem("num_users", n, f"num_users + target_survivors < {P}"))
        if self.dim < 1:
            problems.append(ConfigProblem("dim", self.dim, "an integer >= 1"))
        if self.min_contributions < 1:
            problems.append(
                ConfigProblem("min_contributions", self.min_contributions, "an integer >= 1")
            )
        if problems:
            raise ConfigError(problems)

    @classmethod
    def from_fractions(
        cls,
        num_users: int,
        privacy_fraction: float,
        survivor_fraction: float,
        dim: int,
        min_contributions: int = 1,
    ) -> LightSecAggParams:
        """``T = max(1, floor(N privacy_fraction))``,
        ``U = max(T + 1, ceil(N survivor_fraction))``."""
        t = max(1, math.floor(num_users * privacy_fraction))
        u = max(t + 1, math.ceil(num_users * survivor_fraction))
        return cls(num_users, t, u, dim, min_contributions)

    @property
    def data_pieces(self) -> int:
        """``U - T``: pieces that carry the mask."""
        return self.target_survivors - self.privacy_threshold

    @property
    def piece_len(self) -> int:
        """Elements per piece and per coded share: ``ceil(d / (U - T))``."""
        return -(-self.dim // self.data_pieces)
