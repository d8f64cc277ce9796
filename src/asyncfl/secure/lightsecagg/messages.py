"""Messages of buffered asynchronous LightSecAgg (So et al., 2021/2022), user <-> server.

Frozen dataclasses; each carries the group's session id so a message from another group or
task is refused. Masks are per contribution (a user's ``seq``-th update), never per user:
two uploads under one mask would reveal the difference of two updates.

Flow of one contribution ``c = (i, seq)`` and one buffer:

1. ``MaskShares`` (user ``i`` -> server): the ``N - 1`` coded shares of ``z_c``, each AES-GCM
   encrypted to its receiver; the server routes each :class:`EncryptedMaskShare` to its
   receiver and cannot read it. (This is the paper's offline phase: it can run while the
   user trains.)
2. ``MaskedUpload`` (user ``i`` -> server): ``y_c = x_c + z_c mod p``.
3. ``AggregateRequest`` (server -> users): the buffer's contributions and their integer
   weights ``w_c`` (staleness x examples).
4. ``AggregateShare`` (user ``j`` -> server): ``sum_c w_c [z_c]_j``; any ``U`` decode
   ``sum_c w_c z_c``.

``wire_bytes`` counts field elements at 4 bytes (p < 2^32), ids at 8 bytes and the session
at 16 bytes, for traffic accounting in simulation.
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncfl.secure.lightsecagg.field import FieldVector

__all__ = [
    "AggregateRequest",
    "AggregateShare",
    "ContributionId",
    "EncryptedMaskShare",
    "KeyAdvert",
    "KeyDirectory",
    "MaskShares",
    "MaskedUpload",
]

_ID = 8
_SESSION = 16
_ELEMENT = 4


@dataclass(frozen=True, order=True)
class ContributionId:
    """User ``user``'s ``seq``-th contribution: the unit a mask is fresh for."""

    user: int
    seq: int

    def encode(self) -> bytes:
        return self.user.to_bytes(8, "big") + self.seq.to_bytes(8, "big")


@dataclass(frozen=True)
class KeyAdvert:
    """Setup, user -> server: the X25519 public key shares are encrypted to."""

    session_id: bytes
    sender: int
    public: bytes


@dataclass(frozen=True)
class KeyDirectory:
    """Setup, server -> users: every user's public key, indexed by user id."""

    session_id: bytes
    keys: tuple[bytes, ...]


@dataclass(frozen=True)
class EncryptedMaskShare:
    """``[z_c]_receiver``, AES-GCM encrypted by ``c.user`` to ``receiver``; routed by the server."""

    contribution: ContributionId
    receiver: int
    ciphertext: bytes


@dataclass(frozen=True)
class MaskShares:
    """Step 1, user -> server: one encrypted share per other user."""

    session_id: bytes
    contribution: ContributionId
    shares: tuple[EncryptedMaskShare, ...]

    @property
    def wire_bytes(self) -> int:
        return _SESSION + 2 * _ID + sum(_ID + len(s.ciphertext) for s in self.shares)


@dataclass(frozen=True, eq=False)
class MaskedUpload:
    """Step 2, user -> server: ``x_c + z_c mod p``; the server can read nothing else of it."""

    session_id: bytes
    contribution: ContributionId
    base_version: int
    num_examples: int
    masked: FieldVector

    @property
    def wire_bytes(self) -> int:
        return _SESSION + 4 * _ID + _ELEMENT * int(self.masked.size)


@dataclass(frozen=True)
class AggregateRequest:
    """Step 3, server -> users: aggregate your shares of these contributions with these
    integer weights (``weights[k]`` belongs to ``contributions[k]``)."""

    session_id: bytes
    buffer_id: int
    contributions: tuple[ContributionId, ...]
    weights: tuple[int, ...]

    @property
    def wire_bytes(self) -> int:
        return _SESSION + _ID + len(self.contributions) * 3 * _ID


@dataclass(frozen=True, eq=False)
class AggregateShare:
    """Step 4, user -> server: ``sum_c w_c [z_c]_sender`` for the request ``buffer_id``."""

    session_id: bytes
    buffer_id: int
    sender: int
    share: FieldVector

    @property
    def wire_bytes(self) -> int:
        return _SESSION + 2 * _ID + _ELEMENT * int(self.share.size)
