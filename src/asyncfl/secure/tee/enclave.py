"""The secure buffer: FedBuff's mask accumulator inside a TEE (Papaya, Huba et al. 2022, §5).

Clients upload ``y_i = q_i + m_i`` to the untrusted aggregator, where ``q_i`` is the
fixed-point update and ``m_i = PRG(seed_i)`` a one-time mask, and seal ``seed_i`` to this
enclave. The aggregator accumulates ``sum_i w_i y_i`` with integer weights ``w_i`` and
registers each contribution here with the same ``w_i``; the enclave accumulates
``M = sum_i w_i m_i`` as contributions arrive (O(model size) memory, not O(K x model size)).
Once at least ``K`` distinct contributions are registered and the aggregator names exactly
that set, it releases ``-M (+ noise)``, and the aggregator obtains ``sum_i w_i q_i (+ noise)``.

Invariants this program enforces (each refusal leaves its state unchanged):
- a release covers at least ``K = min_contributions`` contributions of distinct clients,
  and exactly the set the aggregator names (never a partial or different sum);
- every update id is registered at most once per boot, so no mask is ever part of two
  releases (two releases differing by one contribution would reveal it);
- weights are integers in ``[1, max_weight]``; a zero weight would let a contribution count
  towards K while contributing nothing;
- a restart draws a new key pair and epoch and starts with an empty buffer: seeds sealed to
  the previous boot no longer open, and the previous buffer's masks are never released.

Cost: per arrival the enclave opens one sealed seed and adds ``w_i PRG(seed_i)`` into its
accumulator (AES-CTR keystream scaled in place, chunk by chunk, no model-sized temporary).
The mask work is deferred: :meth:`SecureBufferEnclave.respond` answers a registration as soon
as it is validated and its seed opened, and queues ``(seed, weight)`` (32 bytes + an int per
contribution, so memory stays O(model size)). The queued work is done by
:meth:`SecureBufferEnclave.work` one chunk at a time, which an enclave in its own process
calls whenever no request is waiting (:mod:`asyncfl.secure.tee.process`): registrations are
answered within one chunk's time while masks are expanded on the enclave's own core, so
the aggregator never waits for a mask. Nothing observable changes: a registration is
committed before its answer, a release first completes all queued work, and a discard or
restart drops the queue with the buffer (its masks are never released anyway).

The optional DP hook adds ``round(N(0, sigma^2) 2^(f+S))`` in the ring to the released sum
(``sigma`` in model units, ``f`` fractional bits, ``S`` weight bits), so the server only ever
sees a noised sum. Noise is clipped at ``_NOISE_TAIL`` sigma (the truncation
:class:`~asyncfl.privacy.noise.SecureNoise` has anyway), and registrations that could make
the noised sum wrap around the ring are refused.
"""

from __future__ import annotations

import math
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from asyncfl.errors import ConfigError, ConfigProblem, CryptoError, ProtocolError
from asyncfl.secure.crypto import KeyPair
from asyncfl.secure.prg import MaskExpander
from asyncfl.secure.ring import MAX_RING_BITS, MIN_RING_BITS, Ring, RingVector
from asyncfl.secure.tee.attestation import SimulatedVendor, enclave_code, measure
from asyncfl.secure.tee.messages import (
    EPOCH_BYTES,
    AttestationReport,
    Discarded,
    DiscardRequest,
    RefusalCode,
    Refused,
    Registered,
    RegisterRequest,
    Released,
    ReleaseRequest,
    ReportRequest,
    ReportResponse,
    Request,
    Response,
    decode,
    encode_parts,
)
from asyncfl.secure.tee.sealing import SeedContext, open_seed

if TYPE_CHECKING:
    from asyncfl.privacy.noise import NoiseSource

__all__ = [
    "EnclaveConfig",
    "SecureBufferEnclave",
    "dp_noise_std",
    "enclave_config_builder",
    "fit_ring32",
    "pick_ring",
    "with_smallest_ring",
]

_DONE = object()
# SecureNoise's 64-bit uniforms bound |N(0,1)| by sqrt(128 ln 2) ~= 9.42.
_NOISE_TAIL = 9.42
_CONFIG_VERSION = 2  # 2: dp_clip_norm


@dataclass(frozen=True)
class EnclaveConfig:
    """The enclave's measured configuration: clients attest to exactly these values."""

    task: str
    dim: int
    ring_bits: int
    frac_bits: int
    clip: float
    """Per-coordinate bound c of the fixed-point codec; with the weights it bounds the sum."""
    weight_bits: int
    """S: staleness weights are quantised to multiples of 2^-S."""
    min_contributions: int
    """K: the fewest distinct contributions a release may cover."""
    max_weight: int
    """Largest integer weight of one contribution."""
    noise_std: float = 0.0
    """DP hook: std of Gaussian noise added to each released sum, in model units."""
    dp_clip_norm: float = 0.0
    """DP: the L2 norm every device clips its update to before encoding (0: no DP). The enclave
    does not use it (it never sees an update); it is measured so that a device takes the clip
    norm ``noise_std`` was calibrated to from the attested config, never from the server."""

    def __post_init__(self) -> None:
        p: list[ConfigProblem] = []
        if not self.task:
            p.append(ConfigProblem("task", self.task, "a non-empty task name"))
        if self.dim < 1:
            p.append(ConfigProblem("dim", self.dim, "an integer >= 1"))
        if not MIN_RING_BITS <= self.ring_bits <= MAX_RING_BITS:
            p.append(ConfigProblem("ring_bits", self.ring_bits, "an integer in [8, 64]"))
        if not 0 <= self.frac_bits < self.ring_bits:
            p.append(ConfigProblem("frac_bits", self.frac_bits, "in [0, ring_bits)"))
        if not (math.isfinite(self.clip) and self.clip > 0):
            p.append(ConfigProblem("clip", self.clip, "a finite number > 0"))
        if not 0 <= self.weight_bits <= 24:
            p.append(ConfigProblem("weight_bits", self.weight_bits, "an integer in [0, 24]"))
        if self.min_contributions < 1:
            p.append(ConfigProblem("min_contributions", self.min_contributions, "an int >= 1"))
        if self.max_weight < 1:
            p.append(ConfigProblem("max_weight", self.max_weight, "an integer >= 1"))
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
            p.append(ConfigProblem("noise_std", self.noise_std, "a finite number >= 0"))
        if not (math.isfinite(self.dp_clip_norm) and self.dp_clip_norm >= 0):
            p.append(ConfigProblem("dp_clip_norm", self.dp_clip_norm, "a finite number >= 0"))
        if not p and self.weight_budget() < self.min_contributions:
            p.append(
                ConfigProblem(
                    "ring_bits",
                    self.ring_bits,
                    f"enough bits for {self.min_contributions} contributions of weight 1 plus "
                    "the noise tail; raise ring_bits or lower frac_bits/clip/noise_std",
                )
            )
        if p:
            raise ConfigError(p)

    def noise_bound(self) -> int:
        """Largest magnitude of the ring noise: ``ceil(9.42 sigma 2^(f+S))``."""
        return math.ceil(_NOISE_TAIL * self.noise_std * 2.0 ** (self.frac_bits + self.weight_bits))

    def weight_budget(self) -> int:
        """Largest total weight W with ``W ceil(c 2^f) + noise bound <= 2^(k-1) - 1``."""
        room = (1 << (self.ring_bits - 1)) - 1 - self.noise_bound()
        return max(room, 0) // math.ceil(self.clip * 2.0**self.frac_bits)

    def encode(self) -> bytes:
        """Canonical bytes: what the measurement covers and what boots a subprocess enclave."""
        task = self.task.encode()
        return (
            struct.pack(">BI", _CONFIG_VERSION, len(task))
            + task
            + struct.pack(
                ">QBBdBQQdd",
                self.dim,
                self.ring_bits,
                self.frac_bits,
                self.clip,
                self.weight_bits,
                self.min_contributions,
                self.max_weight,
                self.noise_std,
                self.dp_clip_norm,
            )
        )

    @classmethod
    def decode(cls, data: bytes) -> EnclaveConfig:
        try:
            version, n = struct.unpack_from(">BI", data)
            if version != _CONFIG_VERSION:
                raise ProtocolError(f"enclave config version {version} != {_CONFIG_VERSION}")
            task = data[5 : 5 + n].decode()
            fields = struct.unpack(">QBBdBQQdd", data[5 + n :])
        except (struct.error, UnicodeDecodeError) as exc:
            raise ProtocolError(f"malformed enclave config: {exc}") from exc
        return cls(task, *fields)


def with_smallest_ring(config: EnclaveConfig) -> EnclaveConfig:
    """``config`` in the ring ``Z_{2^32}`` if that holds a full release, else ``config``.

    A full release is ``K = min_contributions`` contributions of ``max_weight`` each plus the
    noise tail; when it fits in 32 bits, every ring vector is stored as ``uint32`` (half the
    memory traffic of ``uint64`` for the masks, the masked uploads and the accumulators) and
    reduction is the dtype's own wrap-around. Decoded results are identical: no sum wraps in
    either ring. Configs already at 32 bits or below are returned unchanged.
    """
    if config.ring_bits <= 32:
        return config
    full = config.min_contributions * config.max_weight
    try:
        small = replace(config, ring_bits=32)
    except ConfigError:
        return config  # even K weight-1 contributions (or the noise tail) need more bits
    return small if small.weight_budget() >= full else config


MIN_FIT_FRAC_BITS = 16
""":func:`fit_ring32` lowers ``frac_bits`` no further than this (decoding error 2^-16 ~ 1.5e-5
per coordinate and update, unbiased)."""
MIN_FIT_WEIGHT_BITS = 8
""":func:`fit_ring32` lowers ``weight_bits`` no further than this (staleness weights in steps
of 1/256)."""


def fit_ring32(
    build: Callable[[int, int], EnclaveConfig], frac_bits: int, weight_bits: int
) -> EnclaveConfig | None:
    """The most precise config in ``Z_{2^32}`` that holds a full release, else ``None``.

    ``build(f, S)`` makes the config with ``f`` fractional bits and weight quantum ``2^-S`` in
    the 2^32 ring (the caller recomputes what depends on them: the largest weight, the DP
    noise std). Starting at the configured ``(frac_bits, weight_bits)``, one bit is taken from
    each in turn, down to :data:`MIN_FIT_FRAC_BITS` / :data:`MIN_FIT_WEIGHT_BITS` (or the
    configured values if lower), until K contributions of the largest weight plus the noise
    tail fit in 31 bits. Why: the 2^32 ring halves the masked uploads, the enclave's AES-CTR
    keystream and every pass over a ring vector against 2^62 (docs/benchmarks.md, secure
    buffer); the decoded mean stays within ``2^-f`` of the exact one, and the staleness
    weights move by at most ``2^-(S+1)``.
    """
    f, s = frac_bits, weight_bits
    lo_f, lo_s = min(MIN_FIT_FRAC_BITS, f), min(MIN_FIT_WEIGHT_BITS, s)
    take_f = True
    while True:
        try:
            ec = build(f, s)
        except ConfigError:
            ec = None  # not even K weight-1 contributions fit: lower the precision further
        if ec is not None and ec.weight_budget() >= ec.min_contributions * ec.max_weight:
            return ec
        if f <= lo_f and s <= lo_s:
            return None
        if f > lo_f and (take_f or s <= lo_s):
            f -= 1
        else:
            s -= 1
        take_f = not take_f


ConfigBuilder = Callable[[int, int, int], EnclaveConfig]
"""``(frac_bits, weight_bits, ring_bits) -> EnclaveConfig`` of one task."""


def enclave_config_builder(
    *,
    task: str,
    dim: int,
    clip: float,
    min_contributions: int,
    max_example_weight: int = 1,
    dp: tuple[float, float] | None = None,
) -> ConfigBuilder:
    """The enclave configs of one task at any precision and ring: the largest weight is
    ``2^weight_bits x max_example_weight``; with ``dp = (noise_multiplier, clip_norm)`` the
    noise std is calibrated to each ``frac_bits`` (:func:`dp_noise_std`)."""

    def make(frac_bits: int, weight_bits: int, ring_bits: int) -> EnclaveConfig:
        return EnclaveConfig(
            task=task,
            dim=dim,
            ring_bits=ring_bits,
            frac_bits=frac_bits,
            clip=clip,
            weight_bits=weight_bits,
            min_contributions=min_contributions,
            max_weight=(1 << weight_bits) * max(max_example_weight, 1),
            noise_std=0.0
            if dp is None
            else dp_noise_std(dp[0], dp[1], dim=dim, frac_bits=frac_bits),
            dp_clip_norm=0.0 if dp is None else dp[1],
        )

    return make


def pick_ring(make: ConfigBuilder, exact: EnclaveConfig, *, fit: bool) -> EnclaveConfig:
    """The config a task runs with, from its ``exact`` one (configured precision and ring,
    already checked to hold a full release): the smallest ring at that precision, or with
    ``fit`` (``tee_fit_ring32``) the most precise config in the 2^32 ring if one exists."""
    ec = with_smallest_ring(exact)
    if fit and ec.ring_bits > 32:
        fitted = fit_ring32(lambda f, s: make(f, s, 32), exact.frac_bits, exact.weight_bits)
        return fitted if fitted is not None else ec
    return ec


def dp_noise_std(noise_multiplier: float, clip_norm: float, *, dim: int, frac_bits: int) -> float:
    """Std of the enclave's Gaussian noise for user-level DP with L2 clip ``C``.

    The device clips its update to ``||x||_2 <= C``; the codec's per-coordinate clip can only
    shorten it, but stochastic rounding moves each coordinate by less than ``2^-f``, so the
    encoded update is bounded by ``C' = C + sqrt(dim) 2^-f`` (staleness weights are <= 1).
    The noise is calibrated to that sensitivity, ``z C'``, so the accountant's multiplier
    ``z`` holds for what the enclave actually sums (``C'/C - 1`` is ~6e-5 for 10^6
    parameters at f = 24).
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier={noise_multiplier!r} must be a finite number > 0")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm={clip_norm!r} must be a finite number > 0")
    return noise_multiplier * (clip_norm + math.sqrt(dim) * 2.0**-frac_bits)


class SecureBufferEnclave:
    """The enclave program as a sans-I/O state machine: bytes in, bytes out.

    ``vendor`` stands for the CPU's quoting key that signs the report at boot; ``noise``
    (default :class:`~asyncfl.privacy.noise.SecureNoise`) is used only when ``noise_std > 0``.
    ``shared_out``: a host-readable ring vector (the shared output region, see
    :mod:`~asyncfl.secure.tee.messages`) that releases are written to; the enclave never
    reads it.
    """

    def __init__(
        self,
        config: EnclaveConfig,
        vendor: SimulatedVendor,
        *,
        noise: NoiseSource | None = None,
        shared_out: RingVector | None = None,
    ) -> None:
        self.config = config
        self._ring = Ring(config.ring_bits)
        if shared_out is not None and (
            shared_out.dtype != self._ring.dtype or shared_out.shape != (config.dim,)
        ):
            raise ValueError(
                f"shared_out must be {self._ring.dtype}[{config.dim}], "
                f"got {shared_out.dtype}{list(shared_out.shape)}"
            )
        self._key = KeyPair.generate(os.urandom)
        self._epoch = os.urandom(EPOCH_BYTES)
        self._report = vendor.sign_report(
            measure(enclave_code(), config.encode()), self._key.public, self._epoch
        )
        self._noise = noise
        if config.noise_std > 0 and noise is None:
            # Imported here: the privacy package pulls in the accountants, which would slow
            # every enclave boot that does not add noise.
            from asyncfl.privacy.noise import SecureNoise

            self._noise = SecureNoise()
        self._expander = MaskExpander(self._ring, config.dim)
        # Allocated once: a fresh model-sized array costs a page fault per 4 KiB (~1000 per
        # 1M-parameter uint32 vector, milliseconds in a VM). _acc holds garbage while
        # _acc_empty is set; the next mask overwrites it instead of adding (no zeroing pass).
        self._acc = self._ring.zeros(config.dim)
        self._acc_empty = True
        # Where releases are written: the shared output region if the host gave one (the
        # frame then names it instead of carrying the vector), else private memory.
        self._shared = shared_out
        self._out = self._ring.zeros(config.dim) if shared_out is None else shared_out
        self._buffer: dict[bytes, int] = {}  # update id -> client id
        self._clients: set[int] = set()
        self._total = 0
        # Every update id registered since boot: a mask may be part of at most one release.
        self._seen: set[bytes] = set()
        # Registered (answered) contributions whose masks are not yet in _acc: (seed, weight),
        # and the chunked accumulation of the one being added now.
        self._pending: deque[tuple[bytes, int]] = deque()
        self._job: Iterator[None] | None = None

    @property
    def report(self) -> AttestationReport:
        return self._report

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def handle(self, data: bytes | bytearray | memoryview) -> bytes:
        """One request frame in, one response frame out; never raises on bad input."""
        out = self.respond(data)
        self.complete()
        return out

    @property
    def has_work(self) -> bool:
        """Whether masks of answered registrations are still to be added."""
        return self._job is not None or bool(self._pending)

    def work(self) -> bool:
        """Add one chunk of the deferred mask work; return whether any is left."""
        if self._job is None:
            if not self._pending:
                return False
            seed, weight = self._pending.popleft()
            self._job = self._expander.accumulate_steps(
                self._acc, seed, scale=weight, assign=self._acc_empty
            )
            self._acc_empty = False
        if next(self._job, _DONE) is _DONE:
            self._job = None
        return self.has_work

    def complete(self) -> None:
        """Add the masks of all registrations already answered (the deferred work)."""
        while self.work():
            pass

    def respond(self, data: bytes | bytearray | memoryview) -> bytes:
        """Like :meth:`handle`, but may leave mask work for :meth:`work`/:meth:`complete`."""
        return b"".join(self.respond_parts(data))

    def respond_parts(self, data: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
        """:meth:`respond` as the pieces of the answer frame (a release's vector not copied)."""
        try:
            req = decode(data)
        except ProtocolError as exc:
            return encode_parts(self._refuse(RefusalCode.MALFORMED, str(exc)))
        if not isinstance(req, ReportRequest | RegisterRequest | ReleaseRequest | DiscardRequest):
            return encode_parts(
                self._refuse(RefusalCode.MALFORMED, f"{type(req).__name__} is no request")
            )
        return encode_parts(self.handle_message(req), self._shared)

    def handle_message(self, req: Request) -> Response:
        """Answer one request; a registration's mask work is left to :meth:`work`.

        Only a release reads the accumulator, so only a release completes the queued work;
        every other answer depends on the committed bookkeeping alone. A :class:`Released`
        answer's vector is this enclave's output buffer: valid until its next release
        (:meth:`respond` and :meth:`respond_parts` put it in the frame before that).
        """
        if isinstance(req, ReportRequest):
            return ReportResponse(self._report)
        if req.epoch != self._epoch:
            return self._refuse(
                RefusalCode.STALE_EPOCH, "request for another enclave boot (restarted)"
            )
        if isinstance(req, RegisterRequest):
            return self._register(req)
        if isinstance(req, ReleaseRequest):
            return self._release(req)
        n = len(self._buffer)
        self._reset()
        return Discarded(self._epoch, n)

    def _refuse(self, code: RefusalCode, detail: str) -> Refused:
        return Refused(self._epoch, code, detail)

    def _register(self, req: RegisterRequest) -> Response:
        cfg = self.config
        uid = req.sealed.update_id
        if not 1 <= req.weight <= cfg.max_weight:
            return self._refuse(
                RefusalCode.BAD_WEIGHT, f"weight {req.weight} outside [1, {cfg.max_weight}]"
            )
        if uid in self._buffer:
            return self._refuse(RefusalCode.DUPLICATE, "update id already in the buffer")
        if uid in self._seen:
            return self._refuse(RefusalCode.REPLAYED, "update id was registered before")
        if req.client_id in self._clients:
            return self._refuse(
                RefusalCode.DUPLICATE, f"client {req.client_id} already has an update buffered"
            )
        if self._total + req.weight > cfg.weight_budget():
            return self._refuse(
                RefusalCode.BAD_WEIGHT,
                f"total weight {self._total + req.weight} would exceed the no-wrap budget "
                f"{cfg.weight_budget()}; release or discard first",
            )
        ctx = SeedContext(cfg.task, req.client_id, req.base_version, uid, self._key.public)
        try:
            seed = open_seed(self._key, req.sealed, ctx)
        except CryptoError as exc:
            return self._refuse(RefusalCode.BAD_SEAL, str(exc))
        # Validated: mutate. The mask goes into _acc in complete(); products and sums wrap in
        # the dtype (2^k divides its modulus); the accumulator is reduced once, at release.
        self._pending.append((seed, req.weight))
        self._buffer[uid] = req.client_id
        self._clients.add(req.client_id)
        self._seen.add(uid)
        self._total += req.weight
        return Registered(self._epoch, len(self._buffer), self._total)

    def _release(self, req: ReleaseRequest) -> Response:
        named = set(req.update_ids)
        if len(named) != len(req.update_ids) or named != self._buffer.keys():
            return self._refuse(
                RefusalCode.MISMATCH,
                f"aggregator names {len(req.update_ids)} updates, the enclave holds "
                f"{len(self._buffer)} (or a different set)",
            )
        k = self.config.min_contributions
        if len(self._clients) < k:
            return self._refuse(
                RefusalCode.BELOW_THRESHOLD,
                f"{len(self._clients)} distinct contributions < K={k}",
            )
        self.complete()
        out = np.negative(self._acc, out=self._out)
        if self.config.noise_std > 0:
            assert self._noise is not None
            out += self._ring_noise()
        out = self._ring.reduce(out)
        released = Released(self._epoch, len(self._buffer), self._total, self.config.noise_std, out)
        self._reset()
        return released

    def _ring_noise(self) -> RingVector:
        assert self._noise is not None
        cfg = self.config
        z = np.clip(self._noise.standard_normal(cfg.dim), -_NOISE_TAIL, _NOISE_TAIL)
        scaled = np.rint(z * (cfg.noise_std * 2.0 ** (cfg.frac_bits + cfg.weight_bits)))
        # |scaled| <= noise_bound < 2^63; astype wraps negatives to two's complement.
        return scaled.astype(np.int64).astype(self._ring.dtype)

    def _reset(self) -> None:
        self._pending.clear()
        self._job = None
        self._acc_empty = True  # the masks in _acc are dropped: the next one overwrites them
        self._buffer.clear()
        self._clients.clear()
        self._total = 0
