"""Messages across the enclave boundary of the secure buffer, and their wire encoding.

Papaya (Huba et al., MLSys 2022, §5) keeps FedBuff's secure buffer in a trusted execution
environment; the untrusted aggregator talks to it only through these messages. Everything
that crosses the boundary is encoded explicitly by this module (never pickled), so the
enclave parses a small, fixed grammar and a real TEE backend (SGX/SEV/TDX) can reuse it.

Wire format, version 1 (all integers big-endian)::

    frame   = MAGIC(4) "AFTE" | VERSION(u8) | TYPE(u8) | body
    bytes   = LEN(u32) | data
    ring    = BITS(u8) | N(u32) | N elements, little-endian u32 (BITS <= 32) or u64
            | BITS + 0x80 (u8) | N(u32)    (the elements are in the shared output region)
    str     = bytes (UTF-8)

The shared output region: a backend may give the enclave a memory region the host can read
(:class:`~asyncfl.secure.tee.backends.SubprocessBackend` maps one into both processes, as a
TDX or SEV guest shares pages with its host). A release then writes its vector there and the
frame names it instead of carrying it: no model-sized copy through the socket. The enclave
only ever writes the region, and only the vector it releases; ``decode`` returns a view of the
region, valid until the next release.

A frame with another magic, version or type, a truncated body or trailing bytes is refused
with :class:`~asyncfl.errors.ProtocolError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

import numpy as np

from asyncfl.errors import ProtocolError
from asyncfl.secure.ring import RingVector

__all__ = [
    "EPOCH_BYTES",
    "UPDATE_ID_BYTES",
    "WIRE_VERSION",
    "AttestationReport",
    "DiscardRequest",
    "Discarded",
    "RefusalCode",
    "Refused",
    "RegisterRequest",
    "Registered",
    "ReleaseRequest",
    "Released",
    "ReportRequest",
    "ReportResponse",
    "Request",
    "Response",
    "SealedSeed",
    "decode",
    "encode",
    "encode_parts",
]

WIRE_VERSION = 1
EPOCH_BYTES = 16
UPDATE_ID_BYTES = 16
_MAGIC = b"AFTE"
_MAX_BYTES = 1 << 31  # no single field may claim more than 2 GiB
_SHARED = 0x80  # flag on a ring vector's BITS: its elements are in the shared output region


@dataclass(frozen=True)
class AttestationReport:
    """What the enclave's hardware vouches for: this code (``measurement``) holds this key.

    ``epoch`` is fresh per enclave boot: a restart gives a new key and a new epoch.
    ``signature`` is the hardware vendor's Ed25519 signature over the other fields
    (see :mod:`asyncfl.secure.tee.attestation`).
    """

    measurement: bytes
    public_key: bytes
    epoch: bytes
    signature: bytes


@dataclass(frozen=True)
class SealedSeed:
    """A client's mask seed encrypted to the enclave (X25519 + HKDF + AES-GCM).

    ``update_id`` is a fresh random id of this one update; the ciphertext is bound to it and
    to (task, client id, base version, enclave key), see :mod:`asyncfl.secure.tee.sealing`.
    """

    update_id: bytes
    ephemeral_public: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class ReportRequest:
    """Aggregator -> enclave: send your attestation report (relayed to clients)."""


@dataclass(frozen=True)
class RegisterRequest:
    """Aggregator -> enclave: this contribution is in my buffer with integer weight ``weight``."""

    epoch: bytes
    client_id: int
    base_version: int
    weight: int
    sealed: SealedSeed


@dataclass(frozen=True)
class ReleaseRequest:
    """Aggregator -> enclave: my buffer holds exactly these updates; release the unmasking."""

    epoch: bytes
    update_ids: tuple[bytes, ...]


@dataclass(frozen=True)
class DiscardRequest:
    """Aggregator -> enclave: forget the current buffer (its masks are never released)."""

    epoch: bytes


@dataclass(frozen=True)
class ReportResponse:
    report: AttestationReport


@dataclass(frozen=True)
class Registered:
    """The contribution is in the enclave's buffer, which now holds ``count`` of them."""

    epoch: bytes
    count: int
    total_weight: int


@dataclass(frozen=True, eq=False)
class Released:
    """``unmask = -sum_i w_i m_i (+ noise) mod 2^k`` over ``count`` contributions."""

    epoch: bytes
    count: int
    total_weight: int
    noise_std: float
    """Std of the Gaussian noise added to the released sum, in model units (0: none)."""
    unmask: RingVector


@dataclass(frozen=True)
class Discarded:
    epoch: bytes
    count: int


class RefusalCode(Enum):
    """Why the enclave refused a request; its state is unchanged by a refused request."""

    MALFORMED = 1
    STALE_EPOCH = 2
    BAD_WEIGHT = 3
    DUPLICATE = 4
    REPLAYED = 5
    BAD_SEAL = 6
    BELOW_THRESHOLD = 7
    MISMATCH = 8


@dataclass(frozen=True)
class Refused:
    epoch: bytes
    code: RefusalCode
    detail: str


Request = ReportRequest | RegisterRequest | ReleaseRequest | DiscardRequest
Response = ReportResponse | Registered | Released | Discarded | Refused

_TYPES: dict[type, int] = {
    ReportRequest: 1,
    RegisterRequest: 2,
    ReleaseRequest: 3,
    DiscardRequest: 4,
    ReportResponse: 0x81,
    Registered: 0x82,
    Released: 0x83,
    Discarded: 0x84,
    Refused: 0x8F,
}


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []

    def u8(self, v: int) -> None:
        self.parts.append(struct.pack(">B", v))

    def u32(self, v: int) -> None:
        self.parts.append(struct.pack(">I", v))

    def u64(self, v: int) -> None:
        self.parts.append(struct.pack(">Q", v))

    def f64(self, v: float) -> None:
        self.parts.append(struct.pack(">d", v))

    def raw(self, b: bytes) -> None:
        self.u32(len(b))
        self.parts.append(b)

    def ring(self, x: RingVector, shared: RingVector | None = None) -> None:
        bits = 32 if x.dtype == np.uint32 else 64
        if shared is not None and x is shared:
            self.u8(bits | _SHARED)  # the elements are already in the shared region
            self.u32(int(x.shape[0]))
            return
        self.u8(bits)
        self.u32(int(x.shape[0]))
        # A view, not tobytes(): the frame's join is then the only copy of a model-sized vector.
        self.parts.append(np.ascontiguousarray(x, dtype=f"<u{bits // 8}").data.cast("B"))


class _Reader:
    def __init__(
        self, data: bytes | bytearray | memoryview, shared: RingVector | None = None
    ) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.shared = shared

    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError(
                f"truncated enclave message: need {n} bytes at offset {self.pos}, "
                f"have {len(self.data) - self.pos}"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return int(struct.unpack(">B", self._take(1))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self._take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self._take(8))[0])

    def f64(self) -> float:
        return float(struct.unpack(">d", self._take(8))[0])

    def raw(self, exact: int | None = None) -> bytes:
        n = self.u32()
        if n > _MAX_BYTES or (exact is not None and n != exact):
            raise ProtocolError(f"field of {n} bytes; expected {exact or f'<= {_MAX_BYTES}'}")
        return bytes(self._take(n))

    def ring(self) -> RingVector:
        bits = self.u8()
        if bits in (32 | _SHARED, 64 | _SHARED):
            n, shared = self.u32(), self.shared
            if shared is None or shared.dtype.itemsize * 8 != bits - _SHARED or n != shared.size:
                raise ProtocolError(
                    f"a {n}-element ring vector in a shared region this connection does not "
                    "have (or of another size or width)"
                )
            return shared
        if bits not in (32, 64):
            raise ProtocolError(f"ring vector storage of {bits} bits; expected 32 or 64")
        n = self.u32()
        buf = self._take(n * bits // 8)
        native = np.uint32 if bits == 32 else np.uint64
        # Copied (astype): the decoded vector must not alias, or keep alive, the frame (a
        # receive buffer is reused for the next frame).
        return np.frombuffer(buf, dtype=f"<u{bits // 8}").astype(native)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError(f"{len(self.data) - self.pos} trailing bytes in enclave message")


def _report(w: _Writer, r: AttestationReport) -> None:
    for b in (r.measurement, r.public_key, r.epoch, r.signature):
        w.raw(b)


def _read_report(r: _Reader) -> AttestationReport:
    return AttestationReport(r.raw(32), r.raw(32), r.raw(EPOCH_BYTES), r.raw(64))


def encode(msg: Request | Response) -> bytes:
    """The version-1 frame of ``msg``."""
    return b"".join(encode_parts(msg))


def encode_parts(
    msg: Request | Response, shared: RingVector | None = None
) -> list[bytes | memoryview]:
    """:func:`encode` as pieces whose concatenation is the frame; a ring vector is a view of
    its array's memory (not copied), so send the pieces before the array changes. A released
    vector that *is* ``shared`` (the shared output region) is named, not carried."""
    w = _Writer()
    w.parts.append(_MAGIC)
    w.u8(WIRE_VERSION)
    w.u8(_TYPES[type(msg)])
    if isinstance(msg, ReportRequest):
        pass
    elif isinstance(msg, RegisterRequest):
        w.raw(msg.epoch)
        w.u64(msg.client_id)
        w.u64(msg.base_version)
        w.u64(msg.weight)
        w.raw(msg.sealed.update_id)
        w.raw(msg.sealed.ephemeral_public)
        w.raw(msg.sealed.ciphertext)
    elif isinstance(msg, ReleaseRequest):
        w.raw(msg.epoch)
        w.u32(len(msg.update_ids))
        for uid in msg.update_ids:
            w.raw(uid)
    elif isinstance(msg, DiscardRequest):
        w.raw(msg.epoch)
    elif isinstance(msg, ReportResponse):
        _report(w, msg.report)
    elif isinstance(msg, Registered):
        w.raw(msg.epoch)
        w.u64(msg.count)
        w.u64(msg.total_weight)
    elif isinstance(msg, Released):
        w.raw(msg.epoch)
        w.u64(msg.count)
        w.u64(msg.total_weight)
        w.f64(msg.noise_std)
        w.ring(msg.unmask, shared)
    elif isinstance(msg, Discarded):
        w.raw(msg.epoch)
        w.u64(msg.count)
    else:
        w.raw(msg.epoch)
        w.u8(msg.code.value)
        w.raw(msg.detail.encode())
    return w.parts


def decode(
    data: bytes | bytearray | memoryview, shared: RingVector | None = None
) -> Request | Response:
    """Parse one frame; raises :class:`ProtocolError` on anything but a well-formed v1 frame.

    ``shared``: the connection's shared output region (a released vector may be there)."""
    r = _Reader(data, shared)
    if bytes(r._take(4)) != _MAGIC:
        raise ProtocolError("not an enclave message (bad magic)")
    version = r.u8()
    if version != WIRE_VERSION:
        raise ProtocolError(f"enclave wire version {version}; this build speaks {WIRE_VERSION}")
    kind = r.u8()
    msg: Request | Response
    if kind == 1:
        msg = ReportRequest()
    elif kind == 2:
        epoch, cid, base, weight = r.raw(EPOCH_BYTES), r.u64(), r.u64(), r.u64()
        sealed = SealedSeed(r.raw(UPDATE_ID_BYTES), r.raw(32), r.raw())
        msg = RegisterRequest(epoch, cid, base, weight, sealed)
    elif kind == 3:
        epoch = r.raw(EPOCH_BYTES)
        msg = ReleaseRequest(epoch, tuple(r.raw(UPDATE_ID_BYTES) for _ in range(r.u32())))
    elif kind == 4:
        msg = DiscardRequest(r.raw(EPOCH_BYTES))
    elif kind == 0x81:
        msg = ReportResponse(_read_report(r))
    elif kind == 0x82:
        msg = Registered(r.raw(EPOCH_BYTES), r.u64(), r.u64())
    elif kind == 0x83:
        msg = Released(r.raw(EPOCH_BYTES), r.u64(), r.u64(), r.f64(), r.ring())
    elif kind == 0x84:
        msg = Discarded(r.raw(EPOCH_BYTES), r.u64())
    elif kind == 0x8F:
        epoch = r.raw(EPOCH_BYTES)
        try:
            code = RefusalCode(r.u8())
        except ValueError as exc:
            raise ProtocolError(f"unknown refusal code: {exc}") from exc
        msg = Refused(epoch, code, r.raw().decode("utf-8", errors="replace"))
    else:
        raise ProtocolError(f"unknown enclave message type 0x{kind:02x}")
    r.end()
    return msg
