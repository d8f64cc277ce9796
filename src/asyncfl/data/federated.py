"""The federated dataset container: one big tensor per split plus per-client offsets.

Every simulator and service component reads client data through :class:`FederatedDataset`.
Client ``k`` owns the contiguous rows ``[offsets[k], offsets[k + 1])`` of each split, so a
population of 100k+ clients costs two ``int64`` offset arrays rather than 100k Python
objects, and :meth:`FederatedDataset.client_train` is a zero-copy slice (a tensor view).

Two tasks are supported:

* ``"classification"``: ``y`` has shape ``(N,)`` with labels in ``[0, num_classes)``.
* ``"next_token"``: ``x`` and ``y`` are ``(N, T)`` int64 token ids and ``y[:, t]`` is the
  token that follows ``x[:, t]``; ``num_classes`` is the vocabulary size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from asyncfl.errors import DataError

__all__ = [
    "FederatedDataset",
    "Task",
    "from_client_arrays",
    "from_partition",
    "offsets_from_sizes",
    "split_counts",
    "split_train_test",
]

Task = Literal["classification", "next_token"]

ArrayLike = npt.NDArray[np.generic] | torch.Tensor


@dataclass(frozen=True, eq=False)
class FederatedDataset:
    """Per-client train and held-out data stored as contiguous row ranges.

    ``client_names`` is optional metadata (a writer id, ``play/role``); when given it has
    one entry per client. The constructor validates every invariant (see :meth:`validate`),
    so an instance that exists is consistent.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    train_offsets: npt.NDArray[np.int64]
    x_test: torch.Tensor
    y_test: torch.Tensor
    test_offsets: npt.NDArray[np.int64]
    num_classes: int
    input_shape: tuple[int, ...]
    task: Task
    client_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_clients(self) -> int:
        return int(self.train_offsets.shape[0]) - 1

    @property
    def train_sizes(self) -> npt.NDArray[np.int64]:
        """Number of training rows of every client (``int64``, length ``num_clients``)."""
        return np.diff(self.train_offsets)

    @property
    def test_sizes(self) -> npt.NDArray[np.int64]:
        """Number of held-out rows of every client (``int64``, length ``num_clients``)."""
        return np.diff(self.test_offsets)

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])

    def client_train(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``k``'s training rows ``(x, y)``, as views of the big tensors (no copy)."""
        lo, hi = self._bounds(self.train_offsets, k)
        return self.x_train[lo:hi], self.y_train[lo:hi]

    def client_test(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``k``'s held-out rows ``(x, y)``, as views of the big tensors (no copy)."""
        lo, hi = self._bounds(self.test_offsets, k)
        return self.x_test[lo:hi], self.y_test[lo:hi]

    def _bounds(self, offsets: npt.NDArray[np.int64], k: int) -> tuple[int, int]:
        if not 0 <= k < self.num_clients:
            raise IndexError(
                f"client index {k} out of range for dataset {self.name!r} with "
                f"{self.num_clients} clients; use 0 <= k < {self.num_clients}"
            )
        return int(offsets[k]), int(offsets[k + 1])

    def validate(self) -> None:
        """Check offsets, shapes, dtypes and label ranges; raise :class:`DataError` listing all
        problems found."""
        problems: list[str] = []
        if self.task not in ("classification", "next_token"):
            problems.append(f"task={self.task!r}; expected 'classification' or 'next_token'")
        if self.num_classes < 1:
            problems.append(f"num_classes={self.num_classes}; expected >= 1")
        for split, x, y, off in (
            ("train", self.x_train, self.y_train, self.train_offsets),
            ("test", self.x_test, self.y_test, self.test_offsets),
        ):
            problems.extend(self._check_split(split, x, y, off))
        if self.train_offsets.shape != self.test_offsets.shape:
            problems.append(
                f"train_offsets has {self.train_offsets.shape[0]} entries but test_offsets has "
                f"{self.test_offsets.shape[0]}; both need num_clients + 1"
            )
        if not problems and self.num_clients < 1:
            problems.append("dataset has no clients; offsets need at least 2 entries")
        if not problems and int(self.train_sizes.min()) < 1:
            empty = np.flatnonzero(self.train_sizes == 0)[:5].tolist()
            problems.append(f"clients {empty} have no training rows; every client needs >= 1")
        if self.client_names and len(self.client_names) != self.num_clients:
            problems.append(
                f"client_names has {len(self.client_names)} entries for {self.num_clients} clients"
            )
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise DataError(f"invalid FederatedDataset {self.name!r}:\n{lines}")

    def _check_split(
        self, split: str, x: torch.Tensor, y: torch.Tensor, off: npt.NDArray[np.int64]
    ) -> list[str]:
        problems: list[str] = []
        if off.ndim != 1 or off.dtype != np.int64:
            problems.append(
                f"{split}_offsets: {off.dtype} of shape {off.shape}; expected 1-D int64"
            )
            return problems
        if off.shape[0] < 1 or off[0] != 0 or off[-1] != x.shape[0]:
            problems.append(
                f"{split}_offsets must start at 0 and end at {x.shape[0]} (rows of x_{split})"
            )
        if off.shape[0] > 1 and bool(np.any(np.diff(off) < 0)):
            problems.append(f"{split}_offsets must be non-decreasing")
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            problems.append(
                f"x_{split} rows have shape {tuple(x.shape[1:])}; input_shape is {self.input_shape}"
            )
        if y.shape[0] != x.shape[0]:
            problems.append(f"y_{split} has {y.shape[0]} rows but x_{split} has {x.shape[0]}")
        if y.dtype != torch.int64:
            problems.append(f"y_{split} dtype is {y.dtype}; expected torch.int64")
        if self.task == "classification":
            if y.ndim != 1:
                problems.append(f"y_{split} shape {tuple(y.shape)}; classification needs (N,)")
            if x.dtype != torch.float32:
                problems.append(f"x_{split} dtype is {x.dtype}; classification needs float32")
        elif self.task == "next_token":
            if tuple(y.shape[1:]) != tuple(self.input_shape):
                problems.append(
                    f"y_{split} shape {tuple(y.shape)}; next_token needs (N, *{self.input_shape})"
                )
            if x.dtype != torch.int64:
                problems.append(f"x_{split} dtype is {x.dtype}; next_token needs int64 tokens")
            elif x.numel() and not (int(x.min()) >= 0 and int(x.max()) < self.num_classes):
                problems.append(f"x_{split} token ids outside [0, {self.num_classes})")
        if y.dtype == torch.int64 and y.numel():
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.num_classes:
                problems.append(
                    f"y_{split} values span [{lo}, {hi}]; expected [0, {self.num_classes})"
                )
        return problems


def _as_tensor(a: ArrayLike) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))


def offsets_from_sizes(sizes: Sequence[int] | npt.NDArray[np.integer]) -> npt.NDArray[np.int64]:
    """``[0, s0, s0 + s1, ...]``: the offsets of clients with the given row counts."""
    off = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(np.asarray(sizes, dtype=np.int64), out=off[1:])
    return off


def _concat(parts: Sequence[ArrayLike], what: str) -> torch.Tensor:
    if not parts:
        raise DataError(f"{what}: no clients given; pass one array per client")
    return torch.cat([_as_tensor(p) for p in parts], dim=0)


def from_client_arrays(
    name: str,
    xs_train: Sequence[ArrayLike],
    ys_train: Sequence[ArrayLike],
    xs_test: Sequence[ArrayLike],
    ys_test: Sequence[ArrayLike],
    *,
    num_classes: int,
    task: Task = "classification",
    client_names: Sequence[str] = (),
    input_shape: tuple[int, ...] | None = None,
) -> FederatedDataset:
    """Concatenate per-client arrays (numpy or torch) into a :class:`FederatedDataset`.

    ``input_shape`` defaults to the row shape of the first client's training array. Arrays
    are concatenated as given; convert dtypes (float32 features, int64 labels) beforehand.
    """
    counts = {len(xs_train), len(ys_train), len(xs_test), len(ys_test)}
    if len(counts) != 1:
        raise DataError(
            f"from_client_arrays({name!r}): got {len(xs_train)} x_train, {len(ys_train)} "
            f"y_train, {len(xs_test)} x_test and {len(ys_test)} y_test arrays; "
            "pass one of each per client"
        )
    x_train = _concat(xs_train, f"from_client_arrays({name!r})")
    shape = tuple(x_train.shape[1:]) if input_shape is None else tuple(input_shape)
    return FederatedDataset(
        name=name,
        x_train=x_train,
        y_train=_concat(ys_train, name),
        train_offsets=offsets_from_sizes([int(a.shape[0]) for a in xs_train]),
        x_test=_concat(xs_test, name),
        y_test=_concat(ys_test, name),
        test_offsets=offsets_from_sizes([int(a.shape[0]) for a in xs_test]),
        num_classes=num_classes,
        input_shape=shape,
        task=task,
        client_names=tuple(client_names),
    )


def split_counts(sizes: npt.NDArray[np.int64], test_fraction: float) -> npt.NDArray[np.int64]:
    """Held-out rows per client: ``round(test_fraction * n)`` clipped to ``[1, n - 1]``.

    The clip guarantees that a client with >= 2 examples keeps >= 1 train and >= 1 test
    example, however small or large ``test_fraction`` is; a client with one example keeps it
    for training (a client without training data could not participate at all).
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction={test_fraction}; expected 0 < test_fraction < 1")
    sizes = np.asarray(sizes, dtype=np.int64)
    # floor(v + 0.5) rounds halves up; np.rint's banker's rounding would make 0.5*n uneven.
    n_test = np.floor(test_fraction * sizes + 0.5).astype(np.int64)
    n_test = np.clip(n_test, 1, np.maximum(sizes - 1, 1))
    return np.where(sizes >= 2, n_test, 0).astype(np.int64)


def split_train_test(
    xs: Sequence[npt.NDArray[np.generic]],
    ys: Sequence[npt.NDArray[np.generic]],
    test_fraction: float,
    rng: np.random.Generator,
) -> tuple[
    list[npt.NDArray[np.generic]],
    list[npt.NDArray[np.generic]],
    list[npt.NDArray[np.generic]],
    list[npt.NDArray[np.generic]],
]:
    """Give every client a random held-out split; returns ``(xs_train, ys_train, xs_test,
    ys_test)``. Sizes follow :func:`split_counts`; rows are chosen by a per-client
    permutation drawn from ``rng``, and each part keeps the client's original row order."""
    if len(xs) != len(ys):
        raise DataError(f"split_train_test: {len(xs)} x arrays but {len(ys)} y arrays")
    sizes = np.array([a.shape[0] for a in xs], dtype=np.int64)
    for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if x.shape[0] != y.shape[0]:
            raise DataError(f"split_train_test: client {k} has {x.shape[0]} x rows, {y.shape[0]} y")
    n_test = split_counts(sizes, test_fraction)
    out: tuple[list[npt.NDArray[np.generic]], ...] = ([], [], [], [])
    for x, y, n, t in zip(xs, ys, sizes, n_test, strict=True):
        is_test = np.zeros(int(n), dtype=bool)
        is_test[rng.permutation(int(n))[: int(t)]] = True
        out[0].append(x[~is_test])
        out[1].append(y[~is_test])
        out[2].append(x[is_test])
        out[3].append(y[is_test])
    return out[0], out[1], out[2], out[3]


def from_partition(
    name: str,
    x: ArrayLike,
    y: ArrayLike,
    client_indices: Sequence[npt.NDArray[np.int64]],
    *,
    test_fraction: float,
    rng: np.random.Generator,
    num_classes: int,
    task: Task = "classification",
    client_names: Sequence[str] = (),
) -> FederatedDataset:
    """Build a dataset from pooled rows ``x, y`` and the row indices of each client, giving
    every client a random held-out split (sizes from :func:`split_counts`).

    Vectorised over clients (one sort of all rows), so it scales to 100k+ clients. Within
    each part a client's rows keep the order of ``client_indices[k]``.
    """
    if not client_indices:
        raise DataError(f"from_partition({name!r}): no clients given")
    xt, yt = _as_tensor(x), _as_tensor(y)
    if xt.shape[0] != yt.shape[0]:
        raise DataError(f"from_partition({name!r}): x has {xt.shape[0]} rows, y {yt.shape[0]}")
    sizes = np.array([len(ix) for ix in client_indices], dtype=np.int64)
    n_test = split_counts(sizes, test_fraction)
    order = np.concatenate([np.asarray(ix, dtype=np.int64) for ix in client_indices])
    if order.size and (order.min() < 0 or order.max() >= xt.shape[0]):
        raise DataError(f"from_partition({name!r}): indices outside [0, {xt.shape[0]})")
    client_of = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    start = offsets_from_sizes(sizes.tolist())[:-1]
    # Shuffle within each client by sorting on (client, random key): rank r of a row inside
    # its client is then a uniform random permutation, and rows with r < n_test are held out.
    perm = np.lexsort((rng.random(order.size), client_of))
    rank = np.empty(order.size, dtype=np.int64)
    rank[perm] = np.arange(order.size, dtype=np.int64) - start[client_of[perm]]
    is_test = rank < n_test[client_of]
    train_idx = torch.from_numpy(order[~is_test])
    test_idx = torch.from_numpy(order[is_test])
    return FederatedDataset(
        name=name,
        # index_select, not xt[idx]: same result, but advanced indexing pays a large
        # per-call threading overhead on a busy CPU.
        x_train=xt.index_select(0, train_idx),
        y_train=yt.index_select(0, train_idx),
        train_offsets=offsets_from_sizes((sizes - n_test).tolist()),
        x_test=xt.index_select(0, test_idx),
        y_test=yt.index_select(0, test_idx),
        test_offsets=offsets_from_sizes(n_test.tolist()),
        num_classes=num_classes,
        input_shape=tuple(xt.shape[1:]),
        task=task,
        client_names=tuple(client_names),
    )
