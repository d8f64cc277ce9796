"""ParamSpec, local training and evaluation against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asyncfl.core.params import ParamSpec
from asyncfl.data.federated import from_client_arrays
from asyncfl.models.registry import build_model
from asyncfl.training.config import ClientConfig
from asyncfl.training.evaluate import evaluate, top_fraction_mean
from asyncfl.training.flat_sgd import FlatSGD
from asyncfl.training.local import LocalTrainer


def test_paramspec_round_trip_and_layout() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    spec = ParamSpec.from_module(model)
    # num_batches_tracked is an integer buffer and is not part of the vector.
    assert spec.names == (
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
    )
    assert spec.dim == 6 + 2 + 2 + 2 + 2 + 2
    vec = np.arange(spec.dim, dtype=np.float32) * 0.5 - 3
    state = spec.unflatten(vec)
    assert state["0.weight"].shape == (2, 3) and state["0.weight"][1, 0].item() == vec[3]
    np.testing.assert_array_equal(spec.flatten(state), vec)
    spec.load_into(model, vec)
    np.testing.assert_array_equal(spec.flatten(model.state_dict()), vec)
    with pytest.raises(ValueError, match="spec needs"):
        spec.unflatten(vec[:-1])


def _manual_sgd(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, bs: int, lr: float
) -> None:
    """Reference: plain SGD written out with autograd.grad and explicit parameter arithmetic."""
    params = list(model.parameters())
    for s in range(0, len(perm), bs):
        idx = perm[s : s + bs]
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= lr * g


def test_local_training_delta_is_start_minus_end() -> None:
    torch.manual_seed(0)
    x = torch.randn(23, 5)
    y = torch.randint(0, 3, (23,))
    model = build_model("mlp", (5,), 3, hidden=(4,), seed=1)
    reference = build_model("mlp", (5,), 3, hidden=(4,), seed=1)
    trainer = LocalTrainer(model, ClientConfig(epochs=2, batch_size=7, lr=0.3))
    start = trainer.current()
    res = trainer.train(start, x, y, seed=42)
    gen = torch.Generator().manual_seed(42)
    perms = [torch.randperm(23, generator=gen) for _ in range(2)]
    ParamSpec.from_module(reference).load_into(reference, start)
    for perm in perms:
        _manual_sgd(reference, x, y, perm, 7, 0.3)
    end = ParamSpec.from_module(reference).flatten(reference.state_dict())
    np.testing.assert_allclose(res.delta, start - end, rtol=1e-5, atol=1e-6)
    assert res.steps == 2 * 4 and res.examples_processed == 46 and res.num_examples == 23
    # Training again from the same start with the same seed is bit-identical.
    again = trainer.train(start, x, y, seed=42)
    np.testing.assert_array_equal(again.delta, res.delta)


def test_local_training_fixed_steps_and_empty_client() -> None:
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    trainer = LocalTrainer(
        build_model("logistic", (5,), 3, seed=0), ClientConfig(steps=7, batch_size=4)
    )
    res = trainer.train(trainer.current(), x, y, seed=0)
    assert res.steps == 7 and res.examples_processed == 4 + 4 + 2 + 4 + 4 + 2 + 4
    empty = trainer.train(trainer.current(), x[:0], y[:0], seed=0)
    assert empty.steps == 0 and not empty.delta.any()


def test_evaluate_per_client_against_loop() -> None:
    rng = np.random.default_rng(3)
    sizes = [5, 1, 9, 3]
    xs = [rng.normal(size=(n, 4)).astype(np.float32) for n in sizes]
    ys = [rng.integers(0, 3, n) for n in sizes]
    data = from_client_arrays("t", xs, ys, xs, ys, num_classes=3)
    model = build_model("logistic", (4,), 3, seed=2)
    ev = evaluate(model, data, batch_size=4)  # batches straddle client boundaries
    with torch.no_grad():
        for k in range(4):
            logits = model(torch.from_numpy(xs[k]))
            target = torch.from_numpy(ys[k]).long()
            loss = torch.nn.functional.cross_entropy(logits, target).item()
            acc = (logits.argmax(1) == target).double().mean().item()
            assert ev.client_loss[k] == pytest.approx(loss, rel=1e-6)
            assert ev.client_accuracy[k] == pytest.approx(acc)
    all_loss = sum(ev.client_loss[k] * n for k, n in enumerate(sizes)) / sum(sizes)
    assert ev.loss == pytest.approx(all_loss, rel=1e-6)


def test_top_fraction_mean() -> None:
    values = np.array([0.1, 0.9, 0.5, np.nan, 0.3])
    sizes = np.array([10, 40, 40, 100, 5])
    assert top_fraction_mean(values, sizes, 1.0) == pytest.approx((0.1 + 0.9 + 0.5 + 0.3) / 4)
    # Top 25% of the 4 valid clients: 1 client; tie on size 40 broken by id -> client 1.
    assert top_fraction_mean(values, sizes, 0.25) == pytest.approx(0.9)
    assert top_fraction_mean(values, sizes, 0.5) == pytest.approx(0.7)
    assert math.isnan(top_fraction_mean(np.array([np.nan]), np.array([1]), 1.0))


def _torch_sgd_reference(
    start: np.ndarray,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    cfg: ClientConfig,
) -> np.ndarray:
    """Reference: a fresh model and a fresh torch.optim.SGD, the same minibatch order."""
    ref = build_model("mlp", (5,), 3, hidden=(4,), seed=9)
    ParamSpec.from_module(ref).load_into(ref, start)
    opt = torch.optim.SGD(
        ref.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    gen = torch.Generator().manual_seed(seed)
    n = int(y.shape[0])
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ref(x[idx]), y[idx]).backward()
            opt.step()
    return ParamSpec.from_module(ref).flatten(ref.state_dict())


def test_fused_flat_sgd_matches_torch_sgd_with_momentum_and_decay() -> None:
    torch.manual_seed(3)
    x, y = torch.randn(29, 5) * torch.tensor([1.0, -2.0, 0.5, 3.0, 0.1]), torch.randint(0, 3, (29,))
    cfg = ClientConfig(epochs=3, batch_size=6, lr=0.11, momentum=0.7, weight_decay=0.03)
    trainer = LocalTrainer(build_model("mlp", (5,), 3, hidden=(4,), seed=1), cfg)
    assert isinstance(trainer._optimizer, FlatSGD)  # the fused path is what this tests
    start = trainer.current()
    # Two clients in a row: the momentum buffer must not leak from one to the next, and a
    # caller resetting the gradients (model.zero_grad sets them to None) must not matter.
    for seed, (xs, ys) in [(5, (x, y)), (6, (x[:17] * 2, y[:17]))]:
        res = trainer.train(start, xs, ys, seed=seed)
        end = _torch_sgd_reference(start, xs, ys, seed, cfg)
        np.testing.assert_allclose(res.delta, start - end, rtol=1e-5, atol=1e-6)
        trainer.model.zero_grad()


def test_flat_sgd_refuses_params_that_do_not_tile_the_vector() -> None:
    flat = torch.zeros(10)
    a = torch.nn.Parameter(torch.zeros(2, 3))
    a.data = flat[:6].view(2, 3)
    with pytest.raises(ValueError, match="tile"):
        FlatSGD([a], flat, lr=0.1)  # 4 values of flat belong to no parameter
    with pytest.raises(ValueError, match="not a view"):
        FlatSGD([torch.nn.Parameter(torch.zeros(10))], flat, lr=0.1)


def test_model_with_buffers_falls_back_to_torch_sgd() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3)
    )
    trainer = LocalTrainer(model, ClientConfig(epochs=1, batch_size=8, lr=0.1))
    assert isinstance(trainer._optimizer, torch.optim.SGD)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    res = trainer.train(trainer.current(), x, y, seed=0)
    assert res.steps == 2 and np.abs(res.delta).sum() > 0
