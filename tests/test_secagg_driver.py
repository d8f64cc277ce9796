"""End-to-end SecAgg / SecAgg+ rounds through the in-process driver, with dropouts."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncfl.secure.fixedpoint import FixedPointCodec, Rounding
from asyncfl.secure.secagg.config import SecAggConfig, Stage
from asyncfl.secure.secagg.driver import run_secagg_round
from asyncfl.secure.secagg.graph import SecAggPlusParams

D = 5


@st.composite
def _round(draw: st.DrawFn) -> tuple[SecAggConfig, dict[Stage, set[int]], int]:
    n = draw(st.integers(2, 7))
    ids = draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n, unique=True))
    ring_bits = draw(st.sampled_from([16, 32, 62, 64]))
    sid = draw(st.binary(min_size=16, max_size=16))
    if draw(st.booleans()) and n >= 5:
        params = SecAggPlusParams(2, 2, 0.0, 0.0, complete=False)  # degree-2 ring graph
        rng = np.random.default_rng(draw(st.integers(0, 2**32)))
        cfg = SecAggConfig.secagg_plus(ids, D, params, rng, ring_bits, sid)
    else:
        t = draw(st.integers(1, n))
        cfg = SecAggConfig.secagg(ids, D, t, ring_bits, sid)
    drops = {s: set(draw(st.lists(st.sampled_from(ids), max_size=2))) for s in Stage}
    return cfg, drops, draw(st.integers(0, 2**32))


@settings(max_examples=40, deadline=None)
@given(_round())
def test_sum_is_exact_or_round_fails_cleanly(
    case: tuple[SecAggConfig, dict[Stage, set[int]], int],
) -> None:
    cfg, drops, seed = case
    rng = np.random.default_rng(seed)
    ring = cfg.ring
    inputs = {
        u: ring.reduce(rng.integers(0, 2**63, D, dtype=np.uint64).astype(ring.dtype))
        for u in cfg.clients
    }
    res = run_secagg_round(inputs, cfg, drops, seed=seed)
    ever_dropped = set().union(
        *(drops[s] for s in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT))
    )
    if res.ok:
        assert res.sum is not None and res.failure is None
        # Survivors are exactly the clients that sent a masked input.
        assert res.survivors <= cfg.clients - ever_dropped
        assert len(res.survivors) >= cfg.threshold
        # Reference: Python-int sum modulo 2^k.
        ref = [sum(int(inputs[u][i]) for u in res.survivors) % ring.modulus for i in range(D)]
        assert res.sum.tolist() == ref
    else:
        assert res.sum is None and res.survivors == frozenset()
        assert res.failure
    alive = cfg.clients - ever_dropped - drops[Stage.UNMASKING]
    if cfg.threshold <= len(alive) and all(
        len(cfg.holders(u) & alive) >= cfg.threshold for u in cfg.clients
    ):
        assert res.ok, res.failure  # enough live holders everywhere: the round must succeed


def test_weighted_float_mean_through_secagg_matches_float64_reference() -> None:
    rng = np.random.default_rng(5)
    codec = FixedPointCodec(1.0, 20, 62, Rounding.STOCHASTIC)
    ids = [3, 8, 21, 40, 41, 77]
    weights = {3: 5, 8: 120, 21: 1, 40: 33, 41: 2, 77: 9}
    vecs = {u: rng.normal(0.1 * u / 77, 0.5, 300).astype(np.float32) for u in ids}
    cfg = SecAggConfig.secagg(ids, 300, 4, ring_bits=62)
    inputs = {u: codec.encode(vecs[u], weights[u], rng) for u in ids}
    res = run_secagg_round(inputs, cfg, {Stage.MASKED_INPUT: {21}, Stage.UNMASKING: {40}})
    assert res.sum is not None and res.survivors == frozenset(ids) - {21}
    total = sum(weights[u] for u in res.survivors)
    mean = codec.decode_sum(res.sum, total)
    ref = sum(weights[u] * np.clip(vecs[u].astype(np.float64), -1, 1) for u in res.survivors)
    assert np.abs(mean - ref / total).max() <= codec.error_bound(total)


def test_accounting_is_reported() -> None:
    cfg = SecAggConfig.secagg(range(4), 10, 3)
    inputs = {u: np.full(10, u, dtype=np.uint32) for u in range(4)}
    res = run_secagg_round(inputs, cfg, {Stage.SHARE_KEYS: {2}}, seed=1)
    assert res.sum is not None and res.sum.tolist() == [4] * 10  # 0 + 1 + 3
    assert res.bytes_up[2] > 0 and res.bytes_up[0] > res.bytes_up[2]
    assert res.bytes_up[0] >= 24 + 40  # at least the masked vector, bit-packed
    assert set(res.client_seconds) == set(Stage) and set(res.server_seconds) == set(Stage)


def test_all_but_one_dropped_fails_without_a_sum() -> None:
    cfg = SecAggConfig.secagg(range(5), 4, 3)
    inputs = {u: np.full(4, 7, dtype=np.uint32) for u in range(5)}
    for stage in Stage:
        res = run_secagg_round(inputs, cfg, {stage: {0, 1, 2, 3}})
        assert not res.ok and res.sum is None and "threshold" in (res.failure or "")
