"""Simulated remote attestation of the secure-buffer enclave.

A TEE proves what it runs with a *report* signed by a key only the hardware holds (Intel
SGX/TDX quotes, AMD SEV-SNP attestation reports). The report binds

    measurement = SHA-256(domain || code || config)

to the enclave's freshly generated X25519 public key and its boot ``epoch``, so a client that
checks (1) the vendor's signature, (2) ``measurement == expected`` knows that the key it is
about to encrypt its mask seed to belongs to *this* program with *this* config (e.g. the
release threshold K), and to nothing else.

Here the "hardware vendor" is an Ed25519 key pair (:class:`SimulatedVendor`) the test or
simulation harness owns. What that does NOT prove is written in ``docs/security.md``: the
harness can sign anything, so simulated attestation only exercises the client's checks.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from asyncfl.errors import CryptoError, ProtocolError
from asyncfl.secure.tee.messages import EPOCH_BYTES, AttestationReport

__all__ = [
    "MEASUREMENT_BYTES",
    "SimulatedVendor",
    "enclave_code",
    "measure",
    "report_payload",
    "verify_report",
]

MEASUREMENT_BYTES = 32
_MEASURE_DOMAIN = b"asyncfl/tee/v1/measurement"
_REPORT_DOMAIN = b"asyncfl/tee/v1/report"
# The program that runs inside the enclave: its own modules and the secure primitives it uses.
_SECURE = Path(__file__).resolve().parent.parent
_ENCLAVE_SOURCES = (
    "tee/enclave.py",
    "tee/messages.py",
    "tee/sealing.py",
    "tee/attestation.py",
    "tee/framing.py",
    "tee/process.py",
    "prg.py",
    "ring.py",
    "crypto.py",
)


def enclave_code() -> bytes:
    """The enclave program's code: its source files, each length-prefixed, in a fixed order."""
    parts = []
    for rel in _ENCLAVE_SOURCES:
        src = (_SECURE / rel).read_bytes()
        parts.append(rel.encode() + len(src).to_bytes(8, "big") + src)
    return b"".join(parts)


def measure(code: bytes, config: bytes) -> bytes:
    """``SHA-256(domain || len(code) || code || config)``: the identity clients expect."""
    h = hashlib.sha256(_MEASURE_DOMAIN)
    h.update(len(code).to_bytes(8, "big"))
    h.update(code)
    h.update(config)
    return h.digest()


def report_payload(measurement: bytes, public_key: bytes, epoch: bytes) -> bytes:
    """The bytes the vendor signs: domain-separated, fixed-length fields."""
    if len(measurement) != MEASUREMENT_BYTES or len(public_key) != 32 or len(epoch) != EPOCH_BYTES:
        raise ProtocolError(
            f"report fields of {len(measurement)}/{len(public_key)}/{len(epoch)} bytes; "
            f"expected {MEASUREMENT_BYTES}/32/{EPOCH_BYTES}"
        )
    return _REPORT_DOMAIN + measurement + public_key + epoch


@dataclass(frozen=True, repr=False)
class SimulatedVendor:
    """The hardware vendor's signing key, owned by the test/simulation harness."""

    private: bytes
    key: Ed25519PrivateKey = field(compare=False)

    def __repr__(self) -> str:  # never print the private key
        return f"SimulatedVendor(public={self.public.hex()[:16]}...)"

    @classmethod
    def generate(cls) -> SimulatedVendor:
        return cls.from_private(os.urandom(32))

    @classmethod
    def from_private(cls, private: bytes) -> SimulatedVendor:
        try:
            return cls(private, Ed25519PrivateKey.from_private_bytes(private))
        except ValueError as exc:
            raise CryptoError(f"invalid Ed25519 vendor key: {exc}") from exc

    @property
    def public(self) -> bytes:
        return self.key.public_key().public_bytes_raw()

    def sign_report(self, measurement: bytes, public_key: bytes, epoch: bytes) -> AttestationReport:
        sig = self.key.sign(report_payload(measurement, public_key, epoch))
        return AttestationReport(measurement, public_key, epoch, sig)


def verify_report(
    report: AttestationReport, vendor_public: bytes, expected_measurement: bytes
) -> None:
    """Raise unless ``report`` is signed by the vendor AND measures the expected program.

    Raises :class:`CryptoError` for a bad signature or vendor key, :class:`ProtocolError` for
    a valid report of another program or config. A client sends nothing before this passes.
    """
    try:
        vendor = Ed25519PublicKey.from_public_bytes(vendor_public)
    except ValueError as exc:
        raise CryptoError(f"invalid vendor public key: {exc}") from exc
    payload = report_payload(report.measurement, report.public_key, report.epoch)
    try:
        vendor.verify(report.signature, payload)
    except InvalidSignature as exc:
        raise CryptoError(
            "attestation report signature does not verify under the vendor key "
            f"{vendor_public.hex()[:16]}...: forged, tampered or signed by another vendor"
        ) from exc
    if not hmac.compare_digest(report.measurement, expected_measurement):
        raise ProtocolError(
            f"enclave measurement {report.measurement.hex()[:16]}... is not the expected "
            f"{expected_measurement.hex()[:16]}...: another program or config (e.g. another "
            "release threshold K); refusing to send it a mask seed"
        )
