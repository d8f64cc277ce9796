"""The SecAgg server as a sans-I/O state machine (Bonawitz et al., CCS 2017, Fig. 4).

The server collects each stage's client messages with :meth:`SecAggServer.receive` and closes
the stage with :meth:`SecAggServer.advance` (in a deployment: at a deadline), which returns the
messages to deliver. Client sets follow the paper: ``U1`` advertised keys, ``U2`` shared keys,
``U3`` sent masked inputs, ``U4`` answered the unmask request. After unmasking the server
reconstructs ``b_u`` for ``u in U3`` and ``s_sk_v`` for ``v in U2 \\ U3`` and outputs

    ``z = sum_{u in U3} y_u - PRG(b_u) - sum_{v in U2 \\ U3, v ~ u} sign(u, v) PRG(s_uv)``.

It only ever holds masked vectors and this sum. If any stage leaves fewer than ``t`` live
clients, or a secret has fewer than ``t`` shares, :meth:`advance` moves to ``FAILED`` and raises
:class:`RoundFailed`; no partial sum is computed. Messages that are out of stage, from
unknown or unexpected clients, duplicated or from another session raise
:class:`ProtocolError` and change nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

from asyncfl.errors import CryptoError, ProtocolError
from asyncfl.secure import crypto, shamir
from asyncfl.secure.prg import SEED_BYTES, MaskExpander
from asyncfl.secure.ring import RingVector
from asyncfl.secure.secagg.config import SecAggConfig
from asyncfl.secure.secagg.messages import (
    AdvertiseKeys,
    ClientMessage,
    EncryptedShare,
    KeyBroadcast,
    MaskedInput,
    PublicKeys,
    ServerMessage,
    ShareBroadcast,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)

__all__ = ["RoundFailed", "SecAggServer", "ServerStage"]


_Shares = list[tuple[int, shamir.Share]]


class RoundFailed(ProtocolError):
    """The round cannot produce a sum (too few live clients or shares); nothing is revealed."""


class ServerStage(Enum):
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASKING = "unmasking"
    DONE = "done"
    FAILED = "failed"


_EXPECTED: dict[ServerStage, type] = {
    ServerStage.ADVERTISE_KEYS: AdvertiseKeys,
    ServerStage.SHARE_KEYS: ShareKeys,
    ServerStage.MASKED_INPUT: MaskedInput,
    ServerStage.UNMASKING: UnmaskResponse,
}


class SecAggServer:
    """Server side of one round."""

    def __init__(self, config: SecAggConfig) -> None:
        self.config = config
        self._stage = ServerStage.ADVERTISE_KEYS
        self._keys: dict[int, PublicKeys] = {}
        self._key_view: dict[int, frozenset[int]] = {}  # u -> ids whose keys u got (incl. u)
        self._shares: dict[int, tuple[EncryptedShare, ...]] = {}
        self._share_view: dict[int, frozenset[int]] = {}  # u -> ids whose shares u got (incl. u)
        self._masked: dict[int, RingVector] = {}
        self._requests: dict[int, UnmaskRequest] = {}
        # u -> parsed (owner, share) lists of each kind
        self._responses: dict[int, tuple[_Shares, _Shares]] = {}
        self._result: RingVector | None = None
        self.failure: str | None = None

    @property
    def stage(self) -> ServerStage:
        return self._stage

    @property
    def result(self) -> RingVector:
        """The unmasked sum; only available in stage DONE."""
        if self._result is None:
            raise ProtocolError(f"no sum: the server is in stage {self._stage.value}")
        return self._result

    @property
    def survivors(self) -> frozenset[int]:
        """``U3``: the clients whose masked inputs were received (their inputs form the sum)."""
        return frozenset(self._masked)

    # Receiving ---------------------------------------------------------------------------
    def receive(self, msg: ClientMessage) -> None:
        """Validate and store one client message of the current stage."""
        expected = _EXPECTED.get(self._stage)
        if expected is None or not isinstance(msg, expected):
            want = expected.__name__ if expected else "nothing (round is over)"
            raise ProtocolError(
                f"server: {type(msg).__name__} from client {msg.sender} arrived in stage "
                f"{self._stage.value}; expected {want}"
            )
        if msg.session_id != self.config.session_id:
            raise ProtocolError(
                f"server: {type(msg).__name__} from client {msg.sender} is for session "
                f"{msg.session_id.hex()}, this round is {self.config.session_id.hex()} (replayed?)"
            )
        u = msg.sender
        if u not in self.config.graph:
            raise ProtocolError(f"server: message from unknown client {u}")
        if isinstance(msg, AdvertiseKeys):
            self._receive_keys(msg)
        elif isinstance(msg, ShareKeys):
            self._receive_shares(msg)
        elif isinstance(msg, MaskedInput):
            self._receive_masked(msg)
        else:
            self._receive_unmask(msg)

    def _dup(self, store: Mapping[int, object], u: int, what: str) -> None:
        if u in store:
            raise ProtocolError(f"server: duplicate {what} from client {u} (replayed?)")

    def _receive_keys(self, msg: AdvertiseKeys) -> None:
        self._dup(self._keys, msg.sender, "AdvertiseKeys")
        k = msg.keys
        if len(k.c_pk) != crypto.KEY_BYTES or len(k.s_pk) != crypto.KEY_BYTES:
            raise ProtocolError(f"server: client {msg.sender} advertised malformed public keys")
        self._keys[msg.sender] = k

    def _receive_shares(self, msg: ShareKeys) -> None:
        u = msg.sender
        self._dup(self._shares, u, "ShareKeys")
        if u not in self._key_view:
            raise ProtocolError(f"server: ShareKeys from client {u}, which got no keys")
        receivers = [e.receiver for e in msg.shares]
        if any(e.sender != u for e in msg.shares):
            raise ProtocolError(f"server: ShareKeys from {u} carries ciphertexts of another sender")
        if sorted(receivers) != sorted(self._key_view[u] - {u}):
            raise ProtocolError(
                f"server: ShareKeys from {u} is addressed to {sorted(receivers)}, expected one "
                f"ciphertext for each of {sorted(self._key_view[u] - {u})}"
            )
        self._shares[u] = msg.shares

    def _receive_masked(self, msg: MaskedInput) -> None:
        u = msg.sender
        self._dup(self._masked, u, "MaskedInput")
        if u not in self._share_view:
            raise ProtocolError(f"server: MaskedInput from client {u}, which got no shares")
        try:
            self.config.ring.check(msg.masked, self.config.vector_length)
        except ValueError as exc:
            raise ProtocolError(f"server: MaskedInput from client {u}: {exc}") from exc
        self._masked[u] = msg.masked

    def _receive_unmask(self, msg: UnmaskResponse) -> None:
        u = msg.sender
        self._dup(self._responses, u, "UnmaskResponse")
        req = self._requests.get(u)
        if req is None:
            raise ProtocolError(f"server: UnmaskResponse from client {u}, which got no request")
        b_owners = [v for v, _ in msg.b_shares]
        s_owners = [v for v, _ in msg.s_shares]
        if sorted(b_owners) != sorted(req.survivors) or sorted(s_owners) != sorted(req.dropped):
            raise ProtocolError(f"server: UnmaskResponse from {u} does not answer its request")
        try:
            b = [(v, shamir.Share.from_bytes(u + 1, data)) for v, data in msg.b_shares]
            s = [(v, shamir.Share.from_bytes(u + 1, data)) for v, data in msg.s_shares]
        except ValueError as exc:
            raise ProtocolError(f"server: UnmaskResponse from {u} has a bad share: {exc}") from exc
        self._responses[u] = (b, s)

    # Advancing ---------------------------------------------------------------------------
    def _fail(self, reason: str) -> RoundFailed:
        self._stage = ServerStage.FAILED
        self.failure = reason
        # Drop what the failed round holds: there is no partial result to leak later.
        self._masked.clear()
        self._responses.clear()
        return RoundFailed(reason)

    def advance(self) -> list[ServerMessage]:
        """Close the current stage and return the messages to send to clients."""
        t = self.config.threshold
        if self._stage is ServerStage.ADVERTISE_KEYS:
            u1 = set(self._keys)
            views = {u: frozenset(self.config.holders(u) & u1) for u in u1}
            live = {u: vw for u, vw in views.items() if len(vw) >= t}
            if len(live) < t:
                raise self._fail(f"only {len(live)} clients can share keys (threshold {t})")
            self._key_view = live
            self._stage = ServerStage.SHARE_KEYS
            sid = self.config.session_id
            return [
                KeyBroadcast(sid, u, tuple((v, self._keys[v]) for v in sorted(vw)))
                for u, vw in sorted(live.items())
            ]
        if self._stage is ServerStage.SHARE_KEYS:
            inbox: dict[int, list[EncryptedShare]] = {u: [] for u in self._shares}
            for _, cts in sorted(self._shares.items()):
                for e in cts:
                    if e.receiver in inbox:
                        inbox[e.receiver].append(e)
            live2 = {u: es for u, es in inbox.items() if len(es) + 1 >= t}
            if len(live2) < t:
                raise self._fail(f"only {len(live2)} clients shared keys (threshold {t})")
            self._share_view = {
                u: frozenset({u} | {e.sender for e in es}) for u, es in live2.items()
            }
            self._stage = ServerStage.MASKED_INPUT
            sid = self.config.session_id
            return [ShareBroadcast(sid, u, tuple(es)) for u, es in sorted(live2.items())]
        if self._stage is ServerStage.MASKED_INPUT:
            u3 = set(self._masked)
            reqs = {}
            for u in sorted(u3):
                view = self._share_view[u]
                survivors = frozenset(view & u3)
                if len(survivors) >= t:
                    reqs[u] = UnmaskRequest(
                        self.config.session_id, u, survivors, frozenset(view - u3)
                    )
            if len(u3) < t or len(reqs) < t:
                raise self._fail(
                    f"only {len(u3)} masked inputs ({len(reqs)} unmaskable), threshold {t}"
                )
            self._requests = reqs
            self._stage = ServerStage.UNMASKING
            return list(reqs.values())
        if self._stage is ServerStage.UNMASKING:
            self._result = self._unmask()
            self._stage = ServerStage.DONE
            return []
        raise ProtocolError(f"server: cannot advance from stage {self._stage.value}")

    def _collect(self) -> tuple[dict[int, list[shamir.Share]], dict[int, list[shamir.Share]]]:
        b: dict[int, list[shamir.Share]] = {}
        s: dict[int, list[shamir.Share]] = {}
        for _, (b_resp, s_resp) in sorted(self._responses.items()):
            for v, share in b_resp:
                b.setdefault(v, []).append(share)
            for v, share in s_resp:
                s.setdefault(v, []).append(share)
        return b, s

    def _unmask(self) -> RingVector:
        t, cfg = self.config.threshold, self.config
        u3 = set(self._masked)
        # v dropped after sharing and some survivor masked with it: its s-key is needed.
        dropped = {v for u in u3 for v in self._share_view[u] - u3}
        b_sh, s_sh = self._collect()
        short = sorted(u for u in u3 if len(b_sh.get(u, ())) < t) + sorted(
            v for v in dropped if len(s_sh.get(v, ())) < t
        )
        if len(self._responses) < t or short:
            raise self._fail(
                f"{len(self._responses)} unmask responses (threshold {t}); fewer than "
                f"{t} shares for clients {short[:10]}"
            )
        ring = cfg.ring
        expander = MaskExpander(ring, cfg.vector_length)
        total = ring.zeros(cfg.vector_length)
        for u in sorted(u3):
            total += self._masked[u]
        try:
            for u in sorted(u3):
                b_seed = shamir.combine_bytes(b_sh[u], t, SEED_BYTES)
                expander.accumulate(total, b_seed, negate=True)
            for v in sorted(dropped):
                s_sk = crypto.KeyPair.from_private(
                    shamir.combine_bytes(s_sh[v], t, crypto.KEY_BYTES)
                )
                if s_sk.public != self._keys[v].s_pk:
                    raise CryptoError(f"reconstructed mask key of client {v} does not match")
                for u in sorted(w for w in u3 if v in self._share_view[w]):
                    seed = crypto.mask_seed(s_sk, self._keys[u].s_pk, cfg.session_id, u, v)
                    # u added +mask if u < v; remove exactly what u added.
                    expander.accumulate(total, seed, negate=u < v)
        except (ValueError, CryptoError) as exc:
            raise self._fail(f"inconsistent shares, cannot unmask: {exc}") from exc
        return ring.reduce(total)
