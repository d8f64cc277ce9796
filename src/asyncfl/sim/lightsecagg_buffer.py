"""Asynchronous FedBuff/FedAsync through LightSecAgg in the simulator (no TEE; So et al.).

Every client of the population is a user of one LightSecAgg group (``N`` = number of
clients; ``T`` and ``U`` from ``lightsecagg_privacy_fraction`` / ``_survivor_fraction``).
Each finishing client plays the device side: fixed-point encode into ``F_p``, draw a fresh
mask, Lagrange-code and encrypt its shares to the other users (routed by the aggregator),
upload ``x + z``. The aggregator (:class:`~asyncfl.algorithms.lightsecagg_fedbuff.
LightSecAggFedBuff`) sees only masked uploads, encrypted shares and aggregated shares; when a
buffer closes, every user is asked for its aggregated share and each fails to answer with
``stage_dropout_prob``; fewer than ``U`` answers discard the buffer.

Modelling choices (docs/security.md): the protocol's compute and bytes are recorded, not added
to simulated time; all ``N`` users are assumed reachable for share delivery (store and
forward) and only the unmasking answer may drop; fixed-point rounding and dropouts use the
run's seeded generator while keys, masks and padding come from the OS CSPRNG (masks cancel,
so a run stays reproducible).
"""

from __future__ import annotations

import time

import numpy as np

from asyncfl.algorithms.base import Outcome
from asyncfl.algorithms.fedbuff import FedBuffConfig
from asyncfl.algorithms.lightsecagg_fedbuff import LightSecAggFedBuff
from asyncfl.core.server_opt import ServerOptimizer
from asyncfl.core.update import FloatVector, Update
from asyncfl.errors import ConfigError, ConfigProblem, ProtocolError
from asyncfl.secure.lightsecagg import (
    FieldCodec,
    LightSecAggGroup,
    LightSecAggParams,
    LightSecAggServer,
)
from asyncfl.sim.secure_rounds import SecureAggregationConfig

__all__ = ["LightSecAggRunner", "build_lightsecagg_aggregator"]


def build_lightsecagg_aggregator(
    cfg: SecureAggregationConfig,
    alg: FedBuffConfig,
    params: FloatVector,
    optimizer: ServerOptimizer,
    *,
    num_users: int,
    max_example_weight: int,
    mixing_rate: float = 1.0,
    session_id: bytes = b"asyncfl/sim/lsa",
    seed: int | None = None,
) -> tuple[LightSecAggFedBuff, LightSecAggRunner]:
    """The aggregator (server side) and the users' side of one group of ``num_users``.

    ``seed`` makes keys and masks reproducible (insecure; tests only). Raises
    :class:`ConfigError` if ``K`` contributions of the largest weight could wrap in ``F_p``.
    """
    dim = int(params.shape[0])
    codec = FieldCodec(clip=cfg.clip, frac_bits=cfg.frac_bits)
    max_weight = (1 << cfg.weight_bits) * max(max_example_weight, 1)
    if alg.buffer_size * max_weight > codec.max_total_weight():
        raise ConfigError(
            [
                ConfigProblem(
                    "secure_aggregation.frac_bits",
                    cfg.frac_bits,
                    f"K={alg.buffer_size} contributions of weight {max_weight} (2^weight_bits x "
                    f"largest example weight) within the field's budget "
                    f"{codec.max_total_weight()} (p = 2^32 - 5); lower frac_bits, weight_bits "
                    "or clip",
                )
            ]
        )
    lsa = LightSecAggParams.from_fractions(
        num_users,
        cfg.lightsecagg_privacy_fraction,
        cfg.lightsecagg_survivor_fraction,
        dim,
        min_contributions=alg.buffer_size,
    )
    server = LightSecAggServer(lsa, session_id)
    agg = LightSecAggFedBuff(
        alg,
        params,
        optimizer,
        server=server,
        codec=codec,
        weight_bits=cfg.weight_bits,
        mixing_rate=mixing_rate,
    )
    group = LightSecAggGroup(server, seed=seed)
    return agg, LightSecAggRunner(agg, group, cfg.stage_dropout_prob)


class LightSecAggRunner:
    """Runs the users' side of each upload and of each unmasking; the same hooks as the TEE
    runner (``submit``, ``summary``, ``close``)."""

    def __init__(
        self, agg: LightSecAggFedBuff, group: LightSecAggGroup, dropout_prob: float
    ) -> None:
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"dropout_prob={dropout_prob} must be in [0, 1)")
        self.agg = agg
        self.group = group
        self.dropout_prob = dropout_prob
        self.max_error_bound = 0.0
        self.protocol_dropouts = 0

    def submit(self, update: Update, rng: np.random.Generator) -> Outcome:
        if update.delta.shape != (self.agg.dim,):
            return Outcome(
                accepted=False,
                reason="bad_shape",
                detail=f"delta shape {update.delta.shape}, model ({self.agg.dim},)",
            )
        try:
            x = self.agg.codec.encode(update.delta, rng)
        except ValueError as exc:
            return Outcome(accepted=False, reason="bad_update", detail=str(exc))
        up = self.group.contribute(
            update.client_id,
            x,
            base_version=update.base_version,
            num_examples=update.num_examples,
        )
        t0 = time.perf_counter()
        out = self.agg.on_masked_update(up)
        self.group.stats.add_server("accumulate", time.perf_counter() - t0)
        req = self.agg.take_request()
        if req is None:
            return out
        n = self.group.params.num_users
        answering = [j for j in range(n) if rng.random() >= self.dropout_prob]
        self.protocol_dropouts += n - len(answering)
        try:
            done = self.group.collect(req, answering, self.agg.on_aggregate_share)
        except ProtocolError:  # cannot happen with honest users; never step on a bad decode
            done = None
        if done is None:
            failed = self.agg.abandon(req.buffer_id)
            return Outcome(True, out.staleness, out.weight, discarded=failed.discarded)
        step = done.step
        assert step is not None
        self.max_error_bound = max(
            self.max_error_bound, self.agg.error_bound(round(step.total_weight))
        )
        return Outcome(True, out.staleness, out.weight, step=step)

    def summary(self) -> dict[str, object]:
        st = self.group.stats
        prm = self.group.params
        n = max(st.contributions, 1)
        return {
            "mode": "lightsecagg",
            "users": prm.num_users,
            "privacy_threshold": prm.privacy_threshold,
            "target_survivors": prm.target_survivors,
            "uploads": st.contributions,
            "releases": st.unmaskings,
            "failed_unmaskings": st.failed_unmaskings,
            "protocol_dropouts": self.protocol_dropouts,
            "bytes_up_per_update": st.bytes_up / n,
            "bytes_down_per_update": st.bytes_down / n,
            "user_seconds_per_update_by_stage": {k: v / n for k, v in st.user_seconds.items()},
            "server_seconds_by_stage": dict(st.server_seconds),
            "decode_error_bound": self.max_error_bound,
        }

    def close(self) -> None:
        """Nothing to stop (no subprocess); present for the simulator's runner interface."""
