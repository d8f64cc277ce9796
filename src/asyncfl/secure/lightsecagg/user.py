"""The user side of buffered asynchronous LightSecAgg as a sans-I/O state machine.

So et al. (LightSecAgg, MLSys 2022, §4; asynchronous variant, 2021, §5): per contribution the
user draws a fresh uniform mask ``z`` in ``F_p^d``, Lagrange-codes it with ``T`` fresh random
padding pieces into ``N`` shares (:class:`~asyncfl.secure.lightsecagg.lagrange.LagrangeCode`),
keeps its own share and encrypts each other share to its receiver (X25519 + HKDF + AES-GCM,
:mod:`asyncfl.secure.crypto`), bound to (session, contribution, sender, receiver) so the
server that routes them can neither read nor re-route them. The upload is ``x + z mod p``.

Asked to help unmask a buffer, the user returns ``sum_c w_c [z_c]_self``. Refusals (raise
:class:`~asyncfl.errors.ProtocolError`, state unchanged) are the user's defence against a
curious server fishing for one contribution's mask:

- fewer than ``min_contributions`` distinct contributions (a "buffer" of one would reveal it);
- a contribution already aggregated in an earlier request (requests ``S`` and ``S \\ {c}``
  would reveal ``w_c z_c`` by difference), so each held share is used at most once;
- a contribution whose share this user never received, or bad weights.

These checks bound what a server learns from the users it asks; they cannot stop a server
that asks two *disjoint* groups of ``U`` users for different sets (possible when
``N >= 2U``): LightSecAgg's guarantee is for an honest-but-curious server (docs/security.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

from asyncfl.errors import ProtocolError
from asyncfl.secure import crypto
from asyncfl.secure.crypto import KeyPair
from asyncfl.secure.lightsecagg.field import (
    Entropy,
    FieldVector,
    P,
    check_field,
    matmul,
    random_elements,
)
from asyncfl.secure.lightsecagg.lagrange import LagrangeCode
from asyncfl.secure.lightsecagg.messages import (
    AggregateRequest,
    AggregateShare,
    ContributionId,
    EncryptedMaskShare,
    KeyAdvert,
    KeyDirectory,
    MaskedUpload,
    MaskShares,
)
from asyncfl.secure.lightsecagg.params import LightSecAggParams

__all__ = ["LightSecAggUser", "share_from_bytes", "share_to_bytes"]


def share_to_bytes(share: FieldVector) -> bytes:
    return share.astype("<u4").tobytes()


def share_from_bytes(raw: bytes, length: int) -> FieldVector:
    if len(raw) != 4 * length:
        raise ProtocolError(f"share has {len(raw)} bytes, expected {4 * length}")
    out = np.frombuffer(raw, dtype="<u4").astype(np.uint64)
    if out.size and int(out.max()) >= P:
        raise ProtocolError("share has elements >= p")
    return out


class LightSecAggUser:
    """One user of a group. ``code`` may be shared between users (it is read-only)."""

    def __init__(
        self,
        params: LightSecAggParams,
        user_id: int,
        session_id: bytes,
        *,
        code: LagrangeCode | None = None,
        entropy: Entropy = os.urandom,
        keys: KeyPair | None = None,
    ) -> None:
        """``keys``: the user's X25519 key pair when it was made (and advertised) before the
        group's parameters were known, as a service device does; otherwise drawn here."""
        if not 0 <= user_id < params.num_users:
            raise ValueError(f"user_id={user_id} outside [0, {params.num_users})")
        if code is not None and code.params != params:
            raise ValueError("code was built for other parameters")
        self.params = params
        self.user_id = user_id
        self.session_id = session_id
        self.code = code or LagrangeCode(params)
        self._entropy = entropy
        self._keys = keys if keys is not None else KeyPair.generate(entropy)
        self._peers: tuple[bytes, ...] | None = None
        self._sym: dict[int, bytes] = {}
        self._seq = 0
        self._pending: dict[ContributionId, FieldVector] = {}
        self._held: dict[ContributionId, FieldVector] = {}
        self._used: set[ContributionId] = set()
        self._answered: set[int] = set()

    @property
    def held(self) -> frozenset[ContributionId]:
        """Contributions whose share this user holds and has not yet aggregated."""
        return frozenset(self._held)

    # -- setup ----------------------------------------------------------------------------
    def advertise(self) -> KeyAdvert:
        return KeyAdvert(self.session_id, self.user_id, self._keys.public)

    def on_directory(self, msg: KeyDirectory) -> None:
        self._check_session(msg.session_id)
        if len(msg.keys) != self.params.num_users:
            raise ProtocolError(
                f"key directory lists {len(msg.keys)} users, the group has {self.params.num_users}"
            )
        if msg.keys[self.user_id] != self._keys.public:
            raise ProtocolError(f"key directory has a wrong key for user {self.user_id}")
        self._peers = msg.keys
        self._sym.clear()

    def _key(self, peer: int) -> bytes:
        if self._peers is None:
            raise ProtocolError("no key directory yet: call on_directory first")
        if peer not in self._sym:
            self._sym[peer] = crypto.share_key(
                self._keys, self._peers[peer], self.session_id, self.user_id, peer
            )
        return self._sym[peer]

    # -- one contribution -----------------------------------------------------------------
    def prepare_mask(self) -> MaskShares:
        """Draw a fresh mask for the next contribution; return its encrypted coded shares."""
        prm = self.params
        if self._peers is None:
            raise ProtocolError("no key directory yet: call on_directory first")
        cid = ContributionId(self.user_id, self._seq)
        mask = random_elements(prm.dim, self._entropy)
        # Fresh uniform padding, never zeros: it is what makes any T shares uniform.
        padding = random_elements(prm.privacy_threshold * prm.piece_len, self._entropy).reshape(
            prm.privacy_threshold, prm.piece_len
        )
        shares = self.code.encode(mask, padding)
        bound = self.session_id + cid.encode()
        out = tuple(
            EncryptedMaskShare(
                cid,
                j,
                crypto.encrypt_share(
                    self._key(j), share_to_bytes(shares[j]), bound, self.user_id, j, self._entropy
                ),
            )
            for j in range(prm.num_users)
            if j != self.user_id
        )
        self._seq += 1
        self._pending[cid] = mask
        self._held[cid] = shares[self.user_id].copy()
        return MaskShares(self.session_id, cid, out)

    def upload(
        self,
        contribution: ContributionId,
        quantised: FieldVector,
        *,
        base_version: int,
        num_examples: int,
    ) -> MaskedUpload:
        """``x + z mod p`` under the mask prepared for ``contribution``; the mask is then
        forgotten, so it can never mask a second vector."""
        check_field(quantised, (self.params.dim,), "quantised update")
        mask = self._pending.pop(contribution, None)
        if mask is None:
            raise ProtocolError(f"no unused mask for {contribution}: call prepare_mask first")
        masked = (quantised + mask) % np.uint64(P)
        return MaskedUpload(self.session_id, contribution, base_version, num_examples, masked)

    def on_shares(self, shares: Sequence[EncryptedMaskShare]) -> None:
        """Decrypt and keep shares addressed to this user; all or nothing."""
        got: dict[ContributionId, FieldVector] = {}
        for s in shares:
            cid = s.contribution
            if s.receiver != self.user_id:
                raise ProtocolError(f"share for user {s.receiver} delivered to {self.user_id}")
            if not 0 <= cid.user < self.params.num_users or cid.user == self.user_id:
                raise ProtocolError(f"share from invalid sender {cid.user}")
            if cid in self._held or cid in self._used or cid in got:
                raise ProtocolError(f"duplicate share for {cid}")
            # Raises CryptoError (a ProtocolError) if tampered, re-routed or replayed.
            raw = crypto.decrypt_share(
                self._key(cid.user),
                s.ciphertext,
                self.session_id + cid.encode(),
                cid.user,
                self.user_id,
            )
            got[cid] = share_from_bytes(raw, self.params.piece_len)
        self._held.update(got)

    # -- unmasking ------------------------------------------------------------------------
    def on_aggregate_request(self, req: AggregateRequest) -> AggregateShare:
        """``sum_c w_c [z_c]_self`` over the request's contributions (see the refusals in the
        module docstring); each used share is then deleted."""
        self._check_session(req.session_id)
        cids = req.contributions
        if req.buffer_id in self._answered:
            raise ProtocolError(f"buffer {req.buffer_id} was already answered")
        if len(set(cids)) != len(cids) or len(cids) < self.params.min_contributions:
            raise ProtocolError(
                f"request for {len(set(cids))} distinct contributions; this group unmasks "
                f"only buffers of >= {self.params.min_contributions}"
            )
        if len(req.weights) != len(cids) or not all(1 <= w < P for w in req.weights):
            raise ProtocolError("request weights must be one integer in [1, p) per contribution")
        reused = [c for c in cids if c in self._used]
        if reused:
            raise ProtocolError(f"contributions {reused[:3]} were already aggregated once")
        missing = [c for c in cids if c not in self._held]
        if missing:
            raise ProtocolError(f"user {self.user_id} holds no share of {missing[:3]}")
        stacked = np.stack([self._held[c] for c in cids])
        weights = np.asarray([req.weights], dtype=np.uint64)
        share = matmul(weights, stacked)[0]
        for c in cids:
            del self._held[c]
            self._used.add(c)
        self._answered.add(req.buffer_id)
        return AggregateShare(self.session_id, req.buffer_id, self.user_id, share)

    def forget(self, contributions: Iterable[ContributionId]) -> int:
        """The buffer of ``contributions`` is settled (unmasked from other users' answers, or
        discarded): drop this user's shares of them and refuse to aggregate them ever again.

        Without this, a user that was not asked (it dropped, or ``U`` others answered first)
        would hold one share per contribution forever, and a later request could fold an
        already-released contribution into a second sum. Returns how many shares it dropped.
        """
        dropped = 0
        for c in contributions:
            if self._held.pop(c, None) is not None:
                dropped += 1
            self._used.add(c)
        return dropped

    def _check_session(self, session_id: bytes) -> None:
        if session_id != self.session_id:
            raise ProtocolError("message from another session")
