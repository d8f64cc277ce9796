"""The coordinator's durable state: tasks and the ledger of accepted updates (SQLite, WAL).

Exactly-once, in three rules:

1. **An update is accepted when its ledger row commits.** The row (task, client id, upload id,
   base version, examples, its delta) is inserted in the same transaction that records what it
   did to the buffer. ``UNIQUE(task_id, client_id, upload_id)`` makes a retried or replayed
   upload a duplicate that is recognised, never counted twice. The client is told "accepted"
   only after the commit, so an acknowledged update is never lost.
2. **A server step commits atomically relative to the ledger.** The new checkpoint file is
   written first (atomically, see ``checkpoint.py``); then ONE transaction inserts the update
   that triggered the step, marks every buffered row ``applied`` with the new version and
   moves the task's version and checkpoint path forward. A crash before that commit leaves the
   old version current (the new file is an orphan, deleted at start-up); after it, the new one.
3. **On restart the buffer is rebuilt** from the rows still ``buffered`` (accepted after the
   current checkpoint's version), replayed in acceptance order through the same algorithm at
   the same version: the same staleness, weights and float additions, so the same buffer.

DP with the TEE buffer adds a write-ahead note: ``release_notes`` counts the releases
requested from the enclave at each version, committed BEFORE each request, so a release the
server saw is accounted even if the server dies before its step commits
(:func:`asyncfl.service.privacy.replay_release_notes`).

A SecAgg round (``secure_aggregation`` secagg/secagg+) writes nothing until its sum is
applied; then its step's transaction also inserts the survivors' rows (no delta) and one
``secure_rounds`` record (``UNIQUE(task_id, version)``: applied exactly once).

Rows of an applied step drop their delta (the checkpoint holds its effect) unless
``keep_applied_deltas`` keeps them for audit.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from asyncfl.core.update import FloatVector
from asyncfl.secure.ring import RingVector
from asyncfl.service.ownership import OWNERS_DDL

__all__ = ["LedgerRow", "SecureRoundRow", "Store", "TaskRecord"]

RowStatus = Literal["buffered", "applied", "discarded"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    checkpoint TEXT NOT NULL,
    dim INTEGER NOT NULL,
    config_json TEXT NOT NULL,
    finished INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS updates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL,
    client_id INTEGER NOT NULL,
    upload_id TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    accepted_version INTEGER NOT NULL,
    staleness INTEGER NOT NULL,
    weight REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('buffered', 'applied', 'discarded')),
    applied_version INTEGER,
    delta BLOB,
    accepted_unix REAL NOT NULL,
    UNIQUE (task_id, client_id, upload_id)
);
CREATE INDEX IF NOT EXISTS updates_status ON updates (task_id, status);
CREATE TABLE IF NOT EXISTS release_notes (
    task_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    releases INTEGER NOT NULL,
    PRIMARY KEY (task_id, version)
);
CREATE TABLE IF NOT EXISTS secure_rounds (
    task_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    session_id TEXT NOT NULL,
    participants INTEGER NOT NULL,
    survivors INTEGER NOT NULL,
    total_weight REAL NOT NULL,
    aggregate BLOB,
    applied_unix REAL NOT NULL,
    UNIQUE (task_id, version)
);
"""


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    version: int
    checkpoint: str
    dim: int
    config_json: str
    finished: bool


@dataclass(frozen=True, eq=False)
class LedgerRow:
    task_id: str
    client_id: int
    upload_id: str
    base_version: int
    num_examples: int
    accepted_version: int
    staleness: int
    weight: float
    delta: FloatVector | RingVector | None = None
    """The float32 delta; for ``secure_aggregation: tee`` tasks the MASKED ring vector
    (little-endian ring elements, never read back: those rows are never replayed)."""
    status: RowStatus = "buffered"
    applied_version: int | None = None
    seq: int = 0


@dataclass(frozen=True, eq=False)
class SecureRoundRow:
    """A SecAgg round whose sum was applied (written with its step, so exactly once)."""

    version: int
    """The model version its step produced."""
    session_id: str
    participants: int
    survivors: int
    total_weight: float
    aggregate: FloatVector | None = None
    """The decoded weighted sum of the survivors' updates (kept with ``keep_applied_deltas``,
    for audit and replay). Individual updates are never stored."""


class Store:
    """One SQLite database; every method is one transaction, serialised by a lock.

    ``synchronous=FULL`` in WAL mode: a commit is on disk when it returns (NORMAL could lose the
    last commits on power loss, which would un-accept acknowledged updates).
    """

    def __init__(self, path: Path, *, keep_applied_deltas: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.keep_applied_deltas = keep_applied_deltas
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        # Updates are model-sized BLOBs: 64 KiB pages store one in 16x fewer overflow pages
        # than the 4 KiB default (measured: ~25% less time per committed 400 kB row). Only
        # takes effect when the file is created (an existing ledger keeps its page size).
        self._db.execute("PRAGMA page_size=65536")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        # Duplicate checks run on the event loop for every upload header; on the writer's
        # connection they waited for the commit in flight (its lock), stalling every stream.
        # In WAL mode a second connection reads the last committed state without waiting.
        # It may miss a commit in progress: the aggregator re-checks under its task lock.
        self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._read_lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()
        with self._read_lock:
            self._reader.close()

    def fence(self, task_id: str, epoch: int) -> None:
        """Refuse this connection's writes to ``task_id`` once its owner epoch is not ``epoch``.

        Roles in separate processes (``ownership.py``): an aggregator fences the task it was
        given before recovering it. TEMP triggers (this connection only) check the epoch in
        ``task_owners`` inside each write transaction, so an aggregator that lost the task
        and does not know it yet cannot add, apply or discard a row or move the version
        (``sqlite3.IntegrityError``; the transaction rolls back).
        """
        guard = (
            "WHEN EXISTS (SELECT 1 FROM temp.fence f WHERE f.task_id = {t} AND f.epoch IS NOT "
            "(SELECT o.epoch FROM main.task_owners o WHERE o.task_id = {t})) "
            "BEGIN SELECT RAISE(ABORT, 'asyncfl: task ownership moved'); END;"
        )
        with self._lock:
            self._db.executescript(
                OWNERS_DDL + "CREATE TEMP TABLE IF NOT EXISTS fence "
                "(task_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL);"
                + "".join(
                    f"CREATE TEMP TRIGGER IF NOT EXISTS fence_{name} BEFORE {op} ON main.{table} "
                    + guard.format(t=f"{row}.task_id")
                    for name, op, table, row in (
                        ("insert", "INSERT", "updates", "NEW"),
                        ("update", "UPDATE", "updates", "OLD"),
                        ("step", "UPDATE", "tasks", "OLD"),
                    )
                )
            )
            self._db.execute(
                "INSERT OR REPLACE INTO temp.fence (task_id, epoch) VALUES (?, ?)", (task_id, epoch)
            )

    # -- tasks ------------------------------------------------------------------------------
    def task(self, task_id: str) -> TaskRecord | None:
        with self._lock:
            r = self._db.execute(
                "SELECT task_id, version, checkpoint, dim, config_json, finished FROM tasks "
                "WHERE task_id = ?",
                (task_id,),
            ).fetchone()
        if r is None:
            return None
        return TaskRecord(r[0], int(r[1]), r[2], int(r[3]), r[4], bool(r[5]))

    def create_task(self, rec: TaskRecord) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO tasks (task_id, version, checkpoint, dim, config_json, finished) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (rec.task_id, rec.version, rec.checkpoint, rec.dim, rec.config_json, 0),
            )

    # -- ledger -----------------------------------------------------------------------------
    def find_upload(self, task_id: str, client_id: int, upload_id: str) -> LedgerRow | None:
        """The committed row of this upload, if any (never waits for a commit in flight)."""
        with self._read_lock:
            r = self._reader.execute(
                f"SELECT {_ROW_COLUMNS} FROM updates "
                "WHERE task_id = ? AND client_id = ? AND upload_id = ?",
                (task_id, client_id, upload_id),
            ).fetchone()
        return None if r is None else _row(r, with_delta=False)

    def rows(self, task_id: str, status: RowStatus | None = None) -> list[LedgerRow]:
        """Ledger rows of a task in acceptance order (with deltas where stored)."""
        q = f"SELECT {_ROW_COLUMNS}, delta FROM updates WHERE task_id = ?"
        args: tuple[object, ...] = (task_id,)
        if status is not None:
            q += " AND status = ?"
            args += (status,)
        with self._lock:
            found = self._db.execute(q + " ORDER BY seq", args).fetchall()
        return [_row(r, with_delta=True) for r in found]

    def counts(self, task_id: str) -> dict[str, int]:
        with self._lock:
            found = self._db.execute(
                "SELECT status, COUNT(*) FROM updates WHERE task_id = ? GROUP BY status",
                (task_id,),
            ).fetchall()
        return {str(s): int(n) for s, n in found}

    def note_release(self, task_id: str, version: int) -> None:
        """Durably count one release about to be requested at ``version`` (write-ahead)."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO release_notes (task_id, version, releases) VALUES (?, ?, 1) "
                "ON CONFLICT (task_id, version) DO UPDATE SET releases = releases + 1",
                (task_id, version),
            )

    def release_notes(self, task_id: str) -> dict[int, int]:
        """Releases noted per version (a committed step at ``v`` accounts its own)."""
        with self._lock:
            found = self._db.execute(
                "SELECT version, releases FROM release_notes WHERE task_id = ?", (task_id,)
            ).fetchall()
        return {int(v): int(n) for v, n in found}

    def commit(
        self,
        task_id: str,
        rows: Sequence[LedgerRow],
        *,
        step: tuple[int, str] | None = None,
        discard: bool = False,
        finished: bool = False,
        secure_round: SecureRoundRow | None = None,
        limit: int | None = None,
    ) -> int:
        """One transaction: insert ``rows`` (buffered, in this order), then either apply every
        buffered row as ``step = (new version, checkpoint path)`` or mark them ``discarded``.
        Returns the number of rows marked discarded. ``limit``: apply or discard only the
        oldest ``limit`` buffered rows (lightsecagg: a buffer settles while the next fills).

        Several rows in one transaction is the group commit of concurrent uploads: one fsync
        for all of them, and each is acknowledged only after this returns. ``secure_round``
        (with ``step``) records the SecAgg round whose sum the step applied."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for row in rows:
                delta = None if row.delta is None else _blob(row.delta)
                self._db.execute(
                    "INSERT INTO updates (task_id, client_id, upload_id, base_version, "
                    "num_examples, accepted_version, staleness, weight, status, delta, "
                    "accepted_unix) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'buffered', ?, ?)",
                    (
                        task_id,
                        row.client_id,
                        row.upload_id,
                        row.base_version,
                        row.num_examples,
                        row.accepted_version,
                        row.staleness,
                        row.weight,
                        delta,
                        time.time(),
                    ),
                )
            oldest = ""
            few: tuple[object, ...] = ()
            if limit is not None:
                oldest = (
                    " AND seq IN (SELECT seq FROM updates WHERE task_id = ? AND "
                    "status = 'buffered' ORDER BY seq LIMIT ?)"
                )
                few = (task_id, limit)
            if step is not None:
                version, checkpoint = step
                keep = "delta" if self.keep_applied_deltas else "NULL"
                self._db.execute(
                    f"UPDATE updates SET status = 'applied', applied_version = ?, delta = {keep} "
                    "WHERE task_id = ? AND status = 'buffered'" + oldest,
                    (version, task_id, *few),
                )
                cur = self._db.execute(
                    "UPDATE tasks SET version = ?, checkpoint = ?, finished = ? "
                    "WHERE task_id = ? AND version = ?",
                    (version, checkpoint, int(finished), task_id, version - 1),
                )
                if cur.rowcount != 1:  # a second writer, or a step that skipped a version
                    raise sqlite3.IntegrityError(
                        f"task {task_id!r} is not at version {version - 1}; step refused"
                    )
                if secure_round is not None:
                    _insert_secure_round(
                        self._db, task_id, version, secure_round, self.keep_applied_deltas
                    )
            elif discard:
                cur = self._db.execute(
                    "UPDATE updates SET status = 'discarded', delta = NULL "
                    "WHERE task_id = ? AND status = 'buffered'" + oldest,
                    (task_id, *few),
                )
                return int(cur.rowcount)
        return 0

    def secure_rounds(self, task_id: str) -> list[SecureRoundRow]:
        """The applied SecAgg rounds of a task, by version."""
        with self._lock:
            found = self._db.execute(
                "SELECT version, session_id, participants, survivors, total_weight, aggregate "
                "FROM secure_rounds WHERE task_id = ? ORDER BY version",
                (task_id,),
            ).fetchall()
        return [
            SecureRoundRow(
                int(v),
                str(sid),
                int(p),
                int(n),
                float(w),
                None if agg is None else np.frombuffer(agg, dtype="<f4").astype(np.float32),
            )
            for v, sid, p, n, w, agg in found
        ]


def _insert_secure_round(
    db: sqlite3.Connection, task_id: str, version: int, sr: SecureRoundRow, keep: bool
) -> None:
    agg = _blob(sr.aggregate) if keep and sr.aggregate is not None else None
    db.execute(
        "INSERT INTO secure_rounds (task_id, version, session_id, participants, survivors, "
        "total_weight, aggregate, applied_unix) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            task_id,
            version,
            sr.session_id,
            sr.participants,
            sr.survivors,
            sr.total_weight,
            agg,
            time.time(),
        ),
    )


def _blob(v: FloatVector | RingVector) -> bytes:
    if v.dtype.kind == "u":  # masked ring elements: kept exact, in their own width
        return v.astype(v.dtype.newbyteorder("<")).tobytes()
    return v.astype("<f4").tobytes()


_ROW_COLUMNS = (
    "task_id, client_id, upload_id, base_version, num_examples, accepted_version, staleness, "
    "weight, status, applied_version, seq"
)


def _row(r: tuple[object, ...], *, with_delta: bool) -> LedgerRow:
    delta = None
    if with_delta and r[11] is not None:
        assert isinstance(r[11], bytes)
        delta = np.frombuffer(r[11], dtype="<f4").astype(np.float32)
    status = str(r[8])
    assert status in ("buffered", "applied", "discarded")
    return LedgerRow(
        task_id=str(r[0]),
        client_id=int(str(r[1])),
        upload_id=str(r[2]),
        base_version=int(str(r[3])),
        num_examples=int(str(r[4])),
        accepted_version=int(str(r[5])),
        staleness=int(str(r[6])),
        weight=float(str(r[7])),
        status=status,  # type: ignore[arg-type]
        applied_version=None if r[9] is None else int(str(r[9])),
        seq=int(str(r[10])),
        delta=delta,
    )
