"""Round configuration and stage names of the SecAgg protocol (Bonawitz et al., CCS 2017).

One :class:`SecAggConfig` describes one aggregation round ("session"): who takes part, the
public communication graph (complete for SecAgg, sparse for SecAgg+, Bell et al. CCS 2020),
the Shamir threshold and the ring. Clients and server must hold the same config.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType

import numpy as np

from asyncfl.errors import ConfigError, ConfigProblem
from asyncfl.secure.ring import MAX_RING_BITS, MIN_RING_BITS, Ring
from asyncfl.secure.secagg.graph import SecAggPlusParams, complete_graph, harary_graph

__all__ = ["SESSION_BYTES", "SecAggConfig", "Stage"]

SESSION_BYTES = 16


class Stage(Enum):
    """The four rounds of the semi-honest protocol (Bonawitz et al., Fig. 4, rounds 0–3)."""

    ADVERTISE_KEYS = 0
    SHARE_KEYS = 1
    MASKED_INPUT = 2
    UNMASKING = 3


@dataclass(frozen=True)
class SecAggConfig:
    """Public parameters of one round; ``graph[u]`` are u's neighbours (never u itself)."""

    session_id: bytes
    vector_length: int
    threshold: int
    graph: Mapping[int, frozenset[int]] = field(repr=False)
    ring_bits: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "graph", MappingProxyType(dict(self.graph)))
        problems = []
        if len(self.session_id) != SESSION_BYTES:
            problems.append(
                ConfigProblem("session_id", self.session_id.hex(), f"{SESSION_BYTES} bytes")
            )
        if self.vector_length < 1:
            problems.append(ConfigProblem("vector_length", self.vector_length, "an int >= 1"))
        if not MIN_RING_BITS <= self.ring_bits <= MAX_RING_BITS:
            problems.append(
                ConfigProblem("ring_bits", self.ring_bits, f"in [{MIN_RING_BITS}, {MAX_RING_BITS}]")
            )
        ids = set(self.graph)
        if not ids:
            problems.append(ConfigProblem("graph", "{}", "at least one client"))
        if any(u < 0 or u >= 2**63 for u in ids):
            problems.append(ConfigProblem("graph", sorted(ids)[:5], "client ids in [0, 2^63)"))
        for u, nbrs in self.graph.items():
            if u in nbrs or not nbrs <= ids or any(u not in self.graph[v] for v in nbrs):
                problems.append(
                    ConfigProblem(f"graph[{u}]", sorted(nbrs)[:8], "symmetric, no self-loop")
                )
                break
        if ids:
            smallest = min(len(n) + 1 for n in self.graph.values())
            if not 1 <= self.threshold <= smallest:
                problems.append(
                    ConfigProblem(
                        "threshold",
                        self.threshold,
                        f"in [1, {smallest}] (the smallest neighbourhood incl. the client)",
                    )
                )
        if problems:
            raise ConfigError(problems)

    @property
    def ring(self) -> Ring:
        return Ring(self.ring_bits)

    @property
    def clients(self) -> frozenset[int]:
        return frozenset(self.graph)

    def holders(self, u: int) -> frozenset[int]:
        """Clients holding shares of u's secrets: its neighbours and itself."""
        return self.graph[u] | {u}

    @classmethod
    def secagg(
        cls,
        client_ids: Iterable[int],
        vector_length: int,
        threshold: int | None = None,
        ring_bits: int = 32,
        session_id: bytes | None = None,
    ) -> SecAggConfig:
        """All-to-all SecAgg; default threshold ``floor(n/2) + 1`` (an honest-majority split)."""
        graph = complete_graph(client_ids)
        t = len(graph) // 2 + 1 if threshold is None else threshold
        sid = os.urandom(SESSION_BYTES) if session_id is None else session_id
        return cls(sid, vector_length, t, graph, ring_bits)

    @classmethod
    def secagg_plus(
        cls,
        client_ids: Iterable[int],
        vector_length: int,
        params: SecAggPlusParams,
        rng: np.random.Generator,
        ring_bits: int = 32,
        session_id: bytes | None = None,
    ) -> SecAggConfig:
        """SecAgg+ on a random Harary graph of ``params.degree`` (see ``graph.py``)."""
        ids = list(client_ids)
        graph = complete_graph(ids) if params.complete else harary_graph(ids, params.degree, rng)
        sid = os.urandom(SESSION_BYTES) if session_id is None else session_id
        return cls(sid, vector_length, params.threshold, graph, ring_bits)
