"""The server side of buffered asynchronous LightSecAgg as a sans-I/O state machine.

So et al. (asynchronous variant, 2021, §5; LightSecAgg, MLSys 2022, §4): the server routes
encrypted mask shares, accumulates weighted masked uploads ``A = sum_c w_c y_c mod p`` of a
buffer whose contributions may come from different model versions (each contribution has
its own fresh mask, so masks of mixed versions cancel the same way), then asks the users for
their aggregated shares ``sum_c w_c [z_c]_j``. The first ``U`` distinct answers decode
``sum_c w_c z_c`` in one shot (Lagrange interpolation, independent of how many users dropped)
and ``A - sum_c w_c z_c = sum_c w_c x_c``: the only unmasked vector the server ever holds.

Weights are the caller's (integer staleness x example weights); the server applies them to
the uploads and asks users to apply the same ones to their shares, which is linear and so
keeps the masks cancellable. Validate before mutating: a refused message (``ProtocolError``)
leaves the state unchanged. Several buffers may await their shares at once while uploads
keep arriving into the next one: asynchrony never waits for unmasking.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from asyncfl.errors import ProtocolError
from asyncfl.secure.lightsecagg.field import FieldVector, P, check_field, to_signed
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

__all__ = ["LightSecAggServer", "UnmaskedSum"]

_P = np.uint64(P)
_U64 = 1 << 64


@dataclass(frozen=True, eq=False)
class UnmaskedSum:
    """A decoded buffer: ``total = sum_c w_c x_c`` read as signed integers."""

    buffer_id: int
    contributions: tuple[ContributionId, ...]
    weights: tuple[int, ...]
    total: npt.NDArray[np.int64]
    responders: tuple[int, ...]


@dataclass
class _Buffer:
    acc: FieldVector
    """``sum_c w_c y_c``, reduced modulo p only when needed (see ``on_masked_upload``)."""
    bound: int = 0
    """An upper bound on every entry of ``acc``; always < 2^64."""
    contributions: list[ContributionId] = field(default_factory=list)
    weights: list[int] = field(default_factory=list)
    shares: dict[int, FieldVector] = field(default_factory=dict)


class LightSecAggServer:
    """Routing, the masked accumulator and one-shot decoding for one group."""

    def __init__(
        self,
        params: LightSecAggParams,
        session_id: bytes,
        *,
        code: LagrangeCode | None = None,
        first_buffer_id: int = 0,
    ) -> None:
        """``first_buffer_id``: where buffer ids start. Users answer each id once, so a
        server that restarts within the same session must start past every id it issued
        before (the service starts each boot at ``boot << 32``)."""
        if first_buffer_id < 0:
            raise ValueError(f"first_buffer_id={first_buffer_id} must be >= 0")
        self.params = params
        self.session_id = session_id
        self.code = code or LagrangeCode(params)
        self._keys: dict[int, bytes] = {}
        self._shared: set[ContributionId] = set()
        self._uploaded: set[ContributionId] = set()
        self._open = _Buffer(np.zeros(params.dim, dtype=np.uint64))
        self._scratch = np.empty(params.dim, dtype=np.uint64)
        self._next_id = first_buffer_id
        self._closed: dict[int, _Buffer] = {}

    # -- setup ----------------------------------------------------------------------------
    def on_key_advert(self, msg: KeyAdvert) -> KeyDirectory | None:
        """Record a key; once all ``N`` users advertised, the directory to broadcast."""
        self._check_session(msg.session_id)
        if not 0 <= msg.sender < self.params.num_users:
            raise ProtocolError(f"key advert from unknown user {msg.sender}")
        if msg.sender in self._keys:
            raise ProtocolError(f"user {msg.sender} already advertised a key")
        self._keys[msg.sender] = msg.public
        if len(self._keys) < self.params.num_users:
            return None
        return KeyDirectory(self.session_id, tuple(self._keys[j] for j in sorted(self._keys)))

    # -- contributions --------------------------------------------------------------------
    def on_mask_shares(self, msg: MaskShares) -> dict[int, EncryptedMaskShare]:
        """Check that every other user gets exactly one share; return them by receiver."""
        self._check_session(msg.session_id)
        cid = msg.contribution
        n = self.params.num_users
        if not 0 <= cid.user < n:
            raise ProtocolError(f"mask shares from unknown user {cid.user}")
        if cid in self._shared:
            raise ProtocolError(f"mask shares of {cid} were already routed")
        by = {s.receiver: s for s in msg.shares}
        if (
            len(by) != len(msg.shares)
            or set(by) != set(range(n)) - {cid.user}
            or any(s.contribution != cid for s in msg.shares)
        ):
            raise ProtocolError(f"{cid} must carry one share for each of the other {n - 1} users")
        self._shared.add(cid)
        return by

    def cancel_route(self, contribution: ContributionId) -> None:
        """Forget the routing of a contribution whose upload was then refused (by the
        aggregator: too stale, duplicate client, ...), so the refusal changes no state. Only
        before its shares are delivered: the caller holds them until the upload is accepted."""
        if contribution not in self._shared or contribution in self._uploaded:
            raise ProtocolError(f"{contribution} is not routed-but-not-uploaded")
        self._shared.discard(contribution)

    def on_masked_upload(self, msg: MaskedUpload, weight: int) -> None:
        """Add ``weight * y mod p`` to the open buffer."""
        self._check_session(msg.session_id)
        cid = msg.contribution
        if cid not in self._shared:
            raise ProtocolError(f"{cid} has no routed mask shares: nobody could unmask it")
        if cid in self._uploaded:
            raise ProtocolError(f"{cid} was already uploaded (a mask is used once)")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight < P:
            raise ProtocolError(f"weight={weight!r} must be an integer in [1, p)")
        try:
            check_field(msg.masked, (self.params.dim,), "masked upload")
        except ValueError as exc:
            raise ProtocolError(str(exc)) from exc
        # Lazy reduction: y, w < p < 2^32, so w y < 2^64 and the products can be summed
        # unreduced while the running bound stays below 2^64 (with the small integer weights
        # of staleness quantisation that is millions of uploads). A modulo on uint64 is a
        # division per element, ~4x the cost of the multiply-add, so it runs only when the
        # next product could overflow and once when the buffer closes.
        buf = self._open
        top = (P - 1) * weight
        if buf.bound + top >= _U64:
            buf.acc %= _P
            buf.bound = P - 1
        np.multiply(msg.masked, np.uint64(weight), out=self._scratch)
        buf.acc += self._scratch
        buf.bound += top
        self._uploaded.add(cid)
        self._open.contributions.append(cid)
        self._open.weights.append(weight)

    @staticmethod
    def _reduce(buf: _Buffer) -> None:
        if buf.bound >= P:
            buf.acc %= _P
            buf.bound = P - 1

    @property
    def buffered(self) -> int:
        """Contributions in the open buffer."""
        return len(self._open.contributions)

    @property
    def masked_sum(self) -> FieldVector:
        """``sum_c w_c y_c`` of the open buffer (read-only view): all the server holds of it."""
        self._reduce(self._open)
        view = self._open.acc.view()
        view.flags.writeable = False
        return view

    @property
    def awaiting(self) -> tuple[int, ...]:
        """Ids of closed buffers still waiting for aggregated shares."""
        return tuple(self._closed)

    @property
    def open_buffer_id(self) -> int:
        """The id the open buffer will have when it closes (ids grow in closing order)."""
        return self._next_id

    # -- unmasking ------------------------------------------------------------------------
    def close_buffer(self) -> AggregateRequest:
        """Freeze the open buffer and return the request to send to every user."""
        if self.buffered < self.params.min_contributions:
            raise ProtocolError(
                f"buffer has {self.buffered} contributions; users unmask only "
                f">= {self.params.min_contributions}"
            )
        bid = self._next_id
        self._next_id += 1
        buf = self._open
        self._reduce(buf)
        self._closed[bid] = buf
        self._open = _Buffer(np.zeros(self.params.dim, dtype=np.uint64))
        return AggregateRequest(self.session_id, bid, tuple(buf.contributions), tuple(buf.weights))

    def on_aggregate_share(self, msg: AggregateShare) -> UnmaskedSum | None:
        """Keep the share; with ``U`` of them, decode, unmask and forget the buffer."""
        self._check_session(msg.session_id)
        buf = self._closed.get(msg.buffer_id)
        if buf is None:
            raise ProtocolError(f"no buffer {msg.buffer_id} awaits shares")
        if not 0 <= msg.sender < self.params.num_users or msg.sender in buf.shares:
            raise ProtocolError(f"unexpected or duplicate share from user {msg.sender}")
        try:
            check_field(msg.share, (self.params.piece_len,), "aggregated share")
        except ValueError as exc:
            raise ProtocolError(str(exc)) from exc
        buf.shares[msg.sender] = msg.share
        if len(buf.shares) < self.params.target_survivors:
            return None
        users = tuple(buf.shares)
        mask = self.code.decode(users, np.stack([buf.shares[j] for j in users]))
        del self._closed[msg.buffer_id]
        unmasked = (buf.acc + (_P - mask)) % _P
        return UnmaskedSum(
            msg.buffer_id, tuple(buf.contributions), tuple(buf.weights), to_signed(unmasked), users
        )

    def abandon(self, buffer_id: int) -> int:
        """Give up a closed buffer (fewer than ``U`` users answered); return its size."""
        buf = self._closed.pop(buffer_id, None)
        if buf is None:
            raise ProtocolError(f"no buffer {buffer_id} awaits shares")
        return len(buf.contributions)

    def _check_session(self, session_id: bytes) -> None:
        if session_id != self.session_id:
            raise ProtocolError("message from another session")
