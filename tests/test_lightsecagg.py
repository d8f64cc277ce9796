"""Buffered asynchronous LightSecAgg: user/server state machines and the in-process driver.

The reference for every sum is a plain-Python integer loop over the inputs and weights.
"""

from __future__ import annotations

import dataclasses
import itertools
import random

import numpy as np
import pytest

from asyncfl.errors import CryptoError, ProtocolError
from asyncfl.secure.lightsecagg import (
    AggregateRequest,
    ContributionId,
    LightSecAggGroup,
    LightSecAggParams,
    LightSecAggServer,
    P,
    secure_weighted_sum,
)
from asyncfl.secure.lightsecagg.field import FieldVector, to_signed

SID = bytes(range(16))


def _group(
    n: int = 7, t: int = 2, u: int = 4, d: int = 11, k: int = 2, seed: int = 1
) -> LightSecAggGroup:
    return LightSecAggGroup(
        LightSecAggServer(LightSecAggParams(n, t, u, d, min_contributions=k), SID), seed=seed
    )


def _vec(d: int, seed: int) -> FieldVector:
    return np.random.default_rng(seed).integers(0, P, d, dtype=np.uint64)


def _ref(inputs: list[tuple[int, FieldVector, int]]) -> list[int]:
    d = inputs[0][1].size
    total = [sum(w * int(x[c]) for _, x, w in inputs) % P for c in range(d)]
    return [v - P if v > P // 2 else v for v in total]


@pytest.mark.parametrize("num_dropped", [0, 1, 2, 3])
def test_sum_correct_with_up_to_n_minus_u_dropouts(num_dropped: int) -> None:
    rng = random.Random(num_dropped)
    # Distinct weights, a user contributing twice (two model versions), contributors dropping.
    inputs = [(0, _vec(11, 1), 3), (5, _vec(11, 2), 1), (5, _vec(11, 3), 17), (2, _vec(11, 4), 2)]
    for dropped in itertools.islice(itertools.combinations(range(7), num_dropped), 0, None, 5):
        group = _group(seed=rng.randrange(1000))
        res = secure_weighted_sum(group, inputs, dropped)
        assert res is not None
        assert res.total.tolist() == _ref(inputs)
        assert len(res.responders) == 4 and not set(res.responders) & set(dropped)
        assert res.weights == (3, 1, 17, 2)


def test_too_many_dropouts_fail_cleanly_and_the_next_buffer_works() -> None:
    group = _group()
    inputs = [(1, _vec(11, 5), 2), (3, _vec(11, 6), 9)]
    assert secure_weighted_sum(group, inputs, dropped=[0, 1, 2, 6]) is None  # 3 < U = 4
    assert group.server.awaiting == () and group.stats.failed_unmaskings == 1
    again = [(4, _vec(11, 7), 5), (1, _vec(11, 8), 1)]
    res = secure_weighted_sum(group, again, dropped=[0, 1, 2])
    assert res is not None and res.total.tolist() == _ref(again)


def test_mixed_versions_and_interleaved_buffers() -> None:
    """Uploads of different base versions share a buffer; a second buffer fills while the
    first still waits for shares; each decodes to its own weighted sum."""
    group = _group(n=6, t=2, u=3, d=9, k=2, seed=4)
    server = group.server
    xs = {c: _vec(9, 20 + c) for c in range(5)}
    plan = [(0, 0, 4), (3, 2, 1), (5, 1, 6)]  # (user, base_version, weight)
    for c, (user, version, w) in enumerate(plan):
        server.on_masked_upload(group.contribute(user, xs[c], base_version=version), w)
    first = server.close_buffer()
    assert [r.user for r in first.contributions] == [0, 3, 5]
    second_plan = [(0, 3, 2), (2, 3, 7)]
    for c, (user, version, w) in enumerate(second_plan, start=3):
        server.on_masked_upload(group.contribute(user, xs[c], base_version=version), w)
    second = server.close_buffer()
    assert server.awaiting == (first.buffer_id, second.buffer_id)
    res2 = group.collect(second, [5, 4, 3], server.on_aggregate_share)
    res1 = group.collect(first, [1, 0, 2, 4], server.on_aggregate_share)
    assert res1 is not None and res2 is not None
    assert res1.total.tolist() == _ref([(u, xs[c], w) for c, (u, _, w) in enumerate(plan)])
    assert res2.total.tolist() == _ref(
        [(u, xs[c], w) for c, (u, _, w) in enumerate(second_plan, start=3)]
    )


def test_fresh_mask_per_contribution_and_single_use() -> None:
    group = _group()
    x = _vec(11, 9)
    a, b = group.contribute(2, x), group.contribute(2, x)
    assert a.contribution != b.contribution
    assert not np.array_equal(a.masked, b.masked)  # same input, fresh masks
    user = group.users[2]
    with pytest.raises(ProtocolError, match="no unused mask"):
        user.upload(a.contribution, x, base_version=0, num_examples=1)


def test_masked_upload_reveals_nothing_without_the_mask() -> None:
    group = _group(d=20_000)
    up = group.contribute(0, np.zeros(20_000, np.uint64))  # the input is all zeros
    counts = np.bincount((up.masked * 16 // P).astype(np.int64), minlength=16)
    assert counts.min() > 20_000 / 16 * 0.9  # the upload is the (uniform) mask


def test_users_refuse_small_reused_or_unknown_requests() -> None:
    group = _group(k=2)
    server = group.server
    ups = [group.contribute(u, _vec(11, u)) for u in (0, 1, 2)]
    for up in ups:
        server.on_masked_upload(up, 1)
    req = server.close_buffer()
    user = group.users[4]
    held = user.held
    single = AggregateRequest(SID, 99, req.contributions[:1], (1,))
    with pytest.raises(ProtocolError, match=">= 2"):
        user.on_aggregate_request(single)
    bad_w = dataclasses.replace(req, weights=(1, 0, 1))
    with pytest.raises(ProtocolError, match="weights"):
        user.on_aggregate_request(bad_w)
    unknown = AggregateRequest(SID, 98, (ContributionId(3, 0), req.contributions[0]), (1, 1))
    with pytest.raises(ProtocolError, match="holds no share"):
        user.on_aggregate_request(unknown)
    assert user.held == held  # refusals change nothing
    user.on_aggregate_request(req)
    # Difference attack: S then S minus one contribution would reveal its mask.
    subset = AggregateRequest(SID, 97, req.contributions[1:], (1, 1))
    with pytest.raises(ProtocolError, match="already aggregated"):
        user.on_aggregate_request(subset)
    with pytest.raises(ProtocolError, match="already answered"):
        user.on_aggregate_request(req)


def test_server_refusals_leave_state_unchanged() -> None:
    group = _group(k=1)
    server = group.server
    x = _vec(11, 30)
    user = group.users[3]
    msg = user.prepare_mask()
    up = user.upload(msg.contribution, x, base_version=0, num_examples=1)
    with pytest.raises(ProtocolError, match="no routed mask shares"):
        server.on_masked_upload(up, 1)
    with pytest.raises(ProtocolError, match="one share for each"):
        server.on_mask_shares(dataclasses.replace(msg, shares=msg.shares[1:]))
    for receiver, share in server.on_mask_shares(msg).items():
        group.users[receiver].on_shares([share])
    with pytest.raises(ProtocolError, match="already routed"):
        server.on_mask_shares(msg)
    with pytest.raises(ProtocolError, match="weight"):
        server.on_masked_upload(up, P)
    with pytest.raises(ProtocolError, match="shape"):
        server.on_masked_upload(dataclasses.replace(up, masked=up.masked[:5]), 1)
    with pytest.raises(ProtocolError, match="another session"):
        server.on_masked_upload(dataclasses.replace(up, session_id=bytes(16)), 1)
    assert server.buffered == 0
    server.on_masked_upload(up, 6)
    with pytest.raises(ProtocolError, match="already uploaded"):
        server.on_masked_upload(up, 6)
    req = server.close_buffer()
    res = group.collect(req, range(7), server.on_aggregate_share)
    assert res is not None and res.total.tolist() == _ref([(3, x, 6)])
    with pytest.raises(ProtocolError, match="no buffer"):
        server.abandon(req.buffer_id)


def test_shares_are_encrypted_end_to_end() -> None:
    group = _group()
    msg = group.users[0].prepare_mask()
    routed = group.server.on_mask_shares(msg)
    share = routed[4]
    tampered = dataclasses.replace(
        share, ciphertext=share.ciphertext[:-1] + bytes([share.ciphertext[-1] ^ 1])
    )
    with pytest.raises(CryptoError):
        group.users[4].on_shares([tampered])
    with pytest.raises(ProtocolError, match="delivered to"):
        group.users[5].on_shares([share])  # re-routed to another user
    # Honest delivery still works after the refusals.
    group.users[4].on_shares([share])
    assert msg.contribution in group.users[4].held


def test_unmasked_sum_is_the_only_plaintext() -> None:
    """The server's accumulator is uniform-looking; only the decoded buffer is the sum."""
    group = _group(d=11, k=2)
    server = group.server
    xs = [np.full(11, 5, np.uint64), np.full(11, 7, np.uint64)]
    for u, x in zip((1, 2), xs, strict=True):
        server.on_masked_upload(group.contribute(u, x), 1)
    acc = to_signed(server.masked_sum)
    assert not np.array_equal(acc, np.full(11, 12))
    res = group.collect(server.close_buffer(), range(7), server.on_aggregate_share)
    assert res is not None and res.total.tolist() == [12] * 11


def test_settled_buffer_leaves_no_share_behind_and_cannot_be_aggregated_again() -> None:
    """Users that were not asked (dropped, or U others answered first) forget their shares
    of a settled buffer, so memory stays bounded and no contribution is released twice."""
    group = _group()
    inputs = [(0, _vec(11, 9), 2), (5, _vec(11, 10), 7)]
    res = secure_weighted_sum(group, inputs, dropped=[1])  # only 4 of 6 asked users answer
    assert res is not None and res.total.tolist() == _ref(inputs)
    assert all(not u.held for u in group.users)  # the asked, the unasked and the dropped
    cids = res.contributions
    with pytest.raises(ProtocolError, match="already aggregated"):
        group.users[6].on_aggregate_request(AggregateRequest(SID, res.buffer_id + 1, cids, (1, 1)))
    # A failed buffer is settled too: nothing stays held.
    assert (
        secure_weighted_sum(group, [(2, _vec(11, 11), 1), (3, _vec(11, 12), 1)], range(4)) is None
    )
    assert all(not u.held for u in group.users)


def test_lazy_reduction_with_weights_near_p_matches_the_reference() -> None:
    """Weights close to p force the accumulator's overflow guard to reduce mid-buffer."""
    group = _group(k=2)
    inputs = [(0, _vec(11, 21), P - 2), (3, _vec(11, 22), P - 3), (5, _vec(11, 23), 2**31 + 5)]
    inputs += [(6, _vec(11, 24), 7), (1, _vec(11, 25), P - 1)]
    res = secure_weighted_sum(group, inputs, dropped=[2])
    assert res is not None and res.total.tolist() == _ref(inputs)
