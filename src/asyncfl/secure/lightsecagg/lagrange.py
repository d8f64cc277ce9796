"""Lagrange coding of masks (LightSecAgg, So et al., MLSys 2022, §4.1, eq. (4)-(6)).

User ``i`` cuts its mask ``z_i`` into ``U - T`` pieces, appends ``T`` pieces of fresh uniform
randomness (never zeros: those pieces are what hides the mask from ``T`` colluders), and views
the ``U`` pieces as the values at ``beta_1..beta_U`` of the unique polynomial ``f_i`` of
degree ``< U``. The coded share for user ``j`` is ``[z_i]_j = f_i(alpha_j)``:

    [z_i]_j = sum_k L_k(alpha_j) piece_k,   L_k(x) = prod_{l != k} (x - beta_l)/(beta_k - beta_l)

Coding is linear, so ``sum_i w_i [z_i]_j`` is the share of ``sum_i w_i z_i`` and ANY ``U``
aggregated shares determine the aggregate polynomial; its values at ``beta_1..beta_{U-T}``
are the aggregate mask (one-shot recovery, however many users dropped).

Privacy (the "algebraic check" of the tests): for ``T`` users ``J``, given the data pieces the
map from the padding to ``(f(alpha_j))_{j in J}`` is the ``T x T`` block of the encoding matrix
on the padding columns. It is invertible: a polynomial of degree ``< U`` that is zero at
``beta_1..beta_{U-T}`` is ``prod_k (x - beta_k) g(x)`` with ``deg g < T``, and ``g`` is fixed
by its ``T`` values at distinct ``alpha_j`` (where the product is non-zero). So uniform padding
makes the ``T`` shares uniform whatever the mask is.

Points: ``beta_k = k`` (k = 1..U) and ``alpha_j = U + 1 + j`` for user ``j = 0..N-1``; all
distinct in ``F_p`` because ``N + U < p``. The basis is evaluated in barycentric form
``L_k(x) = ell(x) w_k / (x - beta_k)`` with ``ell(x) = prod_l (x - beta_l)`` and
``w_k = 1 / prod_{l != k} (beta_k - beta_l)``, vectorised over all ``(x, k)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from asyncfl.secure.lightsecagg.field import FieldVector, P, check_field, inv, matmul, mulmod
from asyncfl.secure.lightsecagg.params import LightSecAggParams

__all__ = ["LagrangeCode", "lagrange_matrix"]


def lagrange_matrix(nodes: Sequence[int], points: Sequence[int]) -> FieldVector:
    """``M[j, k] = L_k(points[j])`` over ``nodes``: ``f(points) = M @ f(nodes)`` for every
    polynomial of degree ``< len(nodes)``. Nodes must be distinct, and no point a node."""
    b = np.asarray([x % P for x in nodes], dtype=np.uint64)
    x = np.asarray([v % P for v in points], dtype=np.uint64)
    if len(set(b.tolist())) != b.size:
        raise ValueError(f"Lagrange nodes must be distinct mod p, got {list(nodes)[:10]}")
    if set(x.tolist()) & set(b.tolist()):
        raise ValueError("an evaluation point coincides with a node; use disjoint point sets")
    p = np.uint64(P)
    # diff[j, k] = x_j - b_k mod p (non-zero), node_diff[k, l] = b_k - b_l (1 on the diagonal).
    diff = (x[:, None] + p - b[None, :]) % p
    node_diff = (b[:, None] + p - b[None, :]) % p
    np.fill_diagonal(node_diff, 1)
    ell = np.ones(x.size, dtype=np.uint64)
    denom = np.ones(b.size, dtype=np.uint64)
    for k in range(b.size):
        ell = mulmod(ell, diff[:, k])
        denom = mulmod(denom, node_diff[:, k])
    weights = inv(denom)
    return mulmod(mulmod(ell[:, None], weights[None, :]), inv(diff))


class LagrangeCode:
    """Encoder/decoder for one :class:`LightSecAggParams` (encoding matrix built once)."""

    def __init__(self, params: LightSecAggParams) -> None:
        self.params = params
        u, n = params.target_survivors, params.num_users
        self.betas = tuple(range(1, u + 1))
        self.alphas = tuple(range(u + 1, u + 1 + n))
        self.encoding = lagrange_matrix(self.betas, self.alphas)  # N x U
        self.encoding.flags.writeable = False

    def pieces(self, mask: FieldVector, padding: FieldVector) -> FieldVector:
        """The ``U x m`` matrix of pieces: the mask cut into ``U - T`` rows (zero-filled to
        ``(U - T) m``), then the ``T`` padding rows."""
        prm = self.params
        m = prm.piece_len
        check_field(mask, (prm.dim,), "mask")
        check_field(padding, (prm.privacy_threshold, m), "padding")
        out = np.zeros((prm.target_survivors, m), dtype=np.uint64)
        out.reshape(-1)[: prm.dim] = mask
        out[prm.data_pieces :] = padding
        return out

    def encode(self, mask: FieldVector, padding: FieldVector) -> FieldVector:
        """``N x m``: row ``j`` is the coded share ``[z]_j`` for user ``j``."""
        return matmul(self.encoding, self.pieces(mask, padding))

    def decoding_matrix(self, users: Sequence[int]) -> FieldVector:
        """``(U - T) x U`` matrix taking the shares of ``users`` to the data pieces."""
        prm = self.params
        if len(users) != prm.target_survivors or len(set(users)) != len(users):
            raise ValueError(
                f"decoding needs exactly U={prm.target_survivors} distinct users, got {users}"
            )
        if not all(0 <= j < prm.num_users for j in users):
            raise ValueError(f"user ids {list(users)} outside [0, {prm.num_users})")
        return lagrange_matrix([self.alphas[j] for j in users], self.betas[: prm.data_pieces])

    def decode(self, users: Sequence[int], shares: FieldVector) -> FieldVector:
        """The length-``d`` vector whose coded shares at ``users`` are the rows of ``shares``."""
        prm = self.params
        check_field(shares, (prm.target_survivors, prm.piece_len), "shares")
        pieces = matmul(self.decoding_matrix(users), shares)
        return np.ascontiguousarray(pieces.reshape(-1)[: prm.dim])
