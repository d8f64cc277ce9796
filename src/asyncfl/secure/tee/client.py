"""The client side of the secure buffer: attest, encode, mask, seal (Papaya, §5).

Per update the client (1) verifies the enclave's attestation report: vendor signature and
the measurement it expects (the published enclave code and config, e.g. the release
threshold K) and refuses to send anything otherwise; (2) encodes its delta in fixed point,
``q = round(clip(delta) 2^f)`` with weight 1 (the aggregator applies the integer staleness
and example weight in the ring); (3) draws a fresh 32-byte seed from the OS CSPRNG and
uploads ``y = q + PRG(seed) mod 2^k`` to the aggregator; (4) seals the seed to the enclave's
attested key, bound to (task, client id, base version, a fresh update id).

A fresh seed per update matters: two uploads masked with the same seed would reveal the
difference of their updates to the aggregator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from asyncfl.core.update import FloatVector
from asyncfl.secure.fixedpoint import FixedPointCodec
from asyncfl.secure.prg import SEED_BYTES, MaskExpander
from asyncfl.secure.ring import RingVector
from asyncfl.secure.tee.attestation import enclave_code, measure, verify_report
from asyncfl.secure.tee.enclave import EnclaveConfig
from asyncfl.secure.tee.messages import UPDATE_ID_BYTES, AttestationReport, SealedSeed
from asyncfl.secure.tee.sealing import SeedContext, seal_seed

__all__ = ["MaskedUpdate", "TeeClient", "expected_measurement"]


def expected_measurement(config: EnclaveConfig) -> bytes:
    """The measurement a client expects: this build's enclave code with ``config``."""
    return measure(enclave_code(), config.encode())


@dataclass(frozen=True, eq=False)
class MaskedUpdate:
    """What the untrusted aggregator receives from a client: nothing it can unmask alone."""

    client_id: int
    base_version: int
    num_examples: int
    epoch: bytes
    """The enclave boot the seed was sealed to (from the report the client verified)."""
    masked: RingVector
    sealed: SealedSeed

    @property
    def wire_bytes(self) -> int:
        return int(self.masked.nbytes) + len(self.sealed.ciphertext) + 32 + UPDATE_ID_BYTES


class TeeClient:
    """Makes masked uploads for one task; holds no per-client state between updates."""

    def __init__(
        self,
        *,
        vendor_public: bytes,
        expected: bytes,
        codec: FixedPointCodec,
        task: str,
        dim: int,
    ) -> None:
        self.vendor_public = vendor_public
        self.expected = expected
        self.codec = codec
        self.task = task
        self._expander = MaskExpander(codec.ring, dim)

    def upload(
        self,
        report: AttestationReport,
        *,
        client_id: int,
        base_version: int,
        num_examples: int,
        delta: FloatVector,
        rng: np.random.Generator,
    ) -> MaskedUpdate:
        """Verify ``report`` (raises before anything is computed or sent), then mask and seal."""
        verify_report(report, self.vendor_public, self.expected)
        q = self.codec.encode(delta, 1, rng)
        seed = os.urandom(SEED_BYTES)
        self._expander.accumulate(q, seed)
        masked = self.codec.ring.reduce(q)
        ctx = SeedContext(
            self.task, client_id, base_version, os.urandom(UPDATE_ID_BYTES), report.public_key
        )
        return MaskedUpdate(
            client_id, base_version, num_examples, report.epoch, masked, seal_seed(seed, ctx)
        )
