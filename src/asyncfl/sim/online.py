"""Who is online now, maintained incrementally as virtual time advances.

Recomputing ``DevicePopulation.available(t)`` for every selection costs O(population) per
client update. Online status only changes at window boundaries, so the tracker keeps the
mask and, when time moves from ``t0`` to ``t1``, re-evaluates only the clients with a
boundary in between: O(changes) per advance, O(1) per lookup.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from asyncfl.sim.devices import DAY_S, DevicePopulation

__all__ = ["OnlineTracker"]

# Boundaries are matched with this slack (seconds) so float rounding of the time of day can
# never skip one; re-checking a client whose status did not change is harmless.
_SLACK_S = 1e-3


class OnlineTracker:
    def __init__(self, pop: DevicePopulation, t0: float = 0.0) -> None:
        self._pop = pop
        length = pop.window_length_s
        part = np.flatnonzero((length > 0) & (length < DAY_S))
        opens = pop.window_start_s[part] % DAY_S
        closes = (pop.window_start_s[part] + length[part]) % DAY_S
        tod = np.concatenate([opens, closes])
        order = np.argsort(tod, kind="stable")
        self._tod = tod[order]
        self._clients = np.concatenate([part, part])[order]
        self.always = bool((length >= DAY_S).all())
        self._t = t0
        self._online = pop.available(t0)

    def at(self, t: float) -> npt.NDArray[np.bool_]:
        """The online mask at ``t`` (``t`` never decreases between calls)."""
        if t < self._t:
            raise ValueError(f"time went backwards: {t} < {self._t}")
        if t == self._t or self.always:
            return self._online
        if t - self._t >= DAY_S - 2 * _SLACK_S:
            self._online = self._pop.available(t)
        else:
            lo = (self._t - _SLACK_S) % DAY_S
            hi = (t + _SLACK_S) % DAY_S
            if lo <= hi:
                idx = slice(np.searchsorted(self._tod, lo), np.searchsorted(self._tod, hi, "right"))
                changed = self._clients[idx]
            else:  # the interval wraps past midnight
                changed = np.concatenate(
                    [
                        self._clients[np.searchsorted(self._tod, lo) :],
                        self._clients[: np.searchsorted(self._tod, hi, "right")],
                    ]
                )
            if changed.size:
                self._online[changed] = self._pop.available(t, changed)
        self._t = t
        return self._online
