"""Tests of asyncfl.models: shapes, reference parameter counts, seeding, causality, errors."""

from __future__ import annotations

import pytest
import torch

from asyncfl.errors import ConfigError
from asyncfl.models import MODEL_NAMES, CharLSTM, FemnistCNN, LogisticRegression, build_model


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "input_shape", "classes", "x", "out_shape"),
    [
        ("logistic", (64,), 10, torch.rand(5, 64), (5, 10)),
        ("mlp", (60,), 10, torch.rand(3, 60), (3, 10)),
        ("mlp", (1, 28, 28), 62, torch.rand(2, 1, 28, 28), (2, 62)),
        ("cnn", (1, 28, 28), 62, torch.rand(4, 1, 28, 28), (4, 62)),
        ("lstm", (80,), 81, torch.randint(0, 81, (3, 80)), (3, 80, 81)),
    ],
)
def test_output_shapes(
    name: str, input_shape: tuple[int, ...], classes: int, x: torch.Tensor, out_shape: tuple[int]
) -> None:
    model = build_model(name, input_shape, classes, width="small", lstm_hidden=16)  # type: ignore[arg-type]
    assert tuple(model(x).shape) == out_shape


def test_leaf_cnn_and_lstm_have_the_reference_sizes() -> None:
    # LEAF FEMNIST CNN, counted by hand: conv 1->32 (5x5) + conv 32->64 (5x5) + 7*7*64 -> 2048
    # + 2048 -> 62, each with biases.
    expected_cnn = (
        (25 * 32 + 32) + (25 * 32 * 64 + 64) + (7 * 7 * 64 * 2048 + 2048) + (2048 * 62 + 62)
    )
    assert expected_cnn == 6_603_710
    assert _count(build_model("cnn", (1, 28, 28), 62)) == expected_cnn
    # LEAF Shakespeare LSTM: embedding 81x8, LSTM layers with 4 gates (W_ih, W_hh and two bias
    # vectors each), head 256 -> 81.
    gates = 4 * 256
    expected_lstm = (
        81 * 8 + (gates * (8 + 256) + 2 * gates) + (gates * 512 + 2 * gates) + (256 * 81 + 81)
    )
    assert _count(build_model("lstm", (80,), 81)) == expected_lstm


def test_logistic_regression_is_one_affine_map() -> None:
    model = build_model("logistic", (2, 3), 4, seed=1)
    assert isinstance(model, LogisticRegression)
    x = torch.arange(12, dtype=torch.float32).reshape(2, 2, 3) / 7.0
    w, b = model.linear.weight, model.linear.bias
    expected = torch.stack([w @ x[i].reshape(-1) + b for i in range(2)])
    torch.testing.assert_close(model(x), expected)


def test_mlp_hidden_widths() -> None:
    model = build_model("mlp", (10,), 3, hidden=(7, 5))
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(7, 10), (7,), (5, 7), (5,), (3, 5), (3,)]


def test_cnn_small_width_is_smaller() -> None:
    small = build_model("cnn", (1, 28, 28), 62, width="small")
    assert isinstance(small, FemnistCNN)
    assert _count(small) < _count(build_model("cnn", (1, 28, 28), 62)) / 20


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_seeded_init_is_reproducible_and_leaves_global_rng(name: str) -> None:
    shape = {"cnn": (1, 12, 12), "lstm": (6,)}.get(name, (9,))
    kw = {"width": "small", "lstm_hidden": 8}
    before = torch.random.get_rng_state()
    a = build_model(name, shape, 5, seed=7, **kw)  # type: ignore[arg-type]
    b = build_model(name, shape, 5, seed=7, **kw)  # type: ignore[arg-type]
    c = build_model(name, shape, 5, seed=8, **kw)  # type: ignore[arg-type]
    assert torch.equal(torch.random.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_lstm_is_causal() -> None:
    model = build_model("lstm", (12,), 81, lstm_hidden=16, seed=0)
    assert isinstance(model, CharLSTM)
    x = torch.randint(0, 81, (2, 12), generator=torch.Generator().manual_seed(0))
    changed = x.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 81
    with torch.no_grad():
        out, out2 = model(x), model(changed)
    # Logits at position t see tokens 0..t only.
    assert torch.equal(out[:, :6], out2[:, :6])
    assert not torch.equal(out[:, 6:], out2[:, 6:])


def test_bad_arguments_are_all_reported() -> None:
    with pytest.raises(ConfigError) as err:
        build_model("resnet", (), 1, seed=-1)  # type: ignore[arg-type]
    paths = {p.path for p in err.value.problems}
    assert paths == {"model.name", "model.input_shape", "model.num_classes", "model.seed"}
    assert "one of ['logistic', 'mlp', 'cnn', 'lstm']" in str(err.value)


@pytest.mark.parametrize(
    ("name", "shape", "kw", "field"),
    [
        ("cnn", (64,), {}, "model.input_shape"),
        ("cnn", (1, 28, 28), {"width": "huge"}, "model.width"),
        ("lstm", (1, 28, 28), {}, "model.input_shape"),
        ("lstm", (80,), {"lstm_layers": 0}, "model.lstm_layers"),
        ("mlp", (10,), {"hidden": (8, 0)}, "model.hidden"),
    ],
)
def test_bad_sizes_name_the_field(
    name: str, shape: tuple[int, ...], kw: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError) as err:
        build_model(name, shape, 10, **kw)  # type: ignore[arg-type]
    assert field in {p.path for p in err.value.problems}


def test_public_names_resolve() -> None:
    import asyncfl.data
    import asyncfl.models

    for module in (asyncfl.data, asyncfl.models):
        assert sorted(set(module.__all__)) == sorted(module.__all__)
        assert all(hasattr(module, name) for name in module.__all__)
    assert set(MODEL_NAMES) == {"logistic", "mlp", "cnn", "lstm"}
