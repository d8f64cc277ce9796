"""``secure_aggregation: {mode: lightsecagg}`` in the service: the aggregator role's side of
FedBuff over buffered asynchronous LightSecAgg, without a TEE (So, Ali, Guler & Avestimehr,
"Secure aggregation for buffered asynchronous federated learning", 2021; "LightSecAgg", MLSys
2022). The protocol itself is :mod:`asyncfl.secure.lightsecagg`; the aggregator is the
simulator's :class:`~asyncfl.algorithms.lightsecagg_fedbuff.LightSecAggFedBuff`. This module
drives them with real devices and no network code (the wire is ``lightsecagg_wire.py``):

- **Group.** The task's ``population`` N: client ids ``0..N-1`` are users ``0..N-1``.
  ``T`` and ``U`` come from the section's fractions as in simulation.
- **Keys.** Each member registers one X25519 public key (the client id is the verified
  token's, so a client can register only its own); a different key for the same client is
  refused, the same one again is a no-op. Keys and the task's session id live in
  ``storage.dir/lightsecagg.sqlite`` and survive restarts. No assignment is given before all
  N keys are in: masks are shared with the whole group.
- **Upload.** One contribution = the device's ``N - 1`` encrypted coded mask shares and its
  masked field vector ``x + z mod p``. Checked, routed and buffered in memory; the ledger row
  holds the MASKED vector (uint32 little-endian, ``p < 2^32``); the shares go into the
  receivers' mailboxes only after the row committed (``published``).
- **Mailbox.** Per member, in order: shares addressed to it, then requests for its
  aggregated share of a closed buffer. A device polls with the last sequence number it
  processed, which acknowledges (deletes) everything up to it; the rest is sent again.
  Items of a settled buffer are deleted at once, so the mailboxes hold shares of the open
  and awaiting buffers only.
- **Unmasking.** A closed buffer's request goes to all N members; answers are validated on
  arrival and kept. Buffers settle strictly in the order they closed (so each step or
  discard commits exactly the oldest ledger rows): the head buffer steps once ``U`` answers
  are in, or is discarded whole when ``lightsecagg_answer_timeout_s`` passes first (as the
  simulator discards a buffer with fewer than ``U`` survivors). The deadline runs from the
  first tick after the request was published.
- **Restart.** The server holds no secret, but the devices' state does not follow a
  restart (shares already aggregated are deleted on the device, answered buffer ids are
  refused), so, as for the TEE buffer, a restart (or a failed commit, which rebuilds from
  disk) discards every unreleased buffer: their ledger rows become ``discarded``, the
  mailboxes start empty. Buffer ids and mailbox sequence numbers of boot ``b`` start at
  ``b << 32`` so a device never mistakes a new request for one it answered.

Not thread-safe except the mailbox (polled on the event loop while a commit publishes into
it from a worker thread); everything else runs under the task's lock.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from asyncfl.algorithms.base import Outcome
from asyncfl.algorithms.fedbuff import FedBuffConfig
from asyncfl.algorithms.lightsecagg_fedbuff import LightSecAggFedBuff
from asyncfl.core.server_opt import ServerOptimizer
from asyncfl.core.update import FloatVector
from asyncfl.errors import CryptoError, ProtocolError
from asyncfl.secure import crypto
from asyncfl.secure.crypto import KeyPair
from asyncfl.secure.lightsecagg import (
    AggregateRequest,
    AggregateShare,
    ContributionId,
    EncryptedMaskShare,
    FieldCodec,
    KeyAdvert,
    LightSecAggParams,
    LightSecAggServer,
    MaskedUpload,
    MaskShares,
)
from asyncfl.secure.lightsecagg.field import FieldVector, check_field
from asyncfl.secure.lightsecagg.user import share_from_bytes
from asyncfl.service.config import TaskConfig
from asyncfl.service.errors import ServiceError
from asyncfl.service.store import LedgerRow

__all__ = [
    "CIPHERTEXT_OVERHEAD",
    "GroupInfo",
    "KeyStore",
    "LightSecAggTask",
    "LightSecAggUpload",
    "MailboxItem",
    "group_params",
    "in_group",
]

CIPHERTEXT_OVERHEAD = crypto.NONCE_BYTES + 16
"""AES-GCM nonce + tag around one coded share."""


def group_params(cfg: TaskConfig, dim: int) -> LightSecAggParams:
    """The task's group: N = ``population``, T and U from the section's fractions, K."""
    sa, alg = cfg.secure_aggregation, cfg.algorithm
    assert isinstance(alg, FedBuffConfig) and cfg.population is not None  # config validation
    return LightSecAggParams.from_fractions(
        cfg.population,
        sa.lightsecagg_privacy_fraction,
        sa.lightsecagg_survivor_fraction,
        dim,
        min_contributions=alg.buffer_size,
    )


def in_group(cfg: TaskConfig, client_id: int) -> bool:
    """Whether ``client_id`` belongs to lightsecagg task ``cfg``'s group (ids ``0..N-1``).
    Known from the config alone, so a selector process, which holds no task state, can list a
    device's groups at check-in."""
    n = cfg.population
    return cfg.secure_aggregation.mode == "lightsecagg" and n is not None and 0 <= client_id < n


class KeyStore:
    """Registered public keys and the session of each lightsecagg task (SQLite, WAL, FULL).

    A file of its own beside the ledger: registrations are rare and never part of an
    update's transaction. A key is durable before its registration is answered.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS lsa_sessions (task_id TEXT PRIMARY KEY, "
            "session_id BLOB NOT NULL, boots INTEGER NOT NULL);"
            "CREATE TABLE IF NOT EXISTS lsa_keys (task_id TEXT NOT NULL, client_id INTEGER "
            "NOT NULL, public BLOB NOT NULL, PRIMARY KEY (task_id, client_id));"
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def open_session(self, task_id: str, new_session: bytes) -> tuple[bytes, int]:
        """The task's session id (``new_session`` on first use) and this boot's number
        (0, 1, ...: one more per call)."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO lsa_sessions (task_id, session_id, boots) VALUES (?, ?, 0) "
                "ON CONFLICT (task_id) DO UPDATE SET boots = boots + 1",
                (task_id, new_session),
            )
            sid, boots = self._db.execute(
                "SELECT session_id, boots FROM lsa_sessions WHERE task_id = ?", (task_id,)
            ).fetchone()
        return bytes(sid), int(boots)

    def keys(self, task_id: str) -> dict[int, bytes]:
        with self._lock:
            rows = self._db.execute(
                "SELECT client_id, public FROM lsa_keys WHERE task_id = ?", (task_id,)
            ).fetchall()
        return {int(c): bytes(k) for c, k in rows}

    def add(self, task_id: str, client_id: int, public: bytes) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO lsa_keys (task_id, client_id, public) VALUES (?, ?, ?)",
                (task_id, client_id, public),
            )


@dataclass(frozen=True, eq=False)
class LightSecAggUpload:
    """One contribution as received: its sequence number, the encrypted coded shares
    ``(receiver, ciphertext)`` of its fresh mask, and the masked vector ``x + z mod p``."""

    seq: int
    shares: tuple[tuple[int, bytes], ...]
    masked: FieldVector


@dataclass(frozen=True)
class GroupInfo:
    """What a member needs to take part: the public parameters and, once all N keys are
    registered, the key directory (``directory[j]`` is user ``j``'s key)."""

    params: LightSecAggParams
    session_id: bytes
    clip: float
    frac_bits: int
    weight_bits: int
    registered: int
    directory: tuple[bytes, ...] | None


@dataclass(frozen=True, eq=False)
class MailboxItem:
    """One item for a member: a share addressed to it, or a request for its aggregated share."""

    seq: int
    share: EncryptedMaskShare | None = None
    request: AggregateRequest | None = None
    buffer_id: int = 0
    """With ``share``: the buffer its contribution is in."""


class _Mailbox:
    """Per-member ordered items with acknowledgement by sequence number. Thread-safe."""

    def __init__(self, first_seq: int) -> None:
        self._lock = threading.Lock()
        self._next = first_seq
        self._boxes: dict[int, dict[int, MailboxItem]] = {}
        # key (a contribution, or ("request", buffer id)) -> where its items are.
        self._index: dict[Hashable, list[tuple[int, int]]] = {}

    def put(self, user: int, key: Hashable, make: Callable[[int], MailboxItem]) -> None:
        with self._lock:
            seq = self._next
            self._next += 1
            self._boxes.setdefault(user, {})[seq] = make(seq)
            self._index.setdefault(key, []).append((user, seq))

    def take(self, user: int, after_seq: int) -> list[MailboxItem]:
        """Delete ``user``'s items up to ``after_seq`` (acknowledged); return the rest."""
        with self._lock:
            box = self._boxes.get(user)
            if not box:
                return []
            for seq in [s for s in box if s <= after_seq]:
                del box[seq]
            return list(box.values())

    def remove(self, key: Hashable, user: int | None = None) -> None:
        """Delete the items of ``key`` (only ``user``'s if given)."""
        with self._lock:
            where = self._index.pop(key, [])
            keep = []
            for u, seq in where:
                if user is None or u == user:
                    self._boxes.get(u, {}).pop(seq, None)
                else:
                    keep.append((u, seq))
            if keep:
                self._index[key] = keep

    def clear(self) -> None:
        with self._lock:
            self._boxes.clear()
            self._index.clear()

    def size(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._boxes.values())


@dataclass
class _Awaiting:
    request: AggregateRequest
    answers: dict[int, AggregateShare] = field(default_factory=dict)
    deadline: float | None = None


class LightSecAggTask:
    """The group, the mailboxes, the masked buffers and their unmasking for one task."""

    def __init__(
        self,
        cfg: TaskConfig,
        params: FloatVector,
        optimizer: ServerOptimizer,
        keys: KeyStore,
        *,
        new_session: Callable[[], bytes],
    ) -> None:
        sa, alg = cfg.secure_aggregation, cfg.algorithm
        assert isinstance(alg, FedBuffConfig)  # TaskConfig.validate refuses anything else
        self.cfg = cfg
        self.params = group_params(cfg, int(params.shape[0]))
        self.codec = FieldCodec(clip=sa.clip, frac_bits=sa.frac_bits)
        self.weight_bits = sa.weight_bits
        self.timeout_s = cfg.lightsecagg_answer_timeout_s
        self._keystore = keys
        self.session_id, self.boot = keys.open_session(cfg.id, new_session())
        first = self.boot << 32
        self.server = LightSecAggServer(self.params, self.session_id, first_buffer_id=first)
        self.agg = LightSecAggFedBuff(
            alg, params, optimizer, server=self.server, codec=self.codec, weight_bits=sa.weight_bits
        )
        self.share_bytes = 4 * self.params.piece_len
        self.ciphertext_bytes = self.share_bytes + CIPHERTEXT_OVERHEAD
        self._keys = keys.keys(cfg.id)
        self._directory: tuple[bytes, ...] | None = None
        if len(self._keys) == self.params.num_users:
            self._advertise()
        self._mailbox = _Mailbox(first + 1)  # a device's "nothing processed yet" is 0
        self.last_buffer_id = 0
        """The buffer of the last admitted contribution (read right after ``admit``)."""
        self._staged: list[tuple[MaskShares, int] | AggregateRequest] = []
        self._awaiting: dict[int, _Awaiting] = {}
        self._order: deque[int] = deque()
        self._dropped = False

    def close(self) -> None:
        self._keystore.close()

    # -- group ----------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """All N members registered a key: contributions may start."""
        return self._directory is not None

    def is_member(self, client_id: int) -> bool:
        return 0 <= client_id < self.params.num_users

    def can_assign(self, client_id: int) -> bool:
        return self.complete and self.is_member(client_id)

    def _member(self, client_id: int) -> None:
        if not self.is_member(client_id):
            raise ServiceError(
                "not_in_group", f"client {client_id} not in [0, {self.params.num_users})"
            )

    def info(self) -> GroupInfo:
        return GroupInfo(
            self.params,
            self.session_id,
            self.codec.clip,
            self.codec.frac_bits,
            self.weight_bits,
            len(self._keys),
            self._directory,
        )

    def register(self, client_id: int, public: bytes) -> GroupInfo:
        """Register the caller's own key (``client_id`` is the verified token's)."""
        self._member(client_id)
        known = self._keys.get(client_id)
        if known == public:
            return self.info()  # a retried registration
        if len(public) != crypto.KEY_BYTES:
            raise ServiceError("bad_key", f"{len(public)} bytes")
        try:
            # Refuses low-order points, for which every agreement yields the zero secret.
            crypto.share_key(KeyPair.generate(), public, b"check", 0, 1)
        except CryptoError as exc:
            raise ServiceError("bad_key", str(exc)) from None
        if known is not None:
            raise ServiceError("key_conflict", f"client {client_id}")
        self._keystore.add(self.cfg.id, client_id, public)
        self._keys[client_id] = public
        if len(self._keys) == self.params.num_users:
            self._advertise()
        return self.info()

    def _advertise(self) -> None:
        directory = None
        for j in range(self.params.num_users):
            directory = self.server.on_key_advert(KeyAdvert(self.session_id, j, self._keys[j]))
        assert directory is not None
        self._directory = directory.keys

    # -- contributions --------------------------------------------------------------------
    def admit(
        self,
        client_id: int,
        upload_id: str,
        base_version: int,
        num_examples: int,
        up: LightSecAggUpload,
    ) -> tuple[LedgerRow, Outcome]:
        """Check, route and buffer one contribution; raises :class:`ServiceError` with every
        state unchanged. Its shares (and the request of a buffer it closes) are published
        by :meth:`published` once its ledger row committed."""
        if not self.complete:
            raise ServiceError("protocol", "the group's key directory is not complete")
        self._member(client_id)
        try:
            check_field(up.masked, (self.params.dim,), "masked upload")
        except ValueError as exc:
            raise ServiceError("protocol", str(exc)) from None
        if any(len(ct) != self.ciphertext_bytes for _, ct in up.shares):
            raise ServiceError("protocol", f"a share ciphertext is not {self.ciphertext_bytes} B")
        cid = ContributionId(client_id, up.seq)
        msg = MaskShares(
            self.session_id, cid, tuple(EncryptedMaskShare(cid, r, ct) for r, ct in up.shares)
        )
        try:
            self.server.on_mask_shares(msg)
        except ProtocolError as exc:
            raise ServiceError("protocol", str(exc)) from None
        version_before = self.agg.version
        bid = self.server.open_buffer_id  # the buffer this contribution goes into
        self.last_buffer_id = bid
        out = self.agg.on_masked_update(
            MaskedUpload(self.session_id, cid, base_version, num_examples, up.masked)
        )
        if not out.accepted:
            self.server.cancel_route(cid)
            assert out.reason is not None
            raise ServiceError(out.reason, out.detail or "")
        self._staged.append((msg, bid))
        req = self.agg.take_request()
        if req is not None:
            self._staged.append(req)
        row = LedgerRow(
            self.cfg.id,
            client_id,
            upload_id,
            base_version,
            num_examples,
            version_before,
            out.staleness,
            out.weight,
            # Masked: uniform in F_p to anyone without the mask. Never read back.
            up.masked.astype(np.uint32),
        )
        return row, out

    def published(self) -> None:
        """The rows admitted since the last call committed: deliver their shares and open
        the unmasking of the buffers they closed."""
        staged, self._staged = self._staged, []
        n = self.params.num_users
        for item in staged:
            if isinstance(item, tuple):
                msg, bid = item
                for s in msg.shares:
                    self._mailbox.put(
                        s.receiver, s.contribution, partial(MailboxItem, share=s, buffer_id=bid)
                    )
                continue
            key = ("request", item.buffer_id)
            for j in range(n):
                self._mailbox.put(j, key, partial(MailboxItem, request=item))
            self._awaiting[item.buffer_id] = _Awaiting(item)
            self._order.append(item.buffer_id)

    def poll(self, client_id: int, after_seq: int) -> list[MailboxItem]:
        """Acknowledge ``client_id``'s items up to ``after_seq``; its remaining items."""
        self._member(client_id)
        return self._mailbox.take(client_id, after_seq)

    @property
    def settled_below(self) -> int:
        """Every buffer with a smaller id is settled (buffers settle in closing order, and
        a new boot's ids start above the old ones'): a device drops its shares of their
        contributions. Without it, a device would keep the shares of discarded buffers (no
        request ever comes for them) and of buffers unmasked from others' answers."""
        return self._order[0] if self._order else self.server.open_buffer_id

    @property
    def mailbox_items(self) -> int:
        return self._mailbox.size()

    # -- unmasking ------------------------------------------------------------------------
    def on_answer(self, client_id: int, buffer_id: int, share: bytes) -> None:
        """Keep a member's aggregated share for a published buffer (validated now; used when
        the buffer settles)."""
        self._member(client_id)
        aw = self._awaiting.get(buffer_id)
        if aw is None:
            raise ServiceError("unknown_buffer", f"buffer {buffer_id}")
        if client_id in aw.answers:
            raise ServiceError("duplicate", f"client {client_id} buffer {buffer_id}")
        try:
            vec = share_from_bytes(share, self.params.piece_len)
        except ProtocolError as exc:
            raise ServiceError("protocol", str(exc)) from None
        aw.answers[client_id] = AggregateShare(self.session_id, buffer_id, client_id, vec)
        self._mailbox.remove(("request", buffer_id), client_id)

    @property
    def awaiting(self) -> tuple[int, ...]:
        """Published buffers waiting for answers, oldest first."""
        return tuple(self._order)

    def due(self, now: float) -> bool:
        """Whether :meth:`settle_one` would do something (cheap; no lock needed)."""
        try:
            aw = self._awaiting.get(self._order[0])
        except IndexError:
            return False
        if aw is None:
            return False
        return (
            aw.deadline is None
            or len(aw.answers) >= self.params.target_survivors
            or now >= aw.deadline
        )

    def settle_one(self, now: float) -> tuple[Outcome, int] | None:
        """Step (``U`` answers) or discard (deadline passed) the OLDEST awaiting buffer;
        returns its outcome and its number of contributions, or None if it must wait."""
        if not self._order:
            return None
        bid = self._order[0]
        aw = self._awaiting[bid]
        if aw.deadline is None:
            aw.deadline = now + self.timeout_s
        out: Outcome | None = None
        if len(aw.answers) >= self.params.target_survivors:
            try:
                for share in aw.answers.values():
                    out = self.agg.on_aggregate_share(share)
                    if out is not None:
                        break
            except ProtocolError:  # the answers were checked on arrival: a bug guard
                out = None
            if out is None:
                out = self.agg.abandon(bid)
        elif now >= aw.deadline:
            out = self.agg.abandon(bid)
        else:
            return None
        self._forget(bid)
        return out, len(aw.request.contributions)

    def drop_all(self) -> int:
        """The task finished: give up every awaiting buffer and the mailboxes; returns the
        contributions dropped (awaiting and open; 0 after the first call)."""
        if self._dropped:
            return 0
        self._dropped = True
        dropped = self.agg.buffered
        for bid in list(self._order):
            dropped += self.agg.abandon(bid).discarded
            self._forget(bid)
        self._staged = []
        self._mailbox.clear()
        return dropped

    def _forget(self, bid: int) -> None:
        aw = self._awaiting.pop(bid)
        self._order.remove(bid)
        self._mailbox.remove(("request", bid))
        for c in aw.request.contributions:
            self._mailbox.remove(c)
