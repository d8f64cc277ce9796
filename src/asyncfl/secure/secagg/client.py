"""The SecAgg client as a sans-I/O state machine (Bonawitz et al., CCS 2017, Fig. 4).

Stages and transitions (each method is legal in exactly one stage and advances it)::

    ADVERTISE_KEYS --advertise_keys()--> SHARE_KEYS --share_keys(KeyBroadcast)-->
    MASKED_INPUT --masked_input(ShareBroadcast, x)--> UNMASKING --unmask(UnmaskRequest)--> DONE

Every input is validated before any state changes: a message in the wrong stage, for another
client or session, with unknown or duplicated senders, or a tampered ciphertext raises
:class:`ProtocolError` (:class:`CryptoError`) and leaves the machine as it was.

Security invariants enforced here rather than trusted to the server:
- at least ``t`` live holders in every stage (else the server could isolate our input);
- in unmasking we reveal, per client, either its self-mask share (it survived) or its mask-key
  share (it dropped), never both, and answer only one request: a request naming a client in
  both sets is refused whole, so the server learns nothing from it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from enum import Enum

from asyncfl.errors import ProtocolError
from asyncfl.secure import crypto, shamir
from asyncfl.secure.prg import SEED_BYTES, MaskExpander
from asyncfl.secure.ring import RingVector
from asyncfl.secure.secagg.config import SecAggConfig
from asyncfl.secure.secagg.messages import (
    AdvertiseKeys,
    EncryptedShare,
    KeyBroadcast,
    MaskedInput,
    PublicKeys,
    ShareBroadcast,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)

__all__ = ["ClientStage", "SecAggClient"]

_SHARE_BYTES = 48  # a 32-byte secret is 3 field elements of 16 bytes


class ClientStage(Enum):
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASKING = "unmasking"
    DONE = "done"


def _pack_plaintext(u: int, v: int, b: shamir.Share, s: shamir.Share) -> bytes:
    return struct.pack(">QQ", u, v) + b.to_bytes() + s.to_bytes()


class SecAggClient:
    """Client ``client_id`` of one round. ``entropy`` must be a CSPRNG outside of tests."""

    def __init__(
        self,
        client_id: int,
        config: SecAggConfig,
        entropy: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if client_id not in config.graph:
            raise ProtocolError(f"client {client_id} is not in this round's graph")
        self.client_id = client_id
        self.config = config
        self._entropy = entropy
        self._stage = ClientStage.ADVERTISE_KEYS
        self._c = crypto.KeyPair.generate(entropy)
        self._s = crypto.KeyPair.generate(entropy)
        self._peers: dict[int, PublicKeys] = {}
        self._b_seed = b""
        self._sym: dict[int, bytes] = {}
        # owner -> (b-share, s-key share) that we hold, including our own shares.
        self._held: dict[int, tuple[shamir.Share, shamir.Share]] = {}

    @property
    def stage(self) -> ClientStage:
        return self._stage

    def _expect(self, stage: ClientStage, what: str) -> None:
        if self._stage is not stage:
            raise ProtocolError(
                f"client {self.client_id}: {what} is not allowed in stage "
                f"{self._stage.value} (expected stage {stage.value})"
            )

    def _check_header(self, session_id: bytes, recipient: int, what: str) -> None:
        if session_id != self.config.session_id:
            raise ProtocolError(
                f"client {self.client_id}: {what} is for session {session_id.hex()}, "
                f"this round is {self.config.session_id.hex()} (replayed?)"
            )
        if recipient != self.client_id:
            raise ProtocolError(
                f"client {self.client_id}: {what} is addressed to client {recipient}"
            )

    # Round 0 ---------------------------------------------------------------------------
    def advertise_keys(self) -> AdvertiseKeys:
        self._expect(ClientStage.ADVERTISE_KEYS, "advertise_keys")
        self._stage = ClientStage.SHARE_KEYS
        return AdvertiseKeys(
            self.config.session_id, self.client_id, PublicKeys(self._c.public, self._s.public)
        )

    # Round 1 ---------------------------------------------------------------------------
    def share_keys(self, msg: KeyBroadcast) -> ShareKeys:
        """Check the neighbours' keys, Shamir-share ``b_u`` and ``s_sk``, encrypt the shares."""
        self._expect(ClientStage.SHARE_KEYS, "KeyBroadcast")
        self._check_header(msg.session_id, msg.recipient, "KeyBroadcast")
        u, cfg = self.client_id, self.config
        ids = [v for v, _ in msg.keys]
        peers = dict(msg.keys)
        if len(peers) != len(ids):
            raise ProtocolError(f"client {u}: KeyBroadcast lists a client twice: {sorted(ids)}")
        if not set(ids) <= cfg.holders(u):
            raise ProtocolError(
                f"client {u}: KeyBroadcast has keys of non-neighbours "
                f"{sorted(set(ids) - cfg.holders(u))}"
            )
        if peers.get(u) != PublicKeys(self._c.public, self._s.public):
            raise ProtocolError(f"client {u}: KeyBroadcast does not carry our own public keys")
        if len(peers) < cfg.threshold:
            raise ProtocolError(
                f"client {u}: only {len(peers)} live holders, threshold is {cfg.threshold}; "
                "aborting so our secrets are never shared below the threshold"
            )
        all_keys = [k for pk in peers.values() for k in (pk.c_pk, pk.s_pk)]
        if len(set(all_keys)) != len(all_keys):
            raise ProtocolError(f"client {u}: KeyBroadcast repeats a public key")
        order = sorted(peers)
        b_seed = self._entropy(SEED_BYTES)
        xs = [v + 1 for v in order]  # x = id + 1: x = 0 would be the secret itself
        b_shares = shamir.split_bytes(b_seed, xs, cfg.threshold, self._entropy)
        s_shares = shamir.split_bytes(self._s.private, xs, cfg.threshold, self._entropy)
        out = []
        held = {}
        sym: dict[int, bytes] = {}  # kept for decrypting v's shares to us next round
        for v, b, s in zip(order, b_shares, s_shares, strict=True):
            if v == u:
                held[u] = (b, s)
                continue
            key = crypto.share_key(self._c, peers[v].c_pk, cfg.session_id, u, v)
            sym[v] = key
            ct = crypto.encrypt_share(
                key, _pack_plaintext(u, v, b, s), cfg.session_id, u, v, self._entropy
            )
            out.append(EncryptedShare(u, v, ct))
        self._peers, self._b_seed, self._held, self._sym = peers, b_seed, held, sym
        self._stage = ClientStage.MASKED_INPUT
        return ShareKeys(cfg.session_id, u, tuple(out))

    # Round 2 ---------------------------------------------------------------------------
    def masked_input(self, msg: ShareBroadcast, x: RingVector) -> MaskedInput:
        """Decrypt and keep the shares we hold; return ``x`` double-masked."""
        self._expect(ClientStage.MASKED_INPUT, "ShareBroadcast")
        self._check_header(msg.session_id, msg.recipient, "ShareBroadcast")
        u, cfg = self.client_id, self.config
        try:
            x = cfg.ring.check(x, cfg.vector_length)
        except ValueError as exc:
            raise ProtocolError(f"client {u}: bad input vector: {exc}") from exc
        senders = [e.sender for e in msg.shares]
        if len(set(senders)) != len(senders):
            raise ProtocolError(f"client {u}: ShareBroadcast repeats a sender: {sorted(senders)}")
        unknown = set(senders) - (set(self._peers) - {u})
        if unknown:
            raise ProtocolError(
                f"client {u}: ShareBroadcast has shares from unknown {sorted(unknown)}"
            )
        if len(senders) + 1 < cfg.threshold:
            raise ProtocolError(
                f"client {u}: only {len(senders) + 1} clients shared keys, threshold is "
                f"{cfg.threshold}; aborting"
            )
        received = {}
        for e in msg.shares:
            if e.receiver != u:
                raise ProtocolError(
                    f"client {u}: ShareBroadcast carries a ciphertext for client {e.receiver}"
                )
            v = e.sender
            plain = crypto.decrypt_share(self._sym[v], e.ciphertext, cfg.session_id, v, u)
            if len(plain) != 16 + 2 * _SHARE_BYTES or struct.unpack(">QQ", plain[:16]) != (v, u):
                raise ProtocolError(f"client {u}: share plaintext from {v} is malformed")
            b = shamir.Share.from_bytes(u + 1, plain[16 : 16 + _SHARE_BYTES])
            s = shamir.Share.from_bytes(u + 1, plain[16 + _SHARE_BYTES :])
            received[v] = (b, s)
        ring = cfg.ring
        expander = MaskExpander(ring, cfg.vector_length)
        y = x.copy()
        expander.accumulate(y, self._b_seed)
        for v in senders:
            seed = crypto.mask_seed(self._s, self._peers[v].s_pk, cfg.session_id, u, v)
            # Sign by id order so that u's and v's pairwise masks cancel in the sum.
            expander.accumulate(y, seed, negate=u > v)
        ring.reduce(y)
        self._held.update(received)
        self._stage = ClientStage.UNMASKING
        return MaskedInput(cfg.session_id, u, y)

    # Round 3 ---------------------------------------------------------------------------
    def unmask(self, msg: UnmaskRequest) -> UnmaskResponse:
        """Reveal b-shares of survivors and s-key shares of dropped clients, never both."""
        self._expect(ClientStage.UNMASKING, "UnmaskRequest")
        self._check_header(msg.session_id, msg.recipient, "UnmaskRequest")
        u, cfg = self.client_id, self.config
        both = msg.survivors & msg.dropped
        if both:
            raise ProtocolError(
                f"client {u}: refusing UnmaskRequest that asks for both the self-mask and the "
                f"mask-key shares of clients {sorted(both)}; that would reveal their inputs"
            )
        unknown = (msg.survivors | msg.dropped) - set(self._held)
        if unknown:
            raise ProtocolError(
                f"client {u}: UnmaskRequest names clients {sorted(unknown)} whose shares we "
                "never received"
            )
        if u not in msg.survivors:
            raise ProtocolError(f"client {u}: UnmaskRequest does not list us as a survivor")
        if len(msg.survivors) < cfg.threshold:
            raise ProtocolError(
                f"client {u}: only {len(msg.survivors)} survivors, threshold is "
                f"{cfg.threshold}; refusing to unmask a sum of too few inputs"
            )
        b_out = tuple((v, self._held[v][0].to_bytes()) for v in sorted(msg.survivors))
        s_out = tuple((v, self._held[v][1].to_bytes()) for v in sorted(msg.dropped))
        self._stage = ClientStage.DONE
        return UnmaskResponse(cfg.session_id, u, b_out, s_out)
