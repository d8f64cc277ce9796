"""Pooled array datasets (sklearn digits, Fashion-MNIST) split over clients by label skew.

Neither dataset has natural clients, so clients are made with the Dirichlet label partition
of Hsu et al. 2019 (see :mod:`asyncfl.data.partition`), then each client's rows are split
into train and held-out parts (:func:`asyncfl.data.federated.split_counts`).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import numpy.typing as npt

from asyncfl.data.federated import FederatedDataset, from_partition
from asyncfl.data.partition import dirichlet_label_partition
from asyncfl.errors import DataError

__all__ = [
    "FASHION_MNIST_DIR",
    "digits_dirichlet",
    "dirichlet_dataset",
    "fashion_mnist_dirichlet",
    "read_idx",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the IDX files."""

# IDX type byte -> big-endian numpy dtype (LeCun's MNIST file format).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def dirichlet_dataset(
    name: str,
    x: npt.NDArray[np.floating],
    y: npt.NDArray[np.integer],
    num_clients: int,
    alpha: float,
    test_fraction: float = 0.2,
    seed: int = 0,
    *,
    num_classes: int | None = None,
    min_size: int = 2,
) -> FederatedDataset:
    """Partition pooled ``(x, y)`` over clients with ``Dir(alpha)`` label skew and give each
    client a held-out split. ``x`` is stored as float32, ``y`` as int64; ``num_classes``
    defaults to ``max(y) + 1``."""
    if x.shape[0] != y.shape[0]:
        raise DataError(f"dirichlet_dataset({name!r}): x has {x.shape[0]} rows, y {y.shape[0]}")
    if min_size < 2:
        raise DataError(f"min_size={min_size}; need >= 2 so every client has a test example")
    labels = np.asarray(y, dtype=np.int64)
    rng = np.random.default_rng(seed)
    parts = dirichlet_label_partition(labels, num_clients, alpha, rng, min_size=min_size)
    return from_partition(
        name,
        np.ascontiguousarray(x, dtype=np.float32),
        labels,
        parts,
        test_fraction=test_fraction,
        rng=rng,
        num_classes=int(labels.max()) + 1 if num_classes is None else num_classes,
    )


def digits_dirichlet(
    num_clients: int = 10, alpha: float = 0.5, test_fraction: float = 0.2, seed: int = 0
) -> FederatedDataset:
    """sklearn's 1,797 8x8 digits scaled to [0, 1] (input_shape ``(64,)``, 10 classes)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / 16.0  # pixel intensities are 0..16
    y = np.asarray(bunch.target, dtype=np.int64)
    return dirichlet_dataset(
        "digits", x, y, num_clients, alpha, test_fraction, seed, num_classes=10
    )


def read_idx(path: Path) -> npt.NDArray[np.generic]:
    """Read one (optionally gzipped) IDX file into a native-endian numpy array."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes but header {dims} implies {expected}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def fashion_mnist_dirichlet(
    num_clients: int = 100,
    alpha: float = 0.5,
    test_fraction: float = 0.2,
    seed: int = 0,
    *,
    root: Path = FASHION_MNIST_DIR,
) -> FederatedDataset:
    """Fashion-MNIST (train and test pooled, 70k images) with Dirichlet label skew.

    Images are float32 in [0, 1] with shape ``(1, 28, 28)``; 10 classes. The original
    train/test boundary is not kept: each client's held-out rows come from its own pool.
    """
    names = {
        "train_x": "train-images-idx3-ubyte.gz",
        "train_y": "train-labels-idx1-ubyte.gz",
        "test_x": "t10k-images-idx3-ubyte.gz",
        "test_y": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [n for n in names.values() if not (root / n).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST files {missing} not found in {root}; install the Debian package "
            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass root="
        )
    arrays = {k: read_idx(root / n) for k, n in names.items()}
    x = np.concatenate([arrays["train_x"], arrays["test_x"]])
    y = np.concatenate([arrays["train_y"], arrays["test_y"]])
    if x.ndim != 3 or x.shape[0] != y.shape[0]:
        raise DataError(f"Fashion-MNIST in {root}: images {x.shape} and labels {y.shape} differ")
    images = (x.astype(np.float32) / 255.0)[:, None, :, :]
    return dirichlet_dataset(
        "fashion_mnist", images, y, num_clients, alpha, test_fraction, seed, num_classes=10
    )
