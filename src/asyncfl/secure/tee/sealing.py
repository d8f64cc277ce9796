"""Encrypting a client's mask seed to the attested enclave (X25519 + HKDF + AES-GCM).

The client draws a fresh ephemeral X25519 key pair per update, agrees a secret with the
enclave's attested public key, derives an AES-256-GCM key with HKDF-SHA256 and encrypts the
32-byte mask seed (ECIES-style; the primitives are :mod:`asyncfl.secure.crypto`'s).

The context ``(task, client id, base version, update id, enclave key)`` enters both the HKDF
info and the GCM associated data, so a sealed seed opens only for the update it was made for:
replaying it under another client id, task or base version, or to another enclave boot (new
key), fails authentication. Replaying it unchanged is stopped by the enclave, which remembers
every update id it has registered in its epoch.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from asyncfl.errors import CryptoError
from asyncfl.secure.crypto import KeyPair, decrypt_share, encrypt_share, share_key
from asyncfl.secure.prg import SEED_BYTES
from asyncfl.secure.tee.messages import UPDATE_ID_BYTES, SealedSeed

__all__ = ["ENCLAVE_PARTY", "SeedContext", "open_seed", "seal_seed"]

# The enclave's party id in the key derivation and associated data: outside the client-id
# range that the wire format's u64 client ids can use for real clients by convention.
ENCLAVE_PARTY = (1 << 64) - 1
_DOMAIN = b"asyncfl/tee/v1/seed"


@dataclass(frozen=True)
class SeedContext:
    """Everything a sealed seed is bound to."""

    task: str
    client_id: int
    base_version: int
    update_id: bytes
    enclave_public: bytes

    def session(self, ephemeral_public: bytes) -> bytes:
        task = self.task.encode()
        return (
            _DOMAIN
            + struct.pack(">I", len(task))
            + task
            + struct.pack(">Q", self.base_version)
            + self.update_id
            + self.enclave_public
            + ephemeral_public
        )


def seal_seed(seed: bytes, ctx: SeedContext) -> SealedSeed:
    """Encrypt ``seed`` to ``ctx.enclave_public`` under a fresh ephemeral key."""
    if len(seed) != SEED_BYTES or len(ctx.update_id) != UPDATE_ID_BYTES:
        raise ValueError(
            f"seed of {len(seed)} bytes / update id of {len(ctx.update_id)} bytes; "
            f"expected {SEED_BYTES} / {UPDATE_ID_BYTES}"
        )
    eph = KeyPair.generate(os.urandom)
    session = ctx.session(eph.public)
    key = share_key(eph, ctx.enclave_public, session, ctx.client_id, ENCLAVE_PARTY)
    blob = encrypt_share(key, seed, session, ctx.client_id, ENCLAVE_PARTY)
    return SealedSeed(ctx.update_id, eph.public, blob)


def open_seed(enclave_key: KeyPair, sealed: SealedSeed, ctx: SeedContext) -> bytes:
    """The seed, or :class:`CryptoError` if ``sealed`` was not made for exactly ``ctx``."""
    if sealed.update_id != ctx.update_id or ctx.enclave_public != enclave_key.public:
        raise CryptoError("sealed seed opened under a context it does not name")
    session = ctx.session(sealed.ephemeral_public)
    key = share_key(enclave_key, sealed.ephemeral_public, session, ctx.client_id, ENCLAVE_PARTY)
    seed = decrypt_share(key, sealed.ciphertext, session, ctx.client_id, ENCLAVE_PARTY)
    if len(seed) != SEED_BYTES:
        raise CryptoError(f"sealed seed holds {len(seed)} bytes, expected {SEED_BYTES}")
    return seed
