"""Shamir sharing over GF(2^127 - 1), cross-checked against references written differently."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from asyncfl.secure import shamir
from asyncfl.secure.shamir import PRIME


def _solve_mod_p(rows: list[list[int]], rhs: list[int]) -> list[int]:
    """Gauss–Jordan elimination mod p: an independent way to recover polynomial coefficients."""
    n = len(rows)
    a = [[*row, b] for row, b in zip(rows, rhs, strict=True)]
    for col in range(n):
        piv = next(r for r in range(col, n) if a[r][col] % PRIME)
        a[col], a[piv] = a[piv], a[col]
        inv = pow(a[col][col], PRIME - 2, PRIME)  # Fermat inverse, unlike pow(x, -1, p)
        a[col] = [v * inv % PRIME for v in a[col]]
        for r in range(n):
            if r != col and a[r][col]:
                f = a[r][col]
                a[r] = [(v - f * w) % PRIME for v, w in zip(a[r], a[col], strict=True)]
    return [a[r][n] for r in range(n)]


def test_shares_lie_on_one_degree_t_minus_1_polynomial_with_the_secret_at_zero() -> None:
    rng = random.Random(7)
    secrets = [rng.randrange(PRIME) for _ in range(3)]
    xs = [3, 8, 11, 12, 20, 41, 57]  # asymmetric x-coordinates
    t = 4
    shares = shamir.split_ints(secrets, xs, t, rng.randbytes)
    for c, secret in enumerate(secrets):
        # Recover the coefficients from the first t shares by solving the Vandermonde system.
        coeffs = _solve_mod_p(
            [[pow(s.x, j, PRIME) for j in range(t)] for s in shares[:t]],
            [s.ys[c] for s in shares[:t]],
        )
        assert coeffs[0] == secret
        # The remaining shares must be evaluations of the same polynomial (plain loop).
        for s in shares[t:]:
            assert s.ys[c] == sum(a * s.x**j for j, a in enumerate(coeffs)) % PRIME


def test_lagrange_coefficients_match_exact_rational_arithmetic() -> None:
    xs = [2, 5, 9, 14, 30]
    ours = shamir.lagrange_at_zero(xs)
    for i, xi in enumerate(xs):
        frac = Fraction(1)
        for j, xj in enumerate(xs):
            if j != i:
                frac *= Fraction(xj, xj - xi)
        ref = frac.numerator * pow(frac.denominator, -1, PRIME) % PRIME
        assert ours[i] == ref


@pytest.mark.parametrize("length", [1, 15, 16, 32, 33, 64])
def test_any_t_of_n_subset_reconstructs_bytes(length: int) -> None:
    rng = random.Random(length)
    secret = rng.randbytes(length)
    xs = list(range(1, 12))
    t = 5
    shares = shamir.split_bytes(secret, xs, t, rng.randbytes)
    for _ in range(10):
        subset = rng.sample(shares, rng.randint(t, len(shares)))
        assert shamir.combine_bytes(subset, t, length) == secret


def test_fewer_than_t_shares_are_refused_and_a_corrupted_share_is_detected() -> None:
    rng = random.Random(3)
    secret = rng.randbytes(32)
    shares = shamir.split_bytes(secret, [1, 2, 3, 4, 5], 3, rng.randbytes)
    with pytest.raises(ValueError, match="need t=3"):
        shamir.combine_bytes(shares[:2], 3, 32)
    bad = shamir.Share(
        shares[0].x, ((shares[0].ys[0] + rng.randrange(1, PRIME)) % PRIME, *shares[0].ys[1:])
    )
    # A randomly wrong share gives a random 127-bit chunk; it cannot fit in 15 bytes.
    with pytest.raises(ValueError, match="inconsistent"):
        shamir.combine_bytes([bad, *shares[1:3]], 3, 32)


def test_t_minus_1_shares_are_consistent_with_every_secret() -> None:
    # Perfect secrecy, concretely: for t - 1 shares and ANY candidate secret there is a
    # degree t - 1 polynomial through them, found by the elimination reference.
    rng = random.Random(11)
    shares = shamir.split_ints([rng.randrange(PRIME)], [4, 9, 13], 3, rng.randbytes)
    for candidate in (0, 1, rng.randrange(PRIME)):
        pts = [(0, candidate)] + [(s.x, s.ys[0]) for s in shares[:2]]
        coeffs = _solve_mod_p(
            [[pow(x, j, PRIME) for j in range(3)] for x, _ in pts], [y for _, y in pts]
        )
        assert coeffs[0] == candidate


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="distinct"):
        shamir.split_bytes(b"k", [1, 1, 2], 2)
    with pytest.raises(ValueError, match="x = 0"):
        shamir.split_bytes(b"k", [0, 1, 2], 2)
    with pytest.raises(ValueError, match="needs at least t"):
        shamir.split_bytes(b"k", [1, 2], 3)
    with pytest.raises(ValueError, match="not reduced"):
        shamir.Share.from_bytes(1, PRIME.to_bytes(16, "big"))
