"""FedBuff over a secure buffer in a TEE (Papaya, Huba et al., MLSys 2022, §5).

The aggregator runs FedBuff (Nguyen et al., AISTATS 2022, Alg. 1) on masked fixed-point
uploads ``y_i = q_i + m_i mod 2^k`` and never holds an individual unmasked update:

    A = sum_i W_i y_i,        W_i = max(1, round(alpha s(tau_i) 2^S)) * e_i

where ``s(tau_i)`` is the staleness weight of the update's ``base_version``, ``alpha`` the
FedAsync mixing rate (1 for FedBuff), ``e_i`` the integer example weight and ``S`` the weight
bits. Each contribution is registered with the enclave under the same ``W_i``; after ``K`` of
them the enclave releases ``-sum_i W_i m_i (+ noise)`` and the pseudo-gradient is

    g = decode(A - sum_i W_i m_i) = sum_i W_i q_i / (2^(f+S) sum_i e_i),

which is plain FedBuff's ``sum_i s(tau_i) e_i delta_i / sum_i e_i`` (denominator K with equal
example weights) up to the error bound of :meth:`SecureFedBuff.error_bound`:
``|g - g_plain| <= codec.error_bound(2^S E) + 2^-S c`` per coordinate (fixed-point rounding,
plus quantising each weight to a multiple of 2^-S: ``|W_i/2^S - alpha s e_i| <= 2^-S e_i``
including the clamp to >= 1, times ``|x_i| <= c``, averaged over ``E = sum e_i``).

Enclave restarts: a reply from a new enclave boot (epoch) means the masks of everything
buffered are gone; the masked sum is discarded (counted in ``Outcome.discarded``) and the run
continues with the new boot's report. Nothing partial is ever unmasked.

Differential privacy (``dp``): clients clip their updates to L2 norm ``C`` on the device and
the enclave adds ``N(0, sigma^2)`` (``sigma = z C'``, see
:func:`~asyncfl.secure.tee.enclave.dp_noise_std`) to every release, so the server only ever
holds noised sums. The pseudo-gradient then divides by the FIXED denominator ``D`` (the
buffer size K, DP-FedAvg's fixed-denominator estimator), not the realised weight:
``g = (sum_i W_i q_i + noise) / (2^(f+S) D)``. The accountant is consulted before a release
(the step that would exceed the budget raises :class:`PrivacyBudgetExceeded` before the
update that would trigger it is registered) and records one release after it. A release
whose ``noise_std`` is not the configured one is never used (the buffer is discarded).

Cost per arrival: the aggregator multiply-adds the masked upload into its accumulator (in
cache-sized chunks, so the product never exists at full size; a plain add when the integer
weight is 1) while the enclave opens the seed (:meth:`EnclaveBackend.call_overlapped`); in a
ring below the storage width (2^62 in uint64) the add comes first, fused with the check that
every element is below 2^k (one pass over the upload instead of two). The add is made before
the enclave's answer and subtracted again if the enclave refuses: ring arithmetic is exactly
invertible, so a refused upload still leaves the accumulator unchanged. The enclave expands
and adds the mask after it has answered, on its own core when it runs in its own process, so
the aggregator waits per arrival only for the seed to be opened; the release waits for the
enclave's queued mask work.

Pipelining (``pipeline > 0``): the aggregator does not wait for the enclave's answer at all;
up to ``pipeline`` registrations may be unanswered while arrivals go on, and all answers are
in before a release (:meth:`EnclaveBackend.submit`). An arrival is then accepted
*provisionally*: its ``Outcome`` is ``accepted`` unless its own answer is already known to be
a refusal. An upload the enclave refuses later (an unopenable seal, a replayed update id) is
subtracted from the masked sum again, counted in ``rejected`` and reported as ``discarded``
by the event that learns of it; it never enters a release, and K counts confirmed
contributions only. Until its answer is in, the aggregator keeps a reference to the masked
vector (at most ``pipeline`` of them; the caller must not modify it). Use it where a
provisional acceptance is acceptable (the simulator, benchmarks); a driver that acknowledges
each upload durably (the service's ledger) needs the default, ``pipeline = 0``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from asyncfl.algorithms.base import Aggregator, Outcome, StepInfo
from asyncfl.algorithms.fedbuff import FedBuffConfig
from asyncfl.core.server_opt import ServerOptimizer
from asyncfl.core.update import FloatVector, Update
from asyncfl.core.weights import example_weight
from asyncfl.errors import ProtocolError
from asyncfl.secure.fixedpoint import FixedPointCodec
from asyncfl.secure.ring import RingVector
from asyncfl.secure.tee.backends import EnclaveBackend
from asyncfl.secure.tee.client import MaskedUpdate
from asyncfl.secure.tee.messages import (
    AttestationReport,
    DiscardRequest,
    RefusalCode,
    Refused,
    Registered,
    RegisterRequest,
    Released,
    ReleaseRequest,
    ReportRequest,
    ReportResponse,
    Response,
)

__all__ = ["ReleaseAccounting", "SecureFedBuff", "quantise_weight"]

# Elements per multiply-add chunk: the weighted chunk (<= 2 MiB) stays in the cache between
# the multiply and the add (measured ~1.2-1.5x faster than whole-vector passes at 1M).
_CHUNK = 1 << 18


@dataclass
class _Settled:
    """What settling the enclave's answers found."""

    own: Refused | None = None
    """The newest upload's refusal: its Outcome is a rejection."""
    discarded: int = 0
    """Provisionally buffered uploads thrown away (refused later, or the buffer dropped)."""
    mismatch: bool = False


@dataclass(frozen=True, eq=False)
class _InFlight:
    """A provisionally buffered upload whose registration the enclave has not answered yet."""

    update_id: bytes
    client_id: int
    examples: int
    weight: int
    w_ring: np.unsignedinteger
    masked: RingVector
    staleness: int


class ReleaseAccounting(Protocol):
    """DP bookkeeping of releases noised by the enclave (:class:`asyncfl.sim.dp.DPMechanism`)."""

    @property
    def fixed_denominator(self) -> float:
        """D of the noised mean: the buffer size K (1 for FedAsync), fixed in advance."""
        ...

    def check_budget(self) -> None:
        """Raise :class:`~asyncfl.errors.PrivacyBudgetExceeded` if one more release would."""
        ...

    def record_release(self) -> None:
        """Account one noised release (one step)."""
        ...


_REASONS = {
    RefusalCode.MALFORMED: "malformed",
    RefusalCode.STALE_EPOCH: "stale_epoch",
    RefusalCode.BAD_WEIGHT: "bad_weight",
    RefusalCode.DUPLICATE: "duplicate",
    RefusalCode.REPLAYED: "replayed",
    RefusalCode.BAD_SEAL: "bad_seal",
    RefusalCode.BELOW_THRESHOLD: "below_threshold",
    RefusalCode.MISMATCH: "mismatch",
}


def _nothing() -> None:
    pass


def quantise_weight(weight: float, bits: int) -> int:
    """``max(1, round(weight 2^bits))`` for a weight in [0, 1]: never zero, so every
    registered contribution really contributes (a zero weight would count towards K for free;
    a staleness weight underflowing to 0 is clamped to the smallest, 2^-bits)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight={weight} must be in [0, 1]")
    return max(1, round(weight * (1 << bits)))


class SecureFedBuff(Aggregator):
    """FedBuff (or FedAsync with ``mixing_rate``) whose buffer is masked and unmasked by a TEE.

    ``example_weighting`` must be ``equal`` or ``linear`` (integer weights in the ring).
    """

    def __init__(
        self,
        cfg: FedBuffConfig,
        params: FloatVector,
        optimizer: ServerOptimizer,
        *,
        backend: EnclaveBackend,
        codec: FixedPointCodec,
        weight_bits: int,
        mixing_rate: float = 1.0,
        dp: ReleaseAccounting | None = None,
        dp_noise_std: float = 0.0,
        before_release: Callable[[], None] | None = None,
        pipeline: int = 0,
    ) -> None:
        """``before_release`` runs before every release request (the service makes a note of
        the coming release durable there: a release the server saw must be accounted even if
        the server dies before its step commits). ``pipeline``: how many registrations may
        be unanswered (0: wait for each; see the module docstring)."""
        super().__init__(params, optimizer)
        if pipeline < 0:
            raise ValueError(f"pipeline={pipeline} must be >= 0")
        if dp is not None:
            if not dp_noise_std > 0:
                raise ValueError(
                    f"dp_noise_std={dp_noise_std}: with dp the enclave must add noise (> 0)"
                )
            denominator = dp.fixed_denominator
            if denominator != round(denominator) or denominator < 1:
                raise ValueError(f"fixed denominator {denominator} must be an integer >= 1")
        if cfg.example_weighting not in ("equal", "linear"):
            raise ValueError(
                f"example_weighting={cfg.example_weighting!r}: the secure buffer needs integer "
                "example weights; use 'equal' or 'linear'"
            )
        if not 0.0 < mixing_rate <= 1.0:
            raise ValueError(f"mixing_rate={mixing_rate} must be in (0, 1]")
        self.cfg = cfg
        self.codec = codec
        self.weight_bits = weight_bits
        self._mixing_rate = mixing_rate
        self._backend = backend
        self._dp = dp
        self._dp_noise_std = dp_noise_std
        self._before_release = before_release
        self._ring = codec.ring
        self._acc = self._ring.zeros(self.dim)
        self._scratch = self._ring.zeros(min(self.dim, _CHUNK))
        self._ids: list[bytes] = []
        self._clients: set[int] = set()
        self._pipeline = pipeline
        self._inflight: deque[_InFlight] = deque()
        self._int_examples = 0
        self._int_weight = 0
        self.enclave_restarts = 0
        self._report = self._fetch_report()
        self._epoch = self._report.epoch

    # -- what clients and observers may see ------------------------------------------------
    @property
    def report(self) -> AttestationReport:
        """The current enclave's attestation report, relayed to clients."""
        return self._report

    @property
    def buffered(self) -> int:
        return len(self._ids) + len(self._inflight)

    def has_buffered(self, client_id: int) -> bool:
        """Whether ``client_id`` has a contribution in the unreleased buffer (pipelined ones
        included): another one from it is refused ``duplicate_client`` until the release, so
        a driver should not have it train before then."""
        return client_id in self._clients

    @property
    def masked_sum(self) -> RingVector:
        """``sum_i W_i y_i`` of the buffer (read-only view): all the server holds."""
        view = self._acc.view()
        view.flags.writeable = False
        return view

    def error_bound(self, example_total: int) -> float:
        """Per-coordinate bound on ``|g - g_plain|`` of a step with ``example_total`` (see
        the module docstring)."""
        scale = 1 << self.weight_bits
        return self.codec.error_bound(scale * example_total) + self.codec.clip / scale

    # -- events -------------------------------------------------------------------------------
    def on_update(self, update: Update) -> Outcome:
        raise ProtocolError(
            "SecureFedBuff never accepts a plaintext update; submit a MaskedUpdate "
            "(asyncfl.secure.tee.TeeClient.upload) through on_masked_update"
        )

    def on_masked_update(self, up: MaskedUpdate) -> Outcome:
        """Buffer one masked upload; at ``K`` ask the enclave to release and step."""
        try:
            # The range of the elements (rings below 2^32 / 2^64) is checked in the pass that
            # adds them, below: one pass over the upload instead of two.
            self._ring.check(up.masked, self.dim, values=False)
        except ValueError as exc:
            return self._reject("bad_shape", str(exc))
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
        if up.client_id in self._clients:
            return self._reject(
                "duplicate_client", f"client {up.client_id} already has an update in the buffer"
            )
        if self._dp is not None and self.buffered + 1 >= self.cfg.buffer_size:
            self._dp.check_budget()  # raises before anything is registered
        w_int = quantise_weight(self._mixing_rate * self.cfg.staleness.weight(s), self.weight_bits)
        weight = w_int * e
        # Products wrap in the dtype (2^k divides its modulus), so the weight is taken mod it.
        w_ring = self._acc.dtype.type(weight % (1 << (8 * self._acc.dtype.itemsize)))
        # A ring below the storage width: its range check is fused with the add, made now
        # (before the enclave is asked), and undone if the enclave refuses.
        mirrored = not self._ring.native
        if mirrored and not self._add_in_range(up.masked, weight, w_ring):
            return self._reject(
                "bad_shape", f"masked vector has elements >= 2^{self._ring.bits}; reduce it first"
            )
        if self._pipeline:
            item = _InFlight(up.sealed.update_id, up.client_id, e, weight, w_ring, up.masked, s)
            return self._pipelined(item, up, added=mirrored)

        def mirror() -> None:
            # Speculative: runs while the enclave validates; undone below unless registered.
            nonlocal mirrored
            self._multiply_add(up.masked, weight, w_ring, np.add)
            mirrored = True

        req = RegisterRequest(up.epoch, up.client_id, up.base_version, weight, up.sealed)
        try:
            resp = self._backend.call_overlapped(req, _nothing if mirrored else mirror)
        except BaseException:
            if mirrored:
                self._unmirror(up.masked, weight, w_ring)
            raise
        if mirrored and not isinstance(resp, Registered):
            self._unmirror(up.masked, weight, w_ring)
        discarded = self._follow_epoch(resp)
        if isinstance(resp, Refused):
            out = self._reject(_REASONS[resp.code], resp.detail, s)
            return Outcome(False, s, reason=out.reason, detail=out.detail, discarded=discarded)
        if not isinstance(resp, Registered):
            raise ProtocolError(f"enclave answered a registration with {type(resp).__name__}")
        self._ids.append(up.sealed.update_id)
        self._clients.add(up.client_id)
        self._int_examples += e
        self._int_weight += weight
        w = weight / (1 << self.weight_bits)
        if resp.count != len(self._ids):
            # Out of sync (cannot happen with an honest enclave): start both buffers afresh.
            return Outcome(True, s, w, reason="mismatch", discarded=discarded + self._resync())
        if len(self._ids) < self.cfg.buffer_size:
            return Outcome(True, s, w, discarded=discarded)
        step, lost = self._release()
        return Outcome(True, s, w, step=step, discarded=discarded + lost)

    # -- pipelined registrations ---------------------------------------------------------------
    def _pipelined(self, item: _InFlight, up: MaskedUpdate, *, added: bool) -> Outcome:
        """Submit the registration, add the masked upload (unless ``added``), and settle the
        answers that are in (all of them once the buffer holds K)."""
        s = item.staleness
        req = RegisterRequest(up.epoch, up.client_id, up.base_version, item.weight, up.sealed)
        try:
            self._backend.submit(req)
        except BaseException:
            if added:
                self._unmirror(item.masked, item.weight, item.w_ring)
            raise
        # Provisionally in the buffer from here on (subtracted again if the enclave refuses).
        if not added:
            self._multiply_add(item.masked, item.weight, item.w_ring, np.add)
        self._inflight.append(item)
        self._clients.add(item.client_id)
        full = self.buffered >= self.cfg.buffer_size
        got = self._settle(0 if full else self._pipeline, item)
        w = item.weight / (1 << self.weight_bits)
        if got.mismatch:
            return Outcome(True, s, w, reason="mismatch", discarded=got.discarded)
        if got.own is not None:
            out = self._reject(_REASONS[got.own.code], got.own.detail, s)
            return Outcome(False, s, reason=out.reason, detail=out.detail, discarded=got.discarded)
        if not full or len(self._ids) < self.cfg.buffer_size:
            return Outcome(True, s, w, discarded=got.discarded)
        step, lost = self._release()
        return Outcome(True, s, w, step=step, discarded=got.discarded + lost)

    def _settle(self, keep: int, current: _InFlight) -> _Settled:
        """Receive answers in order until at most ``keep`` are outstanding, then those already
        here. ``current`` (the newest upload) is always answered last."""
        got = _Settled()
        while self._inflight:
            resp = self._backend.receive(wait=len(self._inflight) > keep)
            if resp is None:
                break
            item = self._inflight[0]
            epoch = getattr(resp, "epoch", self._epoch)
            if epoch != self._epoch:
                # A new enclave boot: the masks of everything buffered are gone. ``current``
                # is still in flight (answers come in order), so it is refused, not discarded.
                own = resp if item is current and isinstance(resp, Refused) else None
                got.discarded += self._abandon(resp) - 1
                got.own = own or Refused(
                    epoch, RefusalCode.STALE_EPOCH, "the enclave restarted; buffer discarded"
                )
                return got
            if isinstance(resp, Registered) and resp.count != len(self._ids) + 1:
                # Out of sync (cannot happen with an honest enclave): start both afresh.
                got.discarded += self._abandon(None)
                got.mismatch = True
                return got
            self._inflight.popleft()
            if isinstance(resp, Registered):
                self._ids.append(item.update_id)
                self._int_examples += item.examples
                self._int_weight += item.weight
                continue
            if not isinstance(resp, Refused):
                raise ProtocolError(f"enclave answered a registration with {type(resp).__name__}")
            self._unmirror(item.masked, item.weight, item.w_ring)
            self._clients.discard(item.client_id)
            if item is current:
                got.own = resp
            else:  # provisionally accepted earlier: now rejected and thrown out of the buffer
                self._reject(_REASONS[resp.code], resp.detail, item.staleness)
                got.discarded += 1
        return got

    def _abandon(self, new_boot: Response | None) -> int:
        """Drop the whole buffer (confirmed and in flight) in both parties; return its size.

        ``new_boot``: an answer from a new enclave epoch (else the buffers are out of sync).
        The answers still outstanding are read and ignored, and the enclave is told to
        discard whatever it registered (some of them may be registrations of the new boot)."""
        n = len(self._ids) + len(self._inflight)
        while self._backend.outstanding:
            self._backend.receive()
        if new_boot is not None:
            self._follow_epoch(new_boot)
        self._resync()
        return n

    # -- internals ----------------------------------------------------------------------------
    def _multiply_add(
        self,
        masked: RingVector,
        weight: int,
        w_ring: np.unsignedinteger,
        op: np.ufunc,
        acc: RingVector | None = None,
    ) -> None:
        """``acc op= w masked`` (``op`` is ``np.add`` or ``np.subtract``; ``acc`` the masked
        sum, or a slice of it matching ``masked``), wrapping in the dtype."""
        acc = self._acc if acc is None else acc
        if weight == 1:
            op(acc, masked, out=acc)
            return
        for start in range(0, masked.shape[0], _CHUNK):
            stop = min(start + _CHUNK, masked.shape[0])
            part = self._scratch[: stop - start]
            np.multiply(masked[start:stop], w_ring, out=part)
            dest = acc[start:stop]
            op(dest, part, out=dest)

    def _add_in_range(self, masked: RingVector, weight: int, w_ring: np.unsignedinteger) -> bool:
        """``acc += w masked`` if every element of ``masked`` is below ``2^k``, chunk by chunk
        (each chunk's range is checked while it is in the cache); else leave ``acc`` as it
        was and return False."""
        acc, top = self._acc, self._ring.mask
        for start in range(0, self.dim, _CHUNK):
            stop = min(start + _CHUNK, self.dim)
            src = masked[start:stop]
            if int(src.max()) > top:
                # Undo the chunks already added: ring arithmetic is exactly invertible.
                done = slice(0, start)
                self._multiply_add(masked[done], weight, w_ring, np.subtract, acc[done])
                return False
            dest = acc[start:stop]
            if weight == 1:
                np.add(dest, src, out=dest)
            else:
                part = self._scratch[: stop - start]
                np.multiply(src, w_ring, out=part)
                np.add(dest, part, out=dest)
        return True

    def _unmirror(self, masked: RingVector, weight: int, w_ring: np.unsignedinteger) -> None:
        """Undo the speculative add of a contribution the enclave did not register."""
        self._multiply_add(masked, weight, w_ring, np.subtract)

    def _fetch_report(self) -> AttestationReport:
        resp = self._backend.call(ReportRequest())
        if not isinstance(resp, ReportResponse):
            raise ProtocolError(f"enclave answered a report request with {type(resp).__name__}")
        return resp.report

    def _follow_epoch(self, resp: Response) -> int:
        """If ``resp`` comes from a new enclave boot, drop the masked buffer; return its size."""
        epoch = getattr(resp, "epoch", self._epoch)
        if epoch == self._epoch:
            return 0
        self.enclave_restarts += 1
        n = self._clear()
        self._report = self._fetch_report()
        self._epoch = self._report.epoch
        return n

    def _clear(self) -> int:
        n = len(self._ids) + len(self._inflight)
        self._acc.fill(0)
        self._ids.clear()
        self._inflight.clear()
        self._clients.clear()
        self._int_examples = 0
        self._int_weight = 0
        return n

    def _resync(self) -> int:
        self._backend.call(DiscardRequest(self._epoch))
        return self._clear()

    def _release(self) -> tuple[StepInfo | None, int]:
        if self._before_release is not None:
            self._before_release()
        resp = self._backend.call(ReleaseRequest(self._epoch, tuple(self._ids)))
        lost = self._follow_epoch(resp)
        if lost:
            return None, lost
        if isinstance(resp, Refused) and resp.code is RefusalCode.BELOW_THRESHOLD:
            return None, 0  # keep buffering until the enclave's K distinct contributions
        if (
            not isinstance(resp, Released)
            or resp.count != len(self._ids)
            or resp.total_weight != self._int_weight
        ):
            return None, self._resync()
        if self._dp is not None:
            # Released, so accounted (conservatively even if it is not used below).
            self._dp.record_release()
            if resp.noise_std != self._dp_noise_std:
                # An enclave that did not add the configured noise: never use its release.
                return None, self._resync()
        self._ring.check(resp.unmask, self.dim)
        # The only unmasked vector the server ever holds is this sum of >= K contributions
        # (noised by the enclave under DP). Unmasked in place: _clear() zeroes it next.
        ring_sum = self._ring.reduce(np.add(self._acc, resp.unmask, out=self._acc))
        examples = self._int_examples
        # Under DP the FIXED denominator, never the realised weight (see the module docstring).
        denominator = examples if self._dp is None else round(self._dp.fixed_denominator)
        pseudo_grad = self.codec.decode_sum(ring_sum, (1 << self.weight_bits) * denominator)
        count = self._clear()
        self._params = self._optimizer.step(self._params, pseudo_grad)
        self._version += 1
        return StepInfo(
            version=self._version,
            num_updates=count,
            total_weight=float(examples),
            pseudo_grad_norm=float(np.linalg.norm(pseudo_grad.astype(np.float64))),
        ), 0
