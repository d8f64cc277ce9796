"""LightSecAgg's field, Lagrange coding and privacy of coded mask shares.

References are independent: plain-Python integer loops for products, Vandermonde elimination
plus Horner evaluation for interpolation, Gaussian elimination mod p for ranks.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from scipy import stats  # type: ignore[import-untyped]

from asyncfl.errors import ConfigError
from asyncfl.secure.fixedpoint import Rounding
from asyncfl.secure.lightsecagg import field
from asyncfl.secure.lightsecagg.codec import FieldCodec
from asyncfl.secure.lightsecagg.field import P, inv, matmul, random_elements, to_signed
from asyncfl.secure.lightsecagg.lagrange import LagrangeCode, lagrange_matrix
from asyncfl.secure.lightsecagg.params import LightSecAggParams

# -- independent references (plain Python ints) ---------------------------------------------


def _ref_matmul(a: np.ndarray, b: np.ndarray) -> list[list[int]]:
    return [
        [sum(int(a[i, k]) * int(b[k, j]) for k in range(a.shape[1])) % P for j in range(b.shape[1])]
        for i in range(a.shape[0])
    ]


def _solve_mod(rows: list[list[int]], rhs: list[int]) -> list[int]:
    """Gauss-Jordan elimination mod p of a square non-singular system."""
    n = len(rows)
    m = [[*r, v] for r, v in zip(rows, rhs, strict=True)]
    for c in range(n):
        piv = next(r for r in range(c, n) if m[r][c] % P)
        m[c], m[piv] = m[piv], m[c]
        f = pow(m[c][c], P - 2, P)
        m[c] = [x * f % P for x in m[c]]
        for r in range(n):
            if r != c and m[r][c]:
                g = m[r][c]
                m[r] = [(x - g * y) % P for x, y in zip(m[r], m[c], strict=True)]
    return [m[r][n] for r in range(n)]


def _rank_mod(rows: list[list[int]]) -> int:
    m = [list(r) for r in rows]
    rank, cols = 0, len(m[0]) if m else 0
    for c in range(cols):
        piv = next((r for r in range(rank, len(m)) if m[r][c] % P), None)
        if piv is None:
            continue
        m[rank], m[piv] = m[piv], m[rank]
        f = pow(m[rank][c], P - 2, P)
        m[rank] = [x * f % P for x in m[rank]]
        for r in range(len(m)):
            if r != rank and m[r][c]:
                g = m[r][c]
                m[r] = [(x - g * y) % P for x, y in zip(m[r], m[rank], strict=True)]
        rank += 1
    return rank


def _interpolate_eval(nodes: list[int], values: list[int], x: int) -> int:
    """Coefficients by Vandermonde elimination, evaluated by Horner."""
    vander = [[pow(b, e, P) for e in range(len(nodes))] for b in nodes]
    coef = _solve_mod(vander, values)
    acc = 0
    for c in reversed(coef):
        acc = (acc * x + c) % P
    return acc


def _entropy(seed: int) -> field.Entropy:
    return random.Random(seed).randbytes


# -- field ------------------------------------------------------------------------------------


def test_field_modulus_is_prime_and_below_2_32() -> None:
    assert P < 2**32 and (P - 1) ** 2 + P < 2**64
    # Deterministic Miller-Rabin: these bases decide primality below 3.3e24.
    d, s = P - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        x = pow(a, d, P)
        assert x in (1, P - 1) or any(pow(x, 2**r, P) == P - 1 for r in range(1, s))


def test_matmul_matches_python_ints_including_extremes() -> None:
    rng = np.random.default_rng(3)
    a = rng.integers(0, P, (5, 9), dtype=np.uint64)
    b = rng.integers(0, P, (9, 4), dtype=np.uint64)
    a[0, :] = P - 1  # the largest limbs everywhere in one row: worst-case float64 sums
    b[:, 0] = P - 1
    np.testing.assert_array_equal(matmul(a, b), np.array(_ref_matmul(a, b), dtype=np.uint64))
    with pytest.raises(ValueError, match="align"):
        matmul(a, a)


def test_inverse_and_signed_lift() -> None:
    x = np.array([1, 2, 5, 12345, P - 1, P // 2], dtype=np.uint64)
    np.testing.assert_array_equal(inv(x), [pow(int(v), P - 2, P) for v in x])
    np.testing.assert_array_equal(field.mulmod(x, inv(x)), np.ones(6, np.uint64))
    with pytest.raises(ZeroDivisionError):
        inv(np.array([3, 0], dtype=np.uint64))
    lifted = to_signed(np.array([0, 7, P - 7, P // 2, P // 2 + 1], dtype=np.uint64))
    assert lifted.tolist() == [0, 7, -7, P // 2, P // 2 + 1 - P]


def test_random_elements_rejects_words_above_p(monkeypatch: pytest.MonkeyPatch) -> None:
    batches = [
        np.array([P, 3, P + 4, 9], dtype=np.uint64),  # two words >= p: redrawn
        np.array([2**32 - 1, 11], dtype=np.uint64),  # one still >= p: redrawn again
        np.array([13], dtype=np.uint64),
    ]
    seen: list[int] = []

    def fake(n: int, entropy: field.Entropy) -> np.ndarray:
        seen.append(n)
        return batches.pop(0)

    monkeypatch.setattr(field, "_keystream_words", fake)
    assert random_elements(4).tolist() == [13, 3, 11, 9]
    assert seen == [4, 2, 1]


def test_random_elements_are_uniform() -> None:
    x = random_elements(64_000, _entropy(1))
    assert int(x.max()) < P
    counts = np.bincount((x * 64 // P).astype(np.int64), minlength=64)
    # Chi-square goodness of fit, 63 dof, significance 0.001 (seeded: deterministic).
    assert stats.chisquare(counts).pvalue > 1e-3


# -- Lagrange coding ---------------------------------------------------------------------------


def test_lagrange_matrix_matches_vandermonde_reference() -> None:
    nodes, points = [1, 2, 4, 9], [5, 11, 3, 1000, P - 2]
    rng = random.Random(5)
    values = [rng.randrange(P) for _ in nodes]
    m = lagrange_matrix(nodes, points)
    got = matmul(m, np.array([values], dtype=np.uint64).T)[:, 0]
    assert got.tolist() == [_interpolate_eval(nodes, values, x) for x in points]
    with pytest.raises(ValueError, match="coincides"):
        lagrange_matrix(nodes, [2])
    with pytest.raises(ValueError, match="distinct"):
        lagrange_matrix([1, 1], [3])


@pytest.mark.parametrize(("n", "t", "u", "d"), [(6, 1, 4, 13), (7, 3, 5, 20), (5, 2, 3, 1)])
def test_shares_are_the_polynomial_and_any_u_decode(n: int, t: int, u: int, d: int) -> None:
    prm = LightSecAggParams(n, t, u, d)
    code = LagrangeCode(prm)
    mask = random_elements(d, _entropy(d))
    padding = random_elements(t * prm.piece_len, _entropy(d + 1)).reshape(t, -1)
    shares = code.encode(mask, padding)
    pieces = code.pieces(mask, padding)
    # Each coordinate of each share is the interpolating polynomial at alpha_j.
    for col in {0, prm.piece_len - 1}:
        vals = [int(v) for v in pieces[:, col]]
        ref = [_interpolate_eval(list(code.betas), vals, a) for a in code.alphas]
        assert shares[:, col].tolist() == ref
    for users in itertools.combinations(range(n), u):
        order = list(reversed(users))  # decoding must not depend on the order of answers
        np.testing.assert_array_equal(code.decode(order, shares[order]), mask)


def test_params_validate_every_problem() -> None:
    with pytest.raises(ConfigError) as exc:
        LightSecAggParams(num_users=1, privacy_threshold=0, target_survivors=3, dim=0)
    fields = {p.path for p in exc.value.problems}
    assert fields == {"num_users", "privacy_threshold", "target_survivors", "dim"}
    prm = LightSecAggParams.from_fractions(20, 0.25, 0.5, dim=10)
    assert (prm.privacy_threshold, prm.target_survivors, prm.piece_len) == (5, 10, 2)


# -- privacy of T coded shares -----------------------------------------------------------------


@pytest.mark.parametrize(("n", "t", "u"), [(6, 2, 4), (7, 3, 5), (5, 1, 2)])
def test_any_t_shares_are_independent_of_the_mask_algebraically(n: int, t: int, u: int) -> None:
    """For every set J of T users the padding -> shares_J block is invertible, so for ANY two
    masks each view of J has exactly one padding per mask: equally likely under both."""
    prm = LightSecAggParams(n, t, u, dim=u - t)  # one coordinate per piece
    code = LagrangeCode(prm)
    enc = [[int(v) for v in row] for row in code.encoding]
    rng = random.Random(n * 100 + t)
    for users in itertools.combinations(range(n), t):
        block = [[enc[j][k] for k in range(u - t, u)] for j in users]
        assert _rank_mod(block) == t
        z1 = [rng.randrange(P) for _ in range(u - t)]
        z2 = [rng.randrange(P) for _ in range(u - t)]
        pad1 = [rng.randrange(P) for _ in range(t)]
        view = [
            sum(enc[j][k] * v for k, v in enumerate(z1 + pad1)) % P for j in users
        ]  # what J holds of mask z1
        data2 = [sum(enc[j][k] * z2[k] for k in range(u - t)) % P for j in users]
        pad2 = _solve_mod(block, [(v - w) % P for v, w in zip(view, data2, strict=True)])
        got = code.encode(
            np.array(z2, dtype=np.uint64), np.array([pad2], dtype=np.uint64).T.reshape(t, 1)
        )
        assert got[list(users), 0].tolist() == view
    # Control: U shares determine every piece, mask included (hence T < U is required).
    assert _rank_mod([enc[j] for j in range(u)]) == u


def _joint_chi2(a: np.ndarray, b: np.ndarray, bins: int = 16) -> float:
    cells = (a * bins // P).astype(np.int64) * bins + (b * bins // P).astype(np.int64)
    return float(stats.chisquare(np.bincount(cells, minlength=bins * bins)).pvalue)


def test_t_colluders_shares_are_uniform_statistically() -> None:
    """T = 2 colluders' joint shares of a FIXED, structured mask, over fresh paddings, pass a
    chi-square test of uniformity on 16 x 16 cells (255 dof) at significance 0.001; the same
    test rejects zero padding (the broken construction), so it can fail."""
    prm = LightSecAggParams(num_users=6, privacy_threshold=2, target_survivors=4, dim=2 * 8192)
    code = LagrangeCode(prm)
    mask = (np.arange(prm.dim, dtype=np.uint64) * 7919) % np.uint64(1000)  # far from uniform
    padding = random_elements(2 * prm.piece_len, _entropy(11)).reshape(2, -1)
    shares = code.encode(mask, padding)
    assert _joint_chi2(shares[1], shares[4]) > 1e-3
    broken = code.encode(mask, np.zeros_like(padding))
    assert _joint_chi2(broken[1], broken[4]) < 1e-6


# -- fixed point into the field ------------------------------------------------------------------


def test_field_codec_weighted_sum_within_bound_and_headroom() -> None:
    codec = FieldCodec(clip=0.5, frac_bits=16)
    rng = np.random.default_rng(8)
    xs = [rng.normal(0, 0.3, 50).astype(np.float32) for _ in range(4)]
    ws = [3, 1, 7, 2]
    acc = np.zeros(50, dtype=np.uint64)
    for x, w in zip(xs, ws, strict=True):
        acc = (acc + codec.encode(x, rng) * np.uint64(w)) % np.uint64(P)
    mean = codec.decode_field_sum(acc, sum(ws))
    ref = sum(w * np.clip(x.astype(np.float64), -0.5, 0.5) for x, w in zip(xs, ws, strict=True))
    assert np.abs(mean - ref / sum(ws)).max() <= codec.error_bound(sum(ws))
    assert codec.max_total_weight() == ((P - 1) // 2) // (1 << 15)
    with pytest.raises(ConfigError, match="total_weight"):
        codec.check_total_weight(codec.max_total_weight() + 1)
    with pytest.raises(ConfigError, match="frac_bits"):
        FieldCodec(clip=1.0, frac_bits=31)
    nearest = FieldCodec(clip=1.0, frac_bits=8, rounding=Rounding.NEAREST)
    assert nearest.encode(np.array([-1.0, 0.25], np.float32)).tolist() == [P - 256, 64]
