"""Messages of the SecAgg protocol (Bonawitz et al., CCS 2017, Fig. 4), client <-> server.

All are frozen dataclasses carrying the session id so a message from another round is
rejected. ``wire_size`` estimates the serialised size (ids 8 bytes, session 16 bytes, ring
vectors bit-packed at ``ring_bits`` per element) for traffic accounting in simulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from asyncfl.secure.ring import RingVector

__all__ = [
    "AdvertiseKeys",
    "ClientMessage",
    "EncryptedShare",
    "KeyBroadcast",
    "MaskedInput",
    "PublicKeys",
    "ServerMessage",
    "ShareBroadcast",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
    "wire_size",
]

_ID = 8
_SESSION = 16


@dataclass(frozen=True)
class PublicKeys:
    """A client's two X25519 public keys: ``c`` for share encryption, ``s`` for masks."""

    c_pk: bytes
    s_pk: bytes


@dataclass(frozen=True)
class AdvertiseKeys:
    """Round 0, client -> server."""

    session_id: bytes
    sender: int
    keys: PublicKeys


@dataclass(frozen=True)
class KeyBroadcast:
    """Round 0, server -> client: public keys of the recipient's live neighbours (and its own)."""

    session_id: bytes
    recipient: int
    keys: tuple[tuple[int, PublicKeys], ...]


@dataclass(frozen=True)
class EncryptedShare:
    """AES-GCM ciphertext of (sender, receiver, b-share, s-key share), routed by the server."""

    sender: int
    receiver: int
    ciphertext: bytes


@dataclass(frozen=True)
class ShareKeys:
    """Round 1, client -> server: one ciphertext per neighbour."""

    session_id: bytes
    sender: int
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class ShareBroadcast:
    """Round 1, server -> client: the ciphertexts addressed to the recipient."""

    session_id: bytes
    recipient: int
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Round 2, client -> server: ``y_u = x_u + PRG(b_u) + sum_v +-PRG(s_uv) mod 2^k``."""

    session_id: bytes
    sender: int
    masked: RingVector


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 3, server -> client: reveal b-shares of ``survivors``, s-key shares of ``dropped``."""

    session_id: bytes
    recipient: int
    survivors: frozenset[int]
    dropped: frozenset[int]


@dataclass(frozen=True)
class UnmaskResponse:
    """Round 3, client -> server: ``(owner, share bytes)`` pairs of each kind."""

    session_id: bytes
    sender: int
    b_shares: tuple[tuple[int, bytes], ...]
    s_shares: tuple[tuple[int, bytes], ...]


ClientMessage = AdvertiseKeys | ShareKeys | MaskedInput | UnmaskResponse
ServerMessage = KeyBroadcast | ShareBroadcast | UnmaskRequest


def wire_size(msg: ClientMessage | ServerMessage, ring_bits: int) -> int:
    """Estimated bytes on the wire of ``msg`` (header: session id and one client id)."""
    head = _SESSION + _ID
    match msg:
        case AdvertiseKeys(keys=k):
            return head + len(k.c_pk) + len(k.s_pk)
        case KeyBroadcast(keys=ks):
            return head + sum(_ID + len(k.c_pk) + len(k.s_pk) for _, k in ks)
        case ShareKeys(shares=ss) | ShareBroadcast(shares=ss):
            return head + sum(2 * _ID + len(s.ciphertext) for s in ss)
        case MaskedInput(masked=m):
            return head + math.ceil(int(m.shape[0]) * ring_bits / 8)
        case UnmaskRequest(survivors=a, dropped=b):
            return head + _ID * (len(a) + len(b))
        case UnmaskResponse(b_shares=bs, s_shares=ss):
            return head + sum(_ID + len(s) for _, s in bs + ss)
