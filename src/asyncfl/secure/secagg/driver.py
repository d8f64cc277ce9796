"""In-process driver: one SecAgg round with simulated dropouts, no network.

It moves messages between :class:`SecAggClient` machines and one :class:`SecAggServer` exactly
as a transport would; the server only ever receives messages (masked vectors), never an input.
Clients in ``dropouts[stage]`` vanish before sending their message of ``stage`` (and stay
gone). Used by the simulator and by ``bench/secagg.py``; compute time is measured with the
injected ``timer`` (it is accounting, not protocol logic).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from asyncfl.errors import ProtocolError
from asyncfl.secure.ring import RingVector
from asyncfl.secure.secagg.client import SecAggClient
from asyncfl.secure.secagg.config import SecAggConfig, Stage
from asyncfl.secure.secagg.messages import (
    ClientMessage,
    KeyBroadcast,
    ServerMessage,
    ShareBroadcast,
    UnmaskRequest,
    wire_size,
)
from asyncfl.secure.secagg.server import RoundFailed, SecAggServer

__all__ = ["SecAggResult", "run_secagg_round"]

M = TypeVar("M", KeyBroadcast, ShareBroadcast, UnmaskRequest)


@dataclass(frozen=True, eq=False)
class SecAggResult:
    """Outcome of one round: the sum of the survivors' inputs, or why there is none."""

    sum: RingVector | None
    failure: str | None
    survivors: frozenset[int]
    bytes_up: Mapping[int, int]
    bytes_down: Mapping[int, int]
    client_seconds: Mapping[Stage, float] = field(default_factory=dict)
    server_seconds: Mapping[Stage, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.sum is not None


def _seeded_entropy(seed: int, client: int) -> Callable[[int], bytes]:
    # NOT cryptographically secure: reproducible keys and masks for tests and simulation only.
    return random.Random(f"asyncfl/secagg/{seed}/{client}").randbytes


def run_secagg_round(
    inputs: Mapping[int, RingVector],
    config: SecAggConfig,
    dropouts: Mapping[Stage, Collection[int]] | None = None,
    seed: int | None = None,
    timer: Callable[[], float] = time.perf_counter,
) -> SecAggResult:
    """Run one round over ``inputs`` (one ring vector per client of ``config``).

    ``seed=None`` draws all keys and masks from ``os.urandom``; an int makes them
    reproducible (insecure, for tests). A round that cannot complete returns
    ``sum=None`` and the server's reason in ``failure``.
    """
    if set(inputs) != set(config.clients):
        raise ValueError(
            f"inputs are for clients {sorted(inputs)[:10]}, "
            f"config has {sorted(config.clients)[:10]}"
        )
    drops = {s: frozenset(dropouts.get(s, ())) if dropouts else frozenset() for s in Stage}
    for s, ids in drops.items():
        if not ids <= config.clients:
            raise ValueError(
                f"dropouts[{s.name}] has unknown clients {sorted(ids - config.clients)}"
            )
    up = dict.fromkeys(config.clients, 0)
    down = dict.fromkeys(config.clients, 0)
    c_sec = dict.fromkeys(Stage, 0.0)
    s_sec = dict.fromkeys(Stage, 0.0)
    server = SecAggServer(config)
    gone: set[int] = set()

    def entropy(u: int) -> Callable[[int], bytes]:
        return os.urandom if seed is None else _seeded_entropy(seed, u)

    clients = {u: SecAggClient(u, config, entropy(u)) for u in sorted(config.clients)}

    def deliver(stage: Stage, outgoing: list[ClientMessage]) -> list[ServerMessage]:
        t0 = timer()
        for msg in outgoing:
            server.receive(msg)
        replies = server.advance()
        s_sec[stage] += timer() - t0
        for msg in outgoing:
            up[msg.sender] += wire_size(msg, config.ring_bits)
        for reply in replies:
            down[reply.recipient] += wire_size(reply, config.ring_bits)
        return replies

    def step(stage: Stage, work: Callable[[SecAggClient], ClientMessage]) -> list[ClientMessage]:
        gone.update(drops[stage])
        out = []
        for u, client in clients.items():
            if u in gone:
                continue
            t0 = timer()
            out.append(work(client))
            c_sec[stage] += timer() - t0
        return out

    try:
        replies = deliver(
            Stage.ADVERTISE_KEYS, step(Stage.ADVERTISE_KEYS, lambda c: c.advertise_keys())
        )
        by = _by_recipient(replies, clients, gone)
        replies = deliver(
            Stage.SHARE_KEYS,
            step(Stage.SHARE_KEYS, lambda c: c.share_keys(_as(by, c, KeyBroadcast))),
        )
        by = _by_recipient(replies, clients, gone)
        replies = deliver(
            Stage.MASKED_INPUT,
            step(
                Stage.MASKED_INPUT,
                lambda c: c.masked_input(_as(by, c, ShareBroadcast), inputs[c.client_id]),
            ),
        )
        by = _by_recipient(replies, clients, gone)
        deliver(
            Stage.UNMASKING, step(Stage.UNMASKING, lambda c: c.unmask(_as(by, c, UnmaskRequest)))
        )
    except RoundFailed as exc:
        return SecAggResult(None, str(exc), frozenset(), up, down, c_sec, s_sec)
    return SecAggResult(server.result, None, server.survivors, up, down, c_sec, s_sec)


def _by_recipient(
    replies: list[ServerMessage], clients: dict[int, SecAggClient], gone: set[int]
) -> dict[int, ServerMessage]:
    # A live client the server sent nothing to is excluded from the rest of the round.
    by = {r.recipient: r for r in replies}
    gone.update(u for u in clients if u not in by)
    return by


def _as(by: dict[int, ServerMessage], client: SecAggClient, kind: type[M]) -> M:
    msg = by[client.client_id]
    if not isinstance(msg, kind):
        raise ProtocolError(f"driver: expected {kind.__name__} for client {client.client_id}")
    return msg
