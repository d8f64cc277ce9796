"""The coordinator's task assignment: which aggregator process owns which task, durably.

A state machine without I/O apart from its SQLite table, driven by aggregator heartbeats and
an injected monotonic clock (tested without a network):

* An aggregator *instance* (one process start of an aggregator id) is live while its
  heartbeats arrive within ``ttl_s``. A task is owned by exactly one instance; every change of
  owner increments the task's **epoch**, written to ``task_owners`` *before* the new owner is
  told. The owner fences its ledger connection with that epoch (``Store.fence``), so writes of
  an owner that lost the task are refused by SQLite even if it does not know yet.
* A task without a live owner (never assigned, its owner silent for ``ttl_s``, or given
  back) goes to the next aggregator allowed to hold it that heartbeats while holding no more
  tasks than any other able live one; a task's previous aggregator id, when live again (a
  restart), takes it back. Tasks so spread evenly (counts within one); none is assigned in the
  first ``settle_s`` after start, so aggregators started together all count. The new owner
  recovers the task from the checkpoint and the ledger, as a restarted server does.
* A second instance of a live id waits until the first has been silent for ``ttl_s``: the
  old process may still be running, and two owners would race on the same checkpoints.
  The owner stops serving on its own after ``ttl_s / 2`` without an answered heartbeat, so
  by the time its task moves it has stopped writing (the epoch fence covers the ledger if it
  has not; the checkpoint files rely on that margin).
* After a coordinator restart the owners read from the table get ``ttl_s`` to report again
  before their tasks move.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["OWNERS_DDL", "OwnerBook", "OwnerRecord", "Ownership", "Route"]

OWNERS_DDL = """
CREATE TABLE IF NOT EXISTS task_owners (
    task_id TEXT PRIMARY KEY,
    aggregator_id TEXT NOT NULL,
    instance TEXT NOT NULL,
    address TEXT NOT NULL,
    epoch INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class OwnerRecord:
    """A task's last owner; ``aggregator_id`` empty when it was given back."""

    task_id: str
    aggregator_id: str
    instance: str
    address: str
    epoch: int


@dataclass(frozen=True)
class Route:
    """Where a task is served now; ``aggregator_id`` empty when no live instance owns it."""

    task_id: str
    aggregator_id: str
    address: str


@dataclass
class _Instance:
    aggregator_id: str
    instance: str
    address: str
    last_seen: float


class OwnerBook:
    """The ``task_owners`` table (in the ledger's SQLite file, beside the tasks it fences)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(OWNERS_DDL)

    def load(self) -> list[OwnerRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT task_id, aggregator_id, instance, address, epoch FROM task_owners"
            ).fetchall()
        return [OwnerRecord(str(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4])) for r in rows]

    def save(self, rec: OwnerRecord) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO task_owners (task_id, aggregator_id, instance, address, epoch) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (task_id) DO UPDATE SET "
                "aggregator_id = excluded.aggregator_id, instance = excluded.instance, "
                "address = excluded.address, epoch = excluded.epoch",
                (rec.task_id, rec.aggregator_id, rec.instance, rec.address, rec.epoch),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Ownership:
    """Task -> owning aggregator instance, driven by heartbeats (see the module docstring)."""

    def __init__(
        self,
        tasks: Sequence[str],
        allowed: Mapping[str, Sequence[str]],
        ttl_s: float,
        clock: Callable[[], float],
        book: OwnerBook | None = None,
        settle_s: float = 0.0,
    ) -> None:
        """``allowed``: aggregator id -> the task ids it may own (empty: any); other ids are
        refused (:meth:`heartbeat` raises ``KeyError``)."""
        self._tasks = list(tasks)
        self._settle_until = clock() + settle_s
        self._allowed = {a: frozenset(ts) for a, ts in allowed.items()}
        self._ttl = ttl_s
        self._clock = clock
        self._book = book
        self._owners: dict[str, OwnerRecord] = {}
        self._live: dict[str, _Instance] = {}
        self._waiting: dict[str, _Instance] = {}
        now = clock()
        for rec in [] if book is None else book.load():
            if rec.task_id not in self._tasks:
                continue
            self._owners[rec.task_id] = rec
            if rec.aggregator_id and rec.aggregator_id in self._allowed:
                # Grace after a coordinator restart: the owner has ttl_s to report again.
                self._live.setdefault(
                    rec.aggregator_id,
                    _Instance(rec.aggregator_id, rec.instance, rec.address, now),
                )

    # -- events -----------------------------------------------------------------------------
    def heartbeat(
        self, aggregator_id: str, instance: str, address: str, *, leaving: bool = False
    ) -> dict[str, int]:
        """Record a heartbeat; return the tasks this instance owns now, with their epochs."""
        if aggregator_id not in self._allowed:
            raise KeyError(aggregator_id)
        now = self._clock()
        self._expire(now)
        cur = self._live.get(aggregator_id)
        if cur is not None and cur.instance != instance:
            # The old process of this id may still run: wait until it is silent for ttl_s.
            if not leaving:
                self._waiting[aggregator_id] = _Instance(aggregator_id, instance, address, now)
            return {}
        if leaving:
            self._waiting.pop(aggregator_id, None)
            if cur is not None:
                for rec in list(self._owners.values()):
                    if rec.aggregator_id == aggregator_id and rec.instance == instance:
                        self._set(OwnerRecord(rec.task_id, "", "", "", rec.epoch))
                del self._live[aggregator_id]
            return {}
        if cur is None:
            cur = _Instance(aggregator_id, instance, address, now)
            self._live[aggregator_id] = cur
        cur.last_seen = now
        if cur.address != address:  # moved (port 0 on restart): routes follow, tasks stay
            cur.address = address
            for rec in list(self._owners.values()):
                if rec.aggregator_id == aggregator_id and rec.instance == instance:
                    self._set(OwnerRecord(rec.task_id, aggregator_id, instance, address, rec.epoch))
        self._assign(aggregator_id)
        return {
            t: rec.epoch
            for t, rec in self._owners.items()
            if rec.aggregator_id == aggregator_id and rec.instance == instance
        }

    def routes(self) -> list[Route]:
        """Every task, in config order, with its live owner (or none)."""
        self._expire(self._clock())
        out = []
        for t in self._tasks:
            rec = self._owners.get(t)
            if rec is not None and self._owns(rec):
                out.append(Route(t, rec.aggregator_id, rec.address))
            else:
                out.append(Route(t, "", ""))
        return out

    # -- internals --------------------------------------------------------------------------
    def _owns(self, rec: OwnerRecord) -> bool:
        inst = self._live.get(rec.aggregator_id)
        return inst is not None and inst.instance == rec.instance

    def _expire(self, now: float) -> None:
        for agg, inst in list(self._live.items()):
            if now - inst.last_seen > self._ttl:
                del self._live[agg]
        for agg, inst in list(self._waiting.items()):
            if now - inst.last_seen > self._ttl:
                del self._waiting[agg]
            elif agg not in self._live:  # the old instance is gone: the new one takes over
                self._live[agg] = self._waiting.pop(agg)

    def _set(self, rec: OwnerRecord) -> None:
        # Durable first: an owner is told its epoch only after the fence can see it.
        if self._book is not None:
            self._book.save(rec)
        self._owners[rec.task_id] = rec

    def _assign(self, agg: str) -> None:
        """Give ``agg`` (heartbeating now) the unowned tasks it should take."""
        if self._clock() < self._settle_until:
            return
        load = {a: 0 for a in self._live}
        for owned in self._owners.values():
            if self._owns(owned):
                load[owned.aggregator_id] += 1
        inst = self._live[agg]
        for t in self._tasks:
            rec = self._owners.get(t)
            if rec is not None and self._owns(rec):
                continue
            able = [a for a in self._live if not self._allowed[a] or t in self._allowed[a]]
            if agg not in able:
                continue
            back = rec is not None and rec.aggregator_id == agg
            if rec is not None and rec.aggregator_id in able and not back:
                continue  # its own aggregator is live again and takes it back on its beat
            if not back and load[agg] > min(load[a] for a in able):
                continue  # a less loaded aggregator takes it on its beat
            epoch = 1 if rec is None else rec.epoch + 1
            self._set(OwnerRecord(t, agg, inst.instance, inst.address, epoch))
            load[agg] += 1
