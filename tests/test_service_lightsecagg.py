"""``secure_aggregation: lightsecagg`` in the service, as a state machine without a network:
the aggregator role (``TaskRuntime`` + ``LightSecAggTask``) driven by real
``LightSecAggUser`` devices (real keys, coded shares, AES-GCM) through the same calls the wire
handlers make. Checks: the trajectory matches plain FedBuff within the fixed-point bound;
buffers mixing model versions; buffers settle in close order (each commits exactly its own
ledger rows); a buffer short of U answers at its deadline is discarded whole; every bad
message gets its catalog reason and changes no state; the ledger holds masked vectors only;
a restart discards the unreleased buffers and the task goes on with the registered keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from asyncfl.core.configload import build_config
from asyncfl.errors import ConfigError
from asyncfl.secure.crypto import KeyPair
from asyncfl.secure.lightsecagg import (
    AggregateRequest,
    ContributionId,
    EncryptedMaskShare,
    KeyDirectory,
    LightSecAggParams,
    LightSecAggUser,
    P,
)
from asyncfl.secure.lightsecagg.user import share_to_bytes
from asyncfl.service.config import TaskConfig
from asyncfl.service.errors import ServiceError
from asyncfl.service.lightsecagg_task import LightSecAggUpload
from asyncfl.service.store import Store
from asyncfl.service.task import Accepted, Submission, TaskRuntime, initial_params

N, K, STEPS = 6, 3, 3  # T = floor(6/4) = 1, U = ceil(6/2) = 3
INPUT, CLASSES = 4, 3
DIM = INPUT * CLASSES + CLASSES
TIMEOUT = 10.0


def _task(**extra: Any) -> dict[str, Any]:
    return {
        "id": "lsa",
        "input_shape": [INPUT],
        "num_classes": CLASSES,
        "model": {"name": "logistic"},
        "algorithm": {"name": "fedbuff", "concurrency": N, "buffer_size": K},
        "server_optimizer": {"name": "sgd", "lr": 1.0},
        "max_server_steps": STEPS,
        "population": N,
        "secure_aggregation": {"mode": "lightsecagg", "frac_bits": 16, "weight_bits": 6},
        "lightsecagg_answer_timeout_s": TIMEOUT,
        **extra,
    }


def _delta(client: int, k: int) -> np.ndarray:
    """Asymmetric per client and per contribution: a broken weighting would show."""
    rng = np.random.default_rng(1000 * client + k)
    return (rng.normal(0, 0.05 * (1 + client), DIM) + 0.01 * client).astype(np.float32)


class Devices:
    """The group's devices, talking to ``rt`` exactly as the wire handlers would."""

    def __init__(self, rt: TaskRuntime) -> None:
        self.rt = rt
        self.keys = [KeyPair.generate() for _ in range(N)]
        self.users: list[LightSecAggUser] = []
        self.after = [0] * N
        self.unsent: list[list[tuple[int, bytes]]] = [[] for _ in range(N)]
        self.uploads = 0
        self.rng = np.random.default_rng(7)

    @property
    def lsa(self) -> Any:
        assert self.rt.lsa is not None
        return self.rt.lsa

    def register(self) -> None:
        info = None
        for j in range(N):
            info = self.lsa.register(j, self.keys[j].public)
        assert info is not None and info.directory is not None
        self.join(info.params, info.session_id, info.directory)

    def join(self, prm: LightSecAggParams, session: bytes, directory: tuple[bytes, ...]) -> None:
        self.users = [LightSecAggUser(prm, j, session, keys=self.keys[j]) for j in range(N)]
        for u in self.users:
            u.on_directory(KeyDirectory(session, directory))

    def body(self, client: int, delta: np.ndarray, base: int) -> Submission:
        user = self.users[client]
        x = self.lsa.codec.encode(delta, self.rng)
        msg = user.prepare_mask()
        up = user.upload(msg.contribution, x, base_version=base, num_examples=3)
        self.uploads += 1
        shares = tuple((s.receiver, s.ciphertext) for s in msg.shares)
        payload = LightSecAggUpload(msg.contribution.seq, shares, up.masked)
        return Submission(
            client, f"u{self.uploads}", base, 3, np.zeros(0, np.float32), None, payload
        )

    def upload(self, client: int, delta: np.ndarray, base: int | None = None) -> Accepted:
        sub = self.body(client, delta, self.rt.version if base is None else base)
        res = self.rt.submit_many([sub])[0]
        assert isinstance(res, Accepted), res
        return res

    def poll(self, j: int) -> list[tuple[int, bytes]]:
        """Device j's mailbox: keep its shares; return its answers (buffer id, share)."""
        answers = []
        for item in self.lsa.poll(j, self.after[j]):
            if item.share is not None:
                s = item.share
                self.users[j].on_shares([EncryptedMaskShare(s.contribution, j, s.ciphertext)])
            else:
                req: AggregateRequest = item.request
                share = self.users[j].on_aggregate_request(req)
                answers.append((share.buffer_id, share_to_bytes(share.share)))
            self.after[j] = item.seq
        return answers

    def answer(self, who: list[int], now: float = 0.0, buffer: int | None = None) -> None:
        """Devices ``who`` poll and send their answers (only for ``buffer`` if given; the
        others are kept for later, as a device keeps an answer it could not deliver)."""
        for j in who:
            self.unsent[j] += self.poll(j)
            keep = []
            for bid, raw in self.unsent[j]:
                if buffer is None or bid == buffer:
                    self.lsa.on_answer(j, bid, raw)
                else:
                    keep.append((bid, raw))
            self.unsent[j] = keep
        self.rt.settle_lightsecagg(now)


def _runtime(tmp: Path, **extra: Any) -> tuple[TaskRuntime, Store]:
    cfg = build_config(TaskConfig, _task(**extra))
    store = Store(tmp / "ledger.sqlite", keep_applied_deltas=True)
    return TaskRuntime(cfg, store, tmp / "ck"), store


def _statuses(store: Store) -> list[tuple[int, str, int | None]]:
    return [(r.client_id, r.status, r.applied_version) for r in store.rows("lsa")]


def test_trajectory_matches_plain_fedbuff_and_the_ledger_is_masked(tmp_path: Path) -> None:
    rt, store = _runtime(tmp_path)
    try:
        dev = Devices(rt)
        assert rt.lsa is not None and not rt.lsa.complete
        dev.register()
        assert rt.lsa.complete
        p0 = initial_params(rt.cfg).astype(np.float64)
        ref = p0.copy()
        sent: dict[int, np.ndarray] = {}
        for step in range(STEPS):
            clients = [(step + i) % N for i in range(K)]
            deltas = [_delta(c, step) for c in clients]
            for c, d in zip(clients, deltas, strict=True):
                dev.upload(c, d)
                sent[len(sent)] = d
            ref -= np.mean([d.astype(np.float64) for d in deltas], axis=0)
            assert rt.version == step and rt.lsa.awaiting  # closed, not yet unmasked
            # Only U of the N devices answer (the others "dropped"); the last contributor
            # is among the silent ones.
            silent = {clients[-1], (clients[-1] + 1) % N, (clients[-1] + 2) % N}
            dev.answer([j for j in range(N) if j not in silent])
            assert rt.version == step + 1
        assert rt.finished and rt.lsa.mailbox_items == 0
        # Staleness 0 throughout: every weight is exactly 2^S, so only the codec's stochastic
        # rounding (< 2^-16 per coordinate per step) separates the two; float32 steps add ulps.
        bound = rt.lsa.codec.error_bound((1 << 6) * K)
        err = np.abs(rt.params().astype(np.float64) - ref)
        assert err.max() <= STEPS * bound + 1e-6, (err.max(), bound)
        assert err.max() > 0  # it really went through the fixed point of F_p
        # The ledger: every row applied once, in order, and each holds a masked vector that
        # is nowhere near its client's own encoding (a mask is uniform in F_p).
        assert _statuses(store) == [
            (c, "applied", s + 1) for s in range(STEPS) for c in [(s + i) % N for i in range(K)]
        ]
        for k, row in enumerate(store.rows("lsa")):
            with store._lock:
                (blob,) = store._db.execute(
                    "SELECT delta FROM updates WHERE seq = ?", (row.seq,)
                ).fetchone()
            masked = np.frombuffer(blob, dtype="<u4").astype(np.int64)
            q = rt.lsa.codec.encode(sent[k], np.random.default_rng(0)).astype(np.int64)
            diff = (masked - q) % P
            assert int(np.sum(np.minimum(diff, P - diff) <= 2)) <= 1
    finally:
        rt.close()
        store.close()


def test_mixed_versions_settle_in_close_order(tmp_path: Path) -> None:
    rt, store = _runtime(tmp_path)
    try:
        dev = Devices(rt)
        dev.register()
        lsa = rt.lsa
        assert lsa is not None
        for c in range(K):  # buffer A closes at version 0
            dev.upload(c, _delta(c, 0))
        a_id = lsa.awaiting[0]
        for c in range(K, 2 * K):  # buffer B closes at version 0 too (all base version 0)
            dev.upload(c, _delta(c, 0))
        b_id = lsa.awaiting[1]
        assert lsa.awaiting == (a_id, b_id) and rt.version == 0
        # B gets all its answers first: it must wait for A (its rows are not the oldest).
        dev.answer(list(range(N)), buffer=b_id)
        assert rt.version == 0 and lsa.awaiting == (a_id, b_id)
        dev.answer(list(range(N)), buffer=a_id)  # A steps, then B at once
        assert rt.version == 2 and lsa.awaiting == ()
        assert _statuses(store) == [(c, "applied", 1) for c in range(K)] + [
            (c, "applied", 2) for c in range(K, 2 * K)
        ]
        # A buffer mixing base versions 1 and 2 (staleness 1 and 0).
        dev.upload(0, _delta(0, 1), base=1)
        dev.upload(1, _delta(1, 1), base=2)
        res = dev.upload(2, _delta(2, 1), base=1)
        assert res.staleness == 1 and 0 < res.weight < 1
        dev.answer([3, 4, 5])
        assert rt.version == 3 and rt.finished
    finally:
        rt.close()
        store.close()


def test_deadline_discards_the_buffer_and_only_its_rows(tmp_path: Path) -> None:
    rt, store = _runtime(tmp_path)
    try:
        dev = Devices(rt)
        dev.register()
        lsa = rt.lsa
        assert lsa is not None
        for c in range(K):
            dev.upload(c, _delta(c, 0))
        dev.upload(K, _delta(K, 0))  # the next buffer is filling meanwhile
        dev.answer([0, 1], now=100.0)  # U - 1 answers; the deadline starts at 100
        assert lsa.awaiting and rt.version == 0
        rt.settle_lightsecagg(100.0 + TIMEOUT - 0.1)
        assert lsa.awaiting
        rt.settle_lightsecagg(100.0 + TIMEOUT)
        assert not lsa.awaiting and rt.version == 0 and rt.discarded_total == K
        assert _statuses(store) == [(c, "discarded", None) for c in range(K)] + [
            (K, "buffered", None)
        ]
        # Nothing of the discarded buffer is left to deliver; the open one's shares are.
        pending = lsa.poll(2, dev.after[2])
        assert [(it.share.contribution if it.share else None) for it in pending] == [
            ContributionId(K, 0)
        ]
        for c in (4, 5):  # the task goes on
            dev.upload(c, _delta(c, 1))
        dev.answer(list(range(N)), now=200.0)
        assert rt.version == 1
    finally:
        rt.close()
        store.close()


def _reason(fn: Any, *args: Any) -> str:
    with pytest.raises(ServiceError) as info:
        fn(*args)
    return info.value.reason


def test_bad_messages_get_their_reason_and_change_nothing(tmp_path: Path) -> None:
    rt, store = _runtime(tmp_path)
    try:
        dev = Devices(rt)
        lsa = rt.lsa
        assert lsa is not None
        # Before the group is complete nothing can be uploaded.
        for j in range(N - 1):
            lsa.register(j, dev.keys[j].public)
        assert not lsa.complete and not lsa.can_assign(0)
        assert _reason(lsa.register, N, dev.keys[0].public) == "not_in_group"
        assert _reason(lsa.register, N - 1, b"\x01" * 31) == "bad_key"
        assert _reason(lsa.register, N - 1, bytes(32)) == "bad_key"  # a low-order point
        assert _reason(lsa.register, 0, KeyPair.generate().public) == "key_conflict"
        assert lsa.register(0, dev.keys[0].public).registered == N - 1  # a retry: no-op
        info = lsa.register(N - 1, dev.keys[N - 1].public)
        assert info.directory is not None and lsa.can_assign(N - 1) and not lsa.can_assign(N)
        dev.join(info.params, info.session_id, info.directory)
        dev.upload(0, _delta(0, 0))

        def state() -> tuple[Any, ...]:
            return (
                rt.version,
                lsa.agg.buffered,
                lsa.server.masked_sum.copy().tobytes(),
                lsa.mailbox_items,
                len(store.rows("lsa")),
                lsa.awaiting,
            )

        before = state()

        def refused(sub: Submission) -> str:
            (res,) = rt.submit_many([sub])
            assert isinstance(res, ServiceError)
            assert state() == before
            return res.reason

        good = dev.body(1, _delta(1, 0), 0)
        up = good.lightsecagg
        assert up is not None

        def variant(**kw: Any) -> Submission:
            fields = {"seq": up.seq, "shares": up.shares, "masked": up.masked, **kw}
            return Submission(
                1, f"bad{len(kw)}{id(kw)}", 0, 3, good.delta, None, LightSecAggUpload(**fields)
            )

        assert refused(variant(shares=up.shares[:-1])) == "protocol"  # a receiver left out
        assert refused(variant(shares=(*up.shares[:-1], (1, up.shares[-1][1])))) == "protocol"
        short = tuple((r, ct[:-1]) for r, ct in up.shares)
        assert refused(variant(shares=short)) == "protocol"
        big = up.masked.copy()
        big[3] = P
        assert refused(variant(masked=big)) == "protocol"
        assert refused(variant(masked=up.masked[:-1])) == "protocol"
        plain = Submission(1, "plain", 0, 3, _delta(1, 0))
        assert refused(plain) == "bad_encoding"
        # The aggregator's own refusals undo the routing too: the same client twice in the
        # open buffer, then a version from the future.
        twice = dev.body(0, _delta(0, 1), 0)
        assert refused(twice) == "duplicate_client"
        future = dev.body(2, _delta(2, 0), 5)
        assert refused(future) == "bad_version"
        # The good one is still acceptable after all that.
        assert isinstance(rt.submit_many([good])[0], Accepted)
        dev.upload(2, _delta(2, 0))
        (bid,) = lsa.awaiting
        # The refused contribution's routing was undone: the very same upload is accepted
        # into the next buffer now that client 0 is no longer in the open one.
        assert isinstance(rt.submit_many([twice])[0], Accepted)
        answers = dev.poll(3)
        assert [b for b, _ in answers] == [bid]
        raw = answers[0][1]
        assert _reason(lsa.on_answer, 3, bid + 1, raw) == "unknown_buffer"
        assert _reason(lsa.on_answer, 3, bid, raw[:-4]) == "protocol"
        assert _reason(lsa.on_answer, 3, bid, b"\xff" * len(raw)) == "protocol"  # >= p
        assert _reason(lsa.on_answer, N, bid, raw) == "not_in_group"
        assert _reason(lsa.poll, N, 0) == "not_in_group"
        lsa.on_answer(3, bid, raw)
        assert _reason(lsa.on_answer, 3, bid, raw) == "duplicate"
        # Devices refuse what a curious server might ask: a request for a sub-buffer.
        req = AggregateRequest(lsa.session_id, bid + 7, (ContributionId(0, 0),), (64,))
        with pytest.raises(Exception, match="unmasks only buffers"):
            dev.users[4].on_aggregate_request(req)
    finally:
        rt.close()
        store.close()


def test_restart_discards_unreleased_buffers_and_keeps_the_group(tmp_path: Path) -> None:
    rt, store = _runtime(tmp_path)
    dev = Devices(rt)
    dev.register()
    assert rt.lsa is not None
    session, boot = rt.lsa.session_id, rt.lsa.boot
    for c in range(K):  # one step
        dev.upload(c, _delta(c, 0))
    dev.answer(list(range(N)))
    for c in range(K + 1):  # a closed buffer awaiting answers + one row in the open buffer
        dev.upload(c, _delta(c, 1))
    old_bid = rt.lsa.awaiting[0]
    rt.close()
    store.close()

    store = Store(tmp_path / "ledger.sqlite", keep_applied_deltas=True)
    rt2 = TaskRuntime(rt.cfg, store, tmp_path / "ck")
    try:
        lsa = rt2.lsa
        assert lsa is not None
        assert rt2.version == 1 and lsa.agg.buffered == 0 and lsa.awaiting == ()
        assert lsa.complete and lsa.session_id == session and lsa.boot == boot + 1
        assert [s for _, s, _ in _statuses(store)] == ["applied"] * K + ["discarded"] * (K + 1)
        dev.rt = rt2
        dev.after = [0] * N  # nothing of the old boot is delivered again
        assert all(dev.poll(j) == [] for j in range(N))
        for step in (1, 2):
            for c in range(K):
                dev.upload((c + step) % N, _delta(c, 10 + step))
            (bid,) = lsa.awaiting
            assert bid >= (boot + 1) << 32 > old_bid  # never an id a device answered
            dev.answer(list(range(N)))
        assert rt2.finished and rt2.version == STEPS
    finally:
        rt2.close()
        store.close()


def test_config_refuses_unsupported_lightsecagg_combinations() -> None:
    bad = {
        **_task(),
        "algorithm": {"name": "fedbuff", "buffer_size": 1, "example_weighting": "linear"},
        "population": None,
        "privacy": {"enabled": True},
        "max_update_norm": 1.0,
        "lightsecagg_answer_timeout_s": 0,
    }
    with pytest.raises(ConfigError) as info:
        build_config(TaskConfig, bad)
    text = str(info.value)
    for name in (
        "algorithm.buffer_size",
        "algorithm.example_weighting",
        "population",
        "privacy.enabled",
        "max_update_norm",
        "lightsecagg_answer_timeout_s",
    ):
        assert name in text, name
    # The field's headroom: the default 24 fractional and 12 weight bits do not fit.
    with pytest.raises(ConfigError, match=r"secure_aggregation\.frac_bits"):
        build_config(TaskConfig, {**_task(), "secure_aggregation": {"mode": "lightsecagg"}})
    with pytest.raises(ConfigError, match=r"algorithm\.name"):
        build_config(TaskConfig, {**_task(), "algorithm": {"name": "fedasync"}})


def test_a_device_in_the_open_buffer_is_held_until_it_closes(tmp_path: Path) -> None:
    """The lease rule's input (``TaskRuntime.buffer_holds``, asked by the coordinator before
    it leases): true exactly while the device's contribution is in the OPEN buffer, whose
    second one from it would be refused ``duplicate_client``; a closed buffer waiting for
    answers holds nobody back."""
    rt, store = _runtime(tmp_path)
    try:
        dev = Devices(rt)
        dev.register()
        assert not any(rt.buffer_holds(c) for c in range(N))
        dev.upload(0, _delta(0, 0))
        assert rt.buffer_holds(0) and not rt.buffer_holds(1)
        dup = rt.submit_many([dev.body(0, _delta(0, 1), 0)])[0]
        assert isinstance(dup, ServiceError) and dup.reason == "duplicate_client"
        dev.upload(1, _delta(1, 0))
        assert rt.buffer_holds(0) and rt.buffer_holds(1)
        dev.upload(2, _delta(2, 0))  # K: the buffer closes, awaiting answers
        assert rt.lsa is not None and rt.lsa.awaiting and rt.version == 0
        assert not any(rt.buffer_holds(c) for c in range(N))
        dev.upload(0, _delta(0, 2))  # device 0 fills the next buffer meanwhile
        assert rt.buffer_holds(0)
    finally:
        rt.close()
        store.close()
