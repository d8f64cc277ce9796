"""In-process driver for buffered asynchronous LightSecAgg: moves messages, no network.

It holds the ``N`` :class:`LightSecAggUser` machines and moves messages between them and a
:class:`LightSecAggServer` exactly as a transport would; the server only ever receives
messages (encrypted shares, masked uploads, aggregated shares), never an input. Compute time
(``timer``) and bytes (``wire_bytes``) are accounted per stage; they are measurements, not
protocol logic. Used by the simulator (:mod:`asyncfl.sim.lightsecagg_buffer`), the tests and
``bench/lightsecagg.py``.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from asyncfl.errors import ProtocolError
from asyncfl.secure.lightsecagg.field import Entropy, FieldVector
from asyncfl.secure.lightsecagg.lagrange import LagrangeCode
from asyncfl.secure.lightsecagg.messages import (
    AggregateRequest,
    AggregateShare,
    KeyDirectory,
    MaskedUpload,
)
from asyncfl.secure.lightsecagg.params import LightSecAggParams
from asyncfl.secure.lightsecagg.server import LightSecAggServer, UnmaskedSum
from asyncfl.secure.lightsecagg.user import LightSecAggUser

__all__ = ["GroupStats", "LightSecAggGroup", "secure_weighted_sum", "seeded_entropy"]

R = TypeVar("R")


def seeded_entropy(seed: int, user: int) -> Entropy:
    """NOT cryptographically secure: reproducible keys, masks and padding for tests only."""
    return random.Random(f"asyncfl/lightsecagg/{seed}/{user}").randbytes


@dataclass
class GroupStats:
    """Totals over the run: bytes over all users, seconds by stage."""

    contributions: int = 0
    unmaskings: int = 0
    failed_unmaskings: int = 0
    refusals: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    user_seconds: dict[str, float] = field(default_factory=dict)
    server_seconds: dict[str, float] = field(default_factory=dict)

    def add_user(self, stage: str, sec: float) -> None:
        self.user_seconds[stage] = self.user_seconds.get(stage, 0.0) + sec

    def add_server(self, stage: str, sec: float) -> None:
        self.server_seconds[stage] = self.server_seconds.get(stage, 0.0) + sec


class LightSecAggGroup:
    """The ``N`` users of one group, key setup done against ``server`` at construction.

    ``seed=None`` draws keys, masks and padding from ``os.urandom``; an int makes them
    reproducible (insecure, for tests).
    """

    def __init__(
        self,
        server: LightSecAggServer,
        *,
        seed: int | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        prm = server.params
        self.params: LightSecAggParams = prm
        self.server = server
        self.timer = timer
        self.stats = GroupStats()
        code: LagrangeCode = server.code
        self.users = [
            LightSecAggUser(
                prm,
                j,
                server.session_id,
                code=code,
                entropy=os.urandom if seed is None else seeded_entropy(seed, j),
            )
            for j in range(prm.num_users)
        ]
        directory: KeyDirectory | None = None
        for u in self.users:
            directory = server.on_key_advert(u.advertise()) or directory
        assert directory is not None  # all N advertised
        for u in self.users:
            u.on_directory(directory)

    def contribute(
        self, user: int, quantised: FieldVector, *, base_version: int = 0, num_examples: int = 1
    ) -> MaskedUpload:
        """User ``user`` prepares a fresh mask, the server routes its shares, and the user
        returns its masked upload (for the caller to hand to the server/aggregator)."""
        st = self.stats
        u = self.users[user]
        t0 = self.timer()
        msg = u.prepare_mask()
        t1 = self.timer()
        routed = self.server.on_mask_shares(msg)
        t2 = self.timer()
        for receiver, share in routed.items():
            self.users[receiver].on_shares([share])
            st.bytes_down += len(share.ciphertext) + 16
        t3 = self.timer()
        up = u.upload(
            msg.contribution, quantised, base_version=base_version, num_examples=num_examples
        )
        st.add_user("mask_and_encode", t1 - t0)
        st.add_server("route", t2 - t1)
        st.add_user("receive_shares", t3 - t2)
        st.add_user("upload", self.timer() - t3)
        st.bytes_up += msg.wire_bytes + up.wire_bytes
        st.contributions += 1
        return up

    def collect(
        self,
        request: AggregateRequest,
        responders: Iterable[int],
        sink: Callable[[AggregateShare], R | None],
    ) -> R | None:
        """Deliver ``request`` to ``responders`` in order and feed their answers to ``sink``
        until it returns a result. A user that refuses is skipped (counted in ``refusals``).
        Returns None if the responders run out first. Either way the buffer is then settled:
        every user forgets its shares of the request's contributions."""
        try:
            return self._collect(request, responders, sink)
        finally:
            for user in self.users:
                user.forget(request.contributions)

    def _collect(
        self,
        request: AggregateRequest,
        responders: Iterable[int],
        sink: Callable[[AggregateShare], R | None],
    ) -> R | None:
        st = self.stats
        for j in responders:
            st.bytes_down += request.wire_bytes
            t0 = self.timer()
            try:
                share = self.users[j].on_aggregate_request(request)
            except ProtocolError:
                st.refusals += 1
                continue
            t1 = self.timer()
            result = sink(share)
            st.add_user("aggregate_share", t1 - t0)
            st.add_server("decode", self.timer() - t1)
            st.bytes_up += share.wire_bytes
            if result is not None:
                st.unmaskings += 1
                return result
        st.failed_unmaskings += 1
        return None


def secure_weighted_sum(
    group: LightSecAggGroup,
    inputs: Sequence[tuple[int, FieldVector, int]],
    dropped: Iterable[int] = (),
) -> UnmaskedSum | None:
    """One buffer through the whole protocol: ``(user, quantised input, weight)`` triples
    (a user may appear several times: one contribution each), then every user not in
    ``dropped`` is asked for its aggregated share. None if fewer than ``U`` answer."""
    server = group.server
    for user, x, weight in inputs:
        up = group.contribute(user, x)
        t0 = group.timer()
        server.on_masked_upload(up, weight)
        group.stats.add_server("accumulate", group.timer() - t0)
    request = server.close_buffer()
    gone = set(dropped)
    result = group.collect(
        request,
        (j for j in range(group.params.num_users) if j not in gone),
        server.on_aggregate_share,
    )
    if result is None:
        server.abandon(request.buffer_id)
    return result
