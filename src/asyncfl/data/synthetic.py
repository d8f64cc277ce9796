"""FedProx Synthetic(alpha, beta) data (Li et al. 2020, "Federated Optimization in
Heterogeneous Networks", Sec. 5.1 and Appendix C.1).

For client ``k``::

    u_k ~ N(0, alpha),  B_k ~ N(0, beta)
    W_k ~ N(u_k, 1)  (C x d),   b_k ~ N(u_k, 1)  (C)
    v_k ~ N(B_k, 1)  (d)
    x ~ N(v_k, Sigma),  Sigma diagonal with Sigma_jj = j^-1.2  (j = 1..d)
    y = argmax softmax(W_k x + b_k)

``alpha`` controls how much the local models differ, ``beta`` how much the local inputs
differ. As in the authors' generator, ``alpha`` and ``beta`` are passed as the *scale*
(standard deviation) of the normal; for the paper's settings (0, 0.5, 1) this is what the
published data used. The IID variant (``iid=True``, the paper's "Synthetic-IID") uses one
shared ``W, b ~ N(0, 1)`` and ``v_k = 0`` for every client.

Client sizes are heavy-tailed: ``min_size + floor(LogNormal(size_mean, size_sigma))``.
Randomness is derived from ``(seed, purpose, client)``, so client ``k``'s data does not
change when ``num_clients`` changes.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from asyncfl.data.federated import FederatedDataset, from_client_arrays, split_train_test
from asyncfl.data.partition import lognormal_sizes
from asyncfl.errors import DataError

__all__ = ["synthetic_fedprox"]

# Purpose tags for derived random streams (seed, purpose[, client]).
_SIZES, _GLOBAL, _CLIENT, _SPLIT = 0, 1, 2, 3


def synthetic_fedprox(
    num_clients: int = 100,
    alpha: float = 1.0,
    beta: float = 1.0,
    dim: int = 60,
    num_classes: int = 10,
    size_mean: float = 4.0,
    size_sigma: float = 1.0,
    min_size: int = 10,
    test_fraction: float = 0.2,
    seed: int = 0,
    *,
    iid: bool = False,
) -> FederatedDataset:
    """Generate FedProx Synthetic(alpha, beta) (or Synthetic-IID) as a FederatedDataset with
    float32 features of shape ``(dim,)`` and int64 labels in ``[0, num_classes)``."""
    problems = []
    if num_clients < 1:
        problems.append(f"num_clients={num_clients} (need >= 1)")
    if alpha < 0 or beta < 0:
        problems.append(f"alpha={alpha}, beta={beta} (need >= 0)")
    if dim < 1 or num_classes < 2:
        problems.append(f"dim={dim}, num_classes={num_classes} (need dim >= 1, classes >= 2)")
    if min_size < 2:
        problems.append(f"min_size={min_size} (need >= 2 so every client has a test example)")
    if seed < 0:
        problems.append(f"seed={seed} (need >= 0)")
    if problems:
        raise DataError("synthetic_fedprox: " + "; ".join(problems))

    sizes = lognormal_sizes(
        num_clients, size_mean, size_sigma, min_size, np.random.default_rng([seed, _SIZES])
    )
    std_x = np.arange(1, dim + 1, dtype=np.float64) ** (-1.2 / 2)  # sqrt of Sigma_jj
    g = np.random.default_rng([seed, _GLOBAL])
    shared_w = g.normal(0.0, 1.0, (num_classes, dim))
    shared_b = g.normal(0.0, 1.0, num_classes)

    xs: list[npt.NDArray[np.float32]] = []
    ys: list[npt.NDArray[np.int64]] = []
    for k in range(num_clients):
        r = np.random.default_rng([seed, _CLIENT, k])
        if iid:
            w, b, v = shared_w, shared_b, np.zeros(dim)
        else:
            u_k = r.normal(0.0, alpha)
            big_b_k = r.normal(0.0, beta)
            w = r.normal(u_k, 1.0, (num_classes, dim))
            b = r.normal(u_k, 1.0, num_classes)
            v = r.normal(big_b_k, 1.0, dim)
        x = v + r.standard_normal((int(sizes[k]), dim)) * std_x
        # softmax is monotone, so its argmax is the argmax of the logits.
        y = np.argmax(x @ w.T + b, axis=1)
        xs.append(x.astype(np.float32))
        ys.append(y.astype(np.int64))

    xs_tr, ys_tr, xs_te, ys_te = split_train_test(
        xs, ys, test_fraction, np.random.default_rng([seed, _SPLIT])
    )
    tag = "iid" if iid else f"{alpha:g}_{beta:g}"
    return from_client_arrays(
        f"synthetic_{tag}",
        xs_tr,
        ys_tr,
        xs_te,
        ys_te,
        num_classes=num_classes,
        task="classification",
        input_shape=(dim,),
    )
