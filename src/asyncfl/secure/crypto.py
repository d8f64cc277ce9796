"""Key agreement, key derivation and authenticated encryption for secure aggregation.

Bonawitz et al. (CCS 2017, §4 and Fig. 4) give each client two Diffie–Hellman key pairs:
``(c_pk, c_sk)`` to derive a symmetric key for encrypting Shamir shares to another client,
and ``(s_pk, s_sk)`` to agree on pairwise mask seeds. We instantiate DH with X25519, the KDF
with HKDF-SHA256 (RFC 5869) and the authenticated encryption with AES-256-GCM.

Every derived key and every ciphertext is bound to the session id (one aggregation round),
and ciphertexts additionally to (sender, receiver) through the GCM associated data, so a
ciphertext cannot be replayed into another round or re-routed to another client: both make
decryption fail with :class:`~asyncfl.errors.CryptoError`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from asyncfl.errors import CryptoError

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "KeyPair",
    "decrypt_share",
    "encrypt_share",
    "mask_seed",
    "public_from_private",
    "share_key",
]

KEY_BYTES = 32
NONCE_BYTES = 12
_ENC_INFO = b"asyncfl/secagg/v1/share-encryption"
_MASK_INFO = b"asyncfl/secagg/v1/pairwise-mask"

Entropy = Callable[[int], bytes]


@dataclass(frozen=True, repr=False)
class KeyPair:
    """An X25519 key pair; ``private`` raw bytes are what gets Shamir-shared."""

    private: bytes
    public: bytes
    # Parsed once: from_private_bytes costs as much as a key agreement.
    key: X25519PrivateKey = field(compare=False)

    def __repr__(self) -> str:  # never print private keys
        return f"KeyPair(public={self.public.hex()[:16]}...)"

    @classmethod
    def generate(cls, entropy: Entropy = os.urandom) -> KeyPair:
        return cls.from_private(entropy(KEY_BYTES))

    @classmethod
    def from_private(cls, private: bytes) -> KeyPair:
        try:
            key = X25519PrivateKey.from_private_bytes(private)
        except ValueError as exc:
            raise CryptoError(f"invalid X25519 private key: {exc}") from exc
        return cls(private, key.public_key().public_bytes_raw(), key)


def public_from_private(private: bytes) -> bytes:
    return KeyPair.from_private(private).public


def _agree(private: KeyPair, peer_public: bytes) -> bytes:
    try:
        return private.key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        # Raised for malformed keys and for low-order points (all-zero shared secret).
        raise CryptoError(f"X25519 key agreement failed: {exc}") from exc


def _ids(a: int, b: int) -> bytes:
    return struct.pack(">QQ", a, b)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def share_key(private_c: KeyPair, peer_public_c: bytes, session: bytes, u: int, v: int) -> bytes:
    """Symmetric key between clients ``u`` and ``v`` for encrypting shares (same both ways)."""
    lo, hi = min(u, v), max(u, v)
    return _hkdf(_agree(private_c, peer_public_c), _ENC_INFO + session + _ids(lo, hi))


def mask_seed(private_s: KeyPair, peer_public_s: bytes, session: bytes, u: int, v: int) -> bytes:
    """Pairwise mask seed ``s_uv`` (symmetric in u, v; fresh per session)."""
    lo, hi = min(u, v), max(u, v)
    return _hkdf(_agree(private_s, peer_public_s), _MASK_INFO + session + _ids(lo, hi))


def _aad(session: bytes, sender: int, receiver: int) -> bytes:
    return struct.pack(">I", len(session)) + session + _ids(sender, receiver)


def encrypt_share(
    key: bytes,
    plaintext: bytes,
    session: bytes,
    sender: int,
    receiver: int,
    entropy: Entropy = os.urandom,
) -> bytes:
    """AES-GCM ciphertext ``nonce || ct || tag`` bound to (session, sender, receiver)."""
    nonce = entropy(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(session, sender, receiver))


def decrypt_share(key: bytes, blob: bytes, session: bytes, sender: int, receiver: int) -> bytes:
    """Inverse of :func:`encrypt_share`; raises :class:`CryptoError` on any tampering."""
    if len(blob) < NONCE_BYTES + 16:
        raise CryptoError(
            f"share ciphertext from client {sender} to {receiver} is {len(blob)} bytes, "
            "too short to hold a nonce and a tag"
        )
    try:
        return AESGCM(key).decrypt(
            blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(session, sender, receiver)
        )
    except InvalidTag as exc:
        raise CryptoError(
            f"share ciphertext from client {sender} to client {receiver} failed authentication "
            "(tampered, re-routed or from another session)"
        ) from exc
