"""Partitioners that turn a pooled dataset into a non-IID client population.

* :func:`dirichlet_label_partition`: label-skew partition of Hsu, Qi & Brown 2019
  ("Measuring the Effects of Non-Identical Data Distribution for Federated Visual
  Classification", Sec. 3): for every class ``c`` draw ``p_c ~ Dir(alpha * 1_K)`` over the
  ``K`` clients and deal class ``c``'s examples out in those proportions. Small ``alpha``
  gives each client few classes; ``alpha -> inf`` approaches an IID split.
* :func:`lognormal_sizes`: heavy-tailed client sizes as in the FedProx synthetic data
  (Li et al. 2020, Sec. 5.1, whose generator draws sizes from a lognormal).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from asyncfl.errors import DataError

__all__ = ["dirichlet_label_partition", "lognormal_sizes"]


def dirichlet_label_partition(
    labels: npt.NDArray[np.integer],
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 2,
    max_tries: int = 100,
) -> list[npt.NDArray[np.int64]]:
    """Split example indices over ``num_clients`` with per-class ``Dir(alpha)`` proportions.

    The whole draw is repeated until every client holds at least ``min_size`` examples
    (rejection sampling keeps the Dirichlet law conditioned on that event, unlike ad-hoc
    rebalancing); after ``max_tries`` failures a :class:`DataError` says what to change.
    Returns one sorted ``int64`` index array per client; every index appears exactly once.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be 1-D; got shape {labels.shape}")
    if num_clients < 1:
        raise DataError(f"num_clients={num_clients}; expected >= 1")
    if not alpha > 0.0:
        raise DataError(f"alpha={alpha}; the Dirichlet concentration must be > 0")
    if min_size < 0 or max_tries < 1:
        raise DataError(f"min_size={min_size}, max_tries={max_tries}; need >= 0 and >= 1")
    n = labels.shape[0]
    if num_clients * min_size > n:
        raise DataError(
            f"{num_clients} clients x min_size {min_size} needs {num_clients * min_size} "
            f"examples but only {n} exist; use fewer clients or a smaller min_size"
        )
    classes, class_of = np.unique(labels, return_inverse=True)
    by_class = [np.flatnonzero(class_of == c) for c in range(classes.size)]
    concentration = np.full(num_clients, alpha, dtype=np.float64)
    for _ in range(max_tries):
        owner = np.empty(n, dtype=np.int64)
        for idx in by_class:
            p = rng.dirichlet(concentration)
            # Cut points at the cumulative proportions; the last cut is n_c so every example
            # of the class is dealt out exactly once.
            cuts = np.floor(np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            counts = np.diff(np.concatenate(([0], cuts, [idx.size])))
            owner[rng.permutation(idx)] = np.repeat(np.arange(num_clients), counts)
        sizes = np.bincount(owner, minlength=num_clients)
        if int(sizes.min()) >= min_size:
            order = np.argsort(owner, kind="stable")  # stable: indices ascend within a client
            return np.split(order, np.cumsum(sizes)[:-1])
    raise DataError(
        f"dirichlet_label_partition: no draw in {max_tries} tries gave all {num_clients} "
        f"clients >= {min_size} examples (alpha={alpha}, {n} examples); raise alpha, use "
        "fewer clients, lower min_size or raise max_tries"
    )


def lognormal_sizes(
    num_clients: int,
    mean: float,
    sigma: float,
    min_size: int,
    rng: np.random.Generator,
) -> npt.NDArray[np.int64]:
    """Client sizes ``min_size + floor(LogNormal(mean, sigma))`` (``mean``/``sigma`` of the
    underlying normal), the heavy-tailed size law of the FedProx synthetic generator."""
    if num_clients < 1:
        raise DataError(f"num_clients={num_clients}; expected >= 1")
    if sigma < 0 or min_size < 1:
        raise DataError(f"sigma={sigma}, min_size={min_size}; need sigma >= 0, min_size >= 1")
    draws = rng.lognormal(mean=mean, sigma=sigma, size=num_clients)
    return (min_size + np.floor(draws)).astype(np.int64)
