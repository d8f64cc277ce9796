"""FedBuff over buffered asynchronous LightSecAgg, without a TEE (So et al., 2021; MLSys 2022).

The aggregator runs FedBuff (Nguyen et al., AISTATS 2022, Alg. 1) on masked uploads
``y_c = q_c + z_c mod p`` in ``F_p`` (:mod:`asyncfl.secure.lightsecagg`) and never holds an
individual unmasked update. Each contribution gets the TEE buffer's integer weight

    W_c = max(1, round(alpha s(tau_c) 2^S)) * e_c

(:func:`~asyncfl.algorithms.secure_fedbuff.quantise_weight`), applied by the server to the
masked upload and, through the :class:`AggregateRequest`, by every answering user to its
coded shares: coding is linear, so the ``U`` aggregated shares decode ``sum_c W_c z_c`` and

    g = decode(sum_c W_c y_c - sum_c W_c z_c) = sum_c W_c q_c / (2^(f+S) sum_c e_c),

plain FedBuff's pseudo-gradient up to :meth:`LightSecAggFedBuff.error_bound` (the same bound
as the TEE buffer: fixed-point rounding plus ``2^-S c`` weight quantisation). Buffers may
hold updates of different base versions; each has its own fresh mask.

Event shape: :meth:`on_masked_update` buffers; when ``K`` are in, the buffer is closed and
its :class:`AggregateRequest` is queued (:meth:`take_request`) for the driver to send to
users; :meth:`on_aggregate_share` feeds answers and steps once ``U`` arrived. If too few
users answer, :meth:`abandon` discards the buffer (nothing partial is ever unmasked). New
uploads keep being buffered meanwhile; staleness is against the version at arrival.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from asyncfl.algorithms.base import Aggregator, Outcome, StepInfo
from asyncfl.algorithms.fedbuff import FedBuffConfig
from asyncfl.algorithms.secure_fedbuff import quantise_weight
from asyncfl.core.server_opt import ServerOptimizer
from asyncfl.core.update import FloatVector, Update
from asyncfl.core.weights import example_weight
from asyncfl.errors import ProtocolError
from asyncfl.secure.lightsecagg.codec import FieldCodec
from asyncfl.secure.lightsecagg.messages import (
    AggregateRequest,
    AggregateShare,
    EncryptedMaskShare,
    MaskedUpload,
    MaskShares,
)
from asyncfl.secure.lightsecagg.server import LightSecAggServer

__all__ = ["LightSecAggFedBuff"]


@dataclass(frozen=True)
class _Closed:
    examples: int
    count: int


class LightSecAggFedBuff(Aggregator):
    """FedBuff (or FedAsync with ``mixing_rate``) whose secure sum is LightSecAgg.

    ``example_weighting`` must be ``equal`` or ``linear`` (integer weights in the field).
    """

    def __init__(
        self,
        cfg: FedBuffConfig,
        params: FloatVector,
        optimizer: ServerOptimizer,
        *,
        server: LightSecAggServer,
        codec: FieldCodec,
        weight_bits: int,
        mixing_rate: float = 1.0,
    ) -> None:
        super().__init__(params, optimizer)
        if cfg.example_weighting not in ("equal", "linear"):
            raise ValueError(
                f"example_weighting={cfg.example_weighting!r}: LightSecAgg needs integer "
                "example weights; use 'equal' or 'linear'"
            )
        if not 0.0 < mixing_rate <= 1.0:
            raise ValueError(f"mixing_rate={mixing_rate} must be in (0, 1]")
        if server.params.dim != self.dim:
            raise ValueError(f"server dim {server.params.dim} != model dim {self.dim}")
        if server.params.min_contributions > cfg.buffer_size:
            raise ValueError(
                f"users refuse buffers under {server.params.min_contributions} contributions, "
                f"but buffer_size is {cfg.buffer_size}"
            )
        self.cfg = cfg
        self.server = server
        self.codec = codec
        self.weight_bits = weight_bits
        self._mixing_rate = mixing_rate
        self._clients: set[int] = set()
        self._examples = 0
        self._weight = 0
        self._closed: dict[int, _Closed] = {}
        self._requests: list[AggregateRequest] = []

    @property
    def buffered(self) -> int:
        return self.server.buffered

    def has_buffered(self, client_id: int) -> bool:
        """Whether ``client_id`` has a contribution in the open buffer: another one from it
        is refused ``duplicate_client`` until that buffer closes, so a driver should not have
        it train before then."""
        return client_id in self._clients

    def error_bound(self, example_total: int) -> float:
        """Per-coordinate bound on ``|g - g_plain|`` of a step with ``example_total``."""
        scale = 1 << self.weight_bits
        return self.codec.error_bound(scale * example_total) + self.codec.clip / scale

    # -- events -------------------------------------------------------------------------------
    def on_update(self, update: Update) -> Outcome:
        raise ProtocolError(
            "LightSecAggFedBuff never accepts a plaintext update; submit a MaskedUpload "
            "(asyncfl.secure.lightsecagg.LightSecAggUser.upload) through on_masked_update"
        )

    def route(self, msg: MaskShares) -> dict[int, EncryptedMaskShare]:
        """Route a contribution's encrypted mask shares (see LightSecAggServer)."""
        return self.server.on_mask_shares(msg)

    def on_masked_update(self, up: MaskedUpload) -> Outcome:
        """Buffer one masked upload; at ``K`` close the buffer and queue its request."""
        if not 0 <= up.base_version <= self.version:
            return self._reject(
                "bad_version", f"base_version={up.base_version} outside [0, {self.version}]"
            )
        if up.num_examples < 0:
            return self._reject("bad_num_examples", f"num_examples={up.num_examples} < 0")
        s = self.version - up.base_version
        if self.cfg.max_staleness is not None and s > self.cfg.max_staleness:
            return self._reject(
                "too_stale", f"staleness {s} > max_staleness {self.cfg.max_staleness}", s
            )
        e = round(example_weight(self.cfg.example_weighting, up.num_examples))
        if e < 1:
            return self._reject("zero_weight", "an update with example weight 0 adds nothing")
        client = up.contribution.user
        if client in self._clients:
            return self._reject(
                "duplicate_client", f"client {client} already has an update in the buffer"
            )
        weight = (
            quantise_weight(self._mixing_rate * self.cfg.staleness.weight(s), self.weight_bits) * e
        )
        if self._weight + weight > self.codec.max_total_weight():
            return self._reject(
                "weight_overflow",
                f"buffer weight {self._weight + weight} > {self.codec.max_total_weight()}: the "
                "sum could wrap in F_p (lower frac_bits or weight_bits)",
                s,
            )
        try:
            self.server.on_masked_upload(up, weight)
        except ProtocolError as exc:
            return self._reject("protocol", str(exc), s)
        self._clients.add(client)
        self._examples += e
        self._weight += weight
        w = weight / (1 << self.weight_bits)
        if self.server.buffered >= self.cfg.buffer_size:
            req = self.server.close_buffer()
            self._closed[req.buffer_id] = _Closed(self._examples, len(req.contributions))
            self._requests.append(req)
            self._clients.clear()
            self._examples = 0
            self._weight = 0
        return Outcome(True, s, w)

    def take_request(self) -> AggregateRequest | None:
        """The oldest closed buffer's request not yet handed to the driver, if any."""
        return self._requests.pop(0) if self._requests else None

    def on_aggregate_share(self, msg: AggregateShare) -> Outcome | None:
        """Feed one user's aggregated share; the step's Outcome once ``U`` arrived."""
        res = self.server.on_aggregate_share(msg)
        if res is None:
            return None
        closed = self._closed.pop(res.buffer_id)
        # The only unmasked vector the server ever holds: this sum of >= K contributions.
        pseudo_grad = self.codec.decode_sum(res.total, (1 << self.weight_bits) * closed.examples)
        self._params = self._optimizer.step(self._params, pseudo_grad)
        self._version += 1
        step = StepInfo(
            version=self._version,
            num_updates=closed.count,
            total_weight=float(closed.examples),
            pseudo_grad_norm=float(np.linalg.norm(pseudo_grad.astype(np.float64))),
        )
        return Outcome(True, step=step)

    def abandon(self, buffer_id: int) -> Outcome:
        """Too few users answered: discard the buffer (counted in ``discarded``)."""
        n = self.server.abandon(buffer_id)
        self._closed.pop(buffer_id, None)
        return Outcome(True, reason="unmask_failed", discarded=n)
