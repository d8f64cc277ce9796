"""FEMNIST (LEAF, Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings"): handwritten
digits and letters from NIST Special Database 19, one client per writer, 62 classes.

Reads the project's ``femnist_sf005.npz`` sample (see ``shared/data/README.md``): arrays
``x_train``/``x_test`` (uint8, 28x28, LEAF's dark-ink-on-light convention), labels
``y_*`` and writer ids ``writer_*``. Each writer with training rows becomes a client; its
held-out rows are LEAF's per-writer test rows, or, for a writer without any, a random
``test_fraction`` of its training rows. Pixels are inverted to MNIST's convention (ink
bright, background 0) and scaled to [0, 1].
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from asyncfl.data.federated import FederatedDataset, offsets_from_sizes, split_counts
from asyncfl.errors import DataError

__all__ = ["FEMNIST_CLASSES", "load_femnist"]

FEMNIST_CLASSES = 62
_KEYS = ("x_train", "y_train", "writer_train", "x_test", "y_test", "writer_test")


def _read(path: Path) -> dict[str, npt.NDArray[np.generic]]:
    if not path.is_file():
        raise DataError(
            f"FEMNIST file {path} not found; point the loader at femnist_sf005.npz from the "
            "project's shared data folder (shared/data/femnist/), or use another dataset"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _KEYS if k not in npz.files]
            if missing:
                raise DataError(f"FEMNIST file {path} lacks arrays {missing}; expected {_KEYS}")
            arrays = {k: np.asarray(npz[k]) for k in _KEYS}
            if "writer_names" in npz.files:
                arrays["writer_names"] = np.asarray(npz["writer_names"])
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read FEMNIST file {path}: {exc}") from exc
    for split in ("train", "test"):
        x, y, w = arrays[f"x_{split}"], arrays[f"y_{split}"], arrays[f"writer_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],) or w.shape != y.shape:
            raise DataError(
                f"FEMNIST file {path}: x_{split} {x.shape}, y_{split} {y.shape}, "
                f"writer_{split} {w.shape}; expected (N, 28, 28), (N,), (N,)"
            )
    return arrays


def _images(x: npt.NDArray[np.generic]) -> torch.Tensor:
    # Invert: LEAF stores ink dark (0) on white (255); MNIST-style models expect ink bright.
    inverted = (255.0 - x.astype(np.float32)) / 255.0
    return torch.from_numpy(inverted[:, None, :, :])


def load_femnist(
    path: Path,
    *,
    max_clients: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> FederatedDataset:
    """Load FEMNIST with one client per writer (input_shape ``(1, 28, 28)``, 62 classes).

    ``max_clients`` keeps a random subset of writers chosen by ``seed`` (in writer order);
    ``test_fraction`` and ``seed`` also split writers that have no LEAF test rows.
    """
    a = _read(Path(path))
    w_tr = a["writer_train"].astype(np.int64)
    w_te = a["writer_test"].astype(np.int64)
    writers = np.unique(w_tr)
    rng = np.random.default_rng(seed)
    if max_clients is not None:
        if max_clients < 1:
            raise DataError(f"max_clients={max_clients}; expected >= 1 or None")
        if max_clients < writers.size:
            writers = np.sort(rng.choice(writers, size=max_clients, replace=False))

    # Rows of each kept writer, grouped by writer (stable sort keeps the file's row order).
    tr_rows = np.argsort(w_tr, kind="stable")
    tr_rows = tr_rows[np.isin(w_tr[tr_rows], writers)]
    te_rows = np.argsort(w_te, kind="stable")
    te_rows = te_rows[np.isin(w_te[te_rows], writers)]
    tr_sizes = np.searchsorted(w_tr[tr_rows], writers, side="right") - np.searchsorted(
        w_tr[tr_rows], writers, side="left"
    )
    te_sizes = np.searchsorted(w_te[te_rows], writers, side="right") - np.searchsorted(
        w_te[te_rows], writers, side="left"
    )

    # Rows index a pool of all train rows followed by all test rows, so each split is one
    # gather (index_select: cheaper than advanced indexing on a busy multi-thread CPU).
    n_pool_train = int(w_tr.shape[0])
    train_parts: list[npt.NDArray[np.int64]] = []
    test_parts: list[npt.NDArray[np.int64]] = []
    moved = split_counts(tr_sizes, test_fraction)
    tr_start = te_start = 0
    for n_tr, n_te, n_move in zip(tr_sizes, te_sizes, moved, strict=True):
        rows = tr_rows[tr_start : tr_start + n_tr]
        own_test = te_rows[te_start : te_start + n_te] + n_pool_train
        tr_start += n_tr
        te_start += n_te
        if n_te == 0 and n_move > 0:
            # A writer without LEAF test rows gives up a random part of its training rows.
            pick = np.zeros(n_tr, dtype=bool)
            pick[rng.permutation(n_tr)[:n_move]] = True
            train_parts.append(rows[~pick])
            test_parts.append(rows[pick])
        else:
            train_parts.append(rows)
            test_parts.append(own_test)

    x_pool = torch.cat([_images(a["x_train"]), _images(a["x_test"])])
    y_pool = torch.from_numpy(np.concatenate([a["y_train"], a["y_test"]]).astype(np.int64))
    train_idx = torch.from_numpy(np.concatenate(train_parts).astype(np.int64))
    test_idx = torch.from_numpy(np.concatenate(test_parts).astype(np.int64))
    names = a.get("writer_names")
    client_names = tuple(
        str(names[w]) if names is not None and w < names.shape[0] else str(w) for w in writers
    )
    return FederatedDataset(
        name="femnist",
        x_train=x_pool.index_select(0, train_idx),
        y_train=y_pool.index_select(0, train_idx),
        train_offsets=offsets_from_sizes([p.size for p in train_parts]),
        x_test=x_pool.index_select(0, test_idx),
        y_test=y_pool.index_select(0, test_idx),
        test_offsets=offsets_from_sizes([p.size for p in test_parts]),
        num_classes=FEMNIST_CLASSES,
        input_shape=(1, 28, 28),
        task="classification",
        client_names=client_names,
    )
