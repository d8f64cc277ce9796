"""The selector role: check-in, eligibility, rate limits, and who may train right now.

Papaya's fast client replacement is a counter, not a scheduler: a task keeps at most
``concurrency`` live leases; a lease ends when its client uploads (accepted or not) or when it
expires. A client checking in gets work only if a slot is free, otherwise "retry after N s";
so every finished or failed client frees its slot for the very next check-in, and no client
ever waits for another one.

FedAvg rounds use the same slots: a round of version ``v`` hands out ``ceil(C (1 + o))`` leases,
then refuses until the version moves (a step) or the round is closed by its deadline.

Time is injected (``clock``: monotonic seconds), as everywhere in asyncfl.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from asyncfl.service.config import SelectorSection
from asyncfl.service.errors import ServiceError

__all__ = ["RateLimiter", "Slots"]


@dataclass
class Slots:
    """Live leases of one task, and (FedAvg) the round they belong to."""

    capacity: int
    sync: bool
    active: dict[str, float] = field(default_factory=dict)
    """lease id -> monotonic expiry time, in insertion (= expiry) order: callers use one
    timeout per task and a monotonic clock."""
    round_version: int = -1
    round_selected: int = 0
    round_opened_at: float = 0.0
    holders: dict[int, str] = field(default_factory=dict)
    """client id -> its latest lease (async tasks): the device runtime checks in only after
    it has uploaded or given up on its previous assignment, so a client's new check-in ends
    its old lease (e.g. after a failed download) instead of holding a slot until expiry."""

    def expire(self, now: float) -> int:
        # Runs on every check-in, so it must not scan all Mc leases (1,000 leases x 1,000
        # check-ins/s was a measurable share of the server's CPU): leases are inserted in
        # time order with the task's one timeout, so the dict's insertion order is expiry
        # order and the expired ones are a prefix.
        dead = []
        for lease, until in self.active.items():
            if until > now:
                break
            dead.append(lease)
        for lease in dead:
            del self.active[lease]
        return len(dead)

    def try_take(
        self,
        lease_id: str,
        version: int,
        now: float,
        timeout_s: float,
        client_id: int | None = None,
    ) -> bool:
        """Reserve a slot for ``lease_id`` (of ``client_id``); False if the task is full."""
        self.expire(now)
        if not self.sync and client_id is not None:
            previous = self.holders.pop(client_id, None)
            if previous is not None:
                self.active.pop(previous, None)
        if self.sync:
            if version != self.round_version:
                # A new round: leases of the closed one are void (their uploads are "late").
                self.round_version = version
                self.round_selected = 0
                self.round_opened_at = now
                self.active.clear()
            if self.round_selected >= self.capacity:
                return False
            self.round_selected += 1
        elif len(self.active) >= self.capacity:
            return False
        self.active[lease_id] = now + timeout_s
        if not self.sync and client_id is not None:
            self.holders[client_id] = lease_id
        return True

    def release(self, lease_id: str) -> None:
        self.active.pop(lease_id, None)

    def round_exhausted(self, version: int) -> bool:
        """Every client of round ``version`` was selected and has uploaded or expired."""
        return (
            self.sync
            and self.round_version == version
            and self.round_selected >= self.capacity
            and not self.active
        )


class RateLimiter:
    """At most one check-in per ``min_interval_s`` per client (refusals do not reset it)."""

    def __init__(self, cfg: SelectorSection, clock: Callable[[], float]) -> None:
        self._cfg = cfg
        self._clock = clock
        self._last: dict[int, float] = {}

    def check(self, client_id: int, num_examples: int) -> None:
        if num_examples < self._cfg.min_examples:
            raise ServiceError(
                "ineligible", f"client {client_id} has {num_examples} < {self._cfg.min_examples}"
            )
        interval = self._cfg.min_checkin_interval_s
        if interval <= 0:
            return
        now = self._clock()
        last = self._last.get(client_id)
        if last is not None and now - last < interval:
            raise ServiceError("rate_limited", f"client {client_id}: {now - last:.3f}s")
        self._last[client_id] = now
