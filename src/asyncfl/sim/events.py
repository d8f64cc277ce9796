"""A minimal discrete-event queue with a virtual clock.

Events with equal times are delivered together, in insertion order, as one batch: the
simulator frees every client that finished at that instant before it selects replacements,
which is what makes runs independent of heap tie-breaking and deterministic under a seed.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from enum import IntEnum

__all__ = ["Event", "EventKind", "EventQueue"]


class EventKind(IntEnum):
    FINISH = 0
    DROP = 1
    DEADLINE = 2
    WAKE = 3


@dataclass(frozen=True, order=True)
class Event:
    time: float
    seq: int
    kind: EventKind
    ref: int
    """Task id for FINISH/DROP, round version for DEADLINE, unused for WAKE."""


class EventQueue:
    def __init__(self) -> None:
        # Plain tuples on the heap: dataclass ordering costs a Python call per comparison.
        self._heap: list[tuple[float, int, EventKind, int]] = []
        self._seq = 0
        self.now = 0.0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, time: float, kind: EventKind, ref: int = 0) -> None:
        if time < self.now:
            raise ValueError(f"event at t={time} is in the past (now={self.now})")
        heapq.heappush(self._heap, (time, self._seq, kind, ref))
        self._seq += 1

    def peek_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_batch(self) -> list[Event]:
        """All events at the earliest time, in insertion order; advances the clock to it."""
        if not self._heap:
            return []
        first = heapq.heappop(self._heap)
        batch = [Event(*first)]
        while self._heap and self._heap[0][0] == first[0]:
            batch.append(Event(*heapq.heappop(self._heap)))
        self.now = first[0]
        return batch
