"""Server optimizers vs independent references: a float64 per-coordinate loop and torch.optim."""

from __future__ import annotations

import math
import tracemalloc
from typing import Any, get_args

import numpy as np
import pytest
import torch

from asyncfl.core.server_opt import (
    ServerOptimizerConfig,
    ServerOptimizerName,
    make_server_optimizer,
)
from asyncfl.errors import ConfigError

NAMES: tuple[ServerOptimizerName, ...] = get_args(ServerOptimizerName)
DIM = 7
STEPS = 5
# Per-coordinate magnitudes spanning four decades, so a bug that mixes coordinates or drops a
# scale factor cannot hide behind symmetric data.
SCALES = np.array([1e-3, 0.02, 0.3, 1.0, 4.0, 12.0, 0.7])
TOL = 60 * 2.0**-24  # float32 vs float64, relative to a coordinate's scale (see below)


def _problem(seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    x0 = (rng.standard_normal(DIM) * SCALES * 3).astype(np.float32)
    # Step-dependent scale and mixed signs; coordinate 2 flips sign every step.
    grads = []
    for t in range(STEPS):
        g = rng.standard_normal(DIM) * SCALES * (1.0 + 0.5 * t)
        g[2] = (-1) ** t * (0.4 + 0.1 * t)
        grads.append(g.astype(np.float32))
    return x0, grads


def _reference(
    cfg: ServerOptimizerConfig, x0: np.ndarray, grads: list[np.ndarray]
) -> tuple[list[float], list[float]]:
    """Reddi et al. Alg. 2 / FedAvgM, coordinate by coordinate in float64.

    Returns the final parameters and, per coordinate, |x0| plus the sum of the step sizes
    computed on |g| (the scale against which float32 rounding errors are measured).
    """
    name, lr, tau = cfg.name, cfg.lr, cfg.tau
    acc = tau * tau if cfg.initial_accumulator is None else cfg.initial_accumulator
    x = [float(v) for v in x0]
    scale = [abs(v) for v in x]
    m = [0.0] * DIM
    m_abs = [0.0] * DIM
    v = [acc] * DIM
    for t, g_vec in enumerate(grads, start=1):
        for i in range(DIM):
            g = float(g_vec[i])
            if name == "sgd":
                x[i] -= lr * g
                scale[i] += lr * abs(g)
            elif name == "momentum":
                beta = cfg.momentum
                m[i] = beta * m[i] + g
                m_abs[i] = beta * m_abs[i] + abs(g)
                if cfg.nesterov:
                    x[i] -= lr * (g + beta * m[i])
                    scale[i] += lr * (abs(g) + beta * m_abs[i])
                else:
                    x[i] -= lr * m[i]
                    scale[i] += lr * m_abs[i]
            else:
                b1, b2 = cfg.beta1, cfg.beta2
                m[i] = b1 * m[i] + (1 - b1) * g
                m_abs[i] = b1 * m_abs[i] + (1 - b1) * abs(g)
                if name == "adam":
                    v[i] = b2 * v[i] + (1 - b2) * g * g
                elif name == "yogi":
                    diff = v[i] - g * g
                    sign = (diff > 0) - (diff < 0)
                    v[i] = v[i] - (1 - b2) * g * g * sign
                else:
                    v[i] = v[i] + g * g
                m_hat, v_hat = m[i], v[i]
                m_abs_hat = m_abs[i]
                if cfg.bias_correction:
                    m_hat /= 1 - b1**t
                    m_abs_hat /= 1 - b1**t
                    v_hat /= 1 - b2**t
                x[i] -= lr * m_hat / (math.sqrt(v_hat) + tau)
                scale[i] += lr * m_abs_hat / (math.sqrt(v_hat) + tau)
    return x, scale


def _run(cfg: ServerOptimizerConfig, x0: np.ndarray, grads: list[np.ndarray]) -> np.ndarray:
    opt = make_server_optimizer(cfg, DIM)
    x = x0
    for g in grads:
        x = opt.step(x, g)
    assert opt.steps == len(grads)
    return x


CONFIGS = [
    ServerOptimizerConfig("sgd", lr=0.7),
    ServerOptimizerConfig("momentum", lr=0.3, momentum=0.8),
    ServerOptimizerConfig("momentum", lr=0.3, momentum=0.8, nesterov=True),
    ServerOptimizerConfig("adam", lr=0.05, beta1=0.85, beta2=0.97, tau=1e-2),
    ServerOptimizerConfig("adam", lr=0.05, beta1=0.85, beta2=0.97, tau=1e-2, bias_correction=True),
    ServerOptimizerConfig("yogi", lr=0.05, beta1=0.85, beta2=0.97, tau=1e-2),
    ServerOptimizerConfig("yogi", lr=0.05, beta1=0.0, beta2=0.9, tau=1e-3, initial_accumulator=0.5),
    ServerOptimizerConfig("yogi", lr=0.05, beta1=0.9, beta2=0.97, tau=1e-2, bias_correction=True),
    ServerOptimizerConfig("adagrad", lr=0.1, beta1=0.0, tau=1e-3),
    ServerOptimizerConfig("adagrad", lr=0.1, beta1=0.6, tau=1e-2, initial_accumulator=0.0),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
def test_matches_float64_reference_loop(cfg: ServerOptimizerConfig) -> None:
    # A step is ~12 float32 roundings (u = 2**-24) of terms bounded by `scale`, so 5 steps stay
    # within 60u of the scale (observed: <= 3.2u over 20 seeds). A wrong formula is off by O(1).
    x0, grads = _problem(seed=1)
    got = _run(cfg, x0, grads)
    assert got.dtype == np.float32
    want, scale = _reference(cfg, x0, grads)
    err = np.abs(got.astype(np.float64) - np.array(want))
    assert np.all(err <= TOL * np.array(scale)), (err, scale)
    assert not np.allclose(got, x0, rtol=1e-3)  # the steps actually moved the model


def test_yogi_differs_from_adam_and_adagrad() -> None:
    # Guards the reference test above against configs where the three v rules coincide.
    x0, grads = _problem(seed=2)
    common: dict[str, Any] = {"lr": 0.05, "beta1": 0.85, "beta2": 0.97, "tau": 1e-2}
    out = {n: _run(ServerOptimizerConfig(n, **common), x0, grads) for n in ("adam", "yogi")}
    out["adagrad"] = _run(ServerOptimizerConfig("adagrad", lr=0.05, beta1=0.85), x0, grads)
    for a, b in [("adam", "yogi"), ("yogi", "adagrad"), ("adam", "adagrad")]:
        assert np.max(np.abs(out[a] - out[b])) > 1e-4, (a, b)


def _torch_run(
    opt_factory: type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
    x0: np.ndarray,
    grads: list[np.ndarray],
) -> np.ndarray:
    p = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float64))
    opt = opt_factory([p], **kwargs)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach().numpy()


TORCH_CASES: list[tuple[ServerOptimizerConfig, type[torch.optim.Optimizer], dict[str, Any]]] = [
    (ServerOptimizerConfig("sgd", lr=0.7), torch.optim.SGD, {"lr": 0.7}),
    (
        ServerOptimizerConfig("momentum", lr=0.3, momentum=0.8),
        torch.optim.SGD,
        {"lr": 0.3, "momentum": 0.8, "dampening": 0.0},
    ),
    (
        ServerOptimizerConfig("momentum", lr=0.3, momentum=0.8, nesterov=True),
        torch.optim.SGD,
        {"lr": 0.3, "momentum": 0.8, "dampening": 0.0, "nesterov": True},
    ),
    # Classical Adagrad (beta1 = 0) is torch's Adagrad with eps = tau and accumulator tau².
    (
        ServerOptimizerConfig("adagrad", lr=0.1, beta1=0.0, tau=1e-2),
        torch.optim.Adagrad,
        {"lr": 0.1, "eps": 1e-2, "initial_accumulator_value": 1e-4, "lr_decay": 0.0},
    ),
    # Bias-corrected FedAdam from v = 0 is Kingma & Ba's Adam with eps = tau.
    (
        ServerOptimizerConfig(
            "adam",
            lr=0.05,
            beta1=0.85,
            beta2=0.97,
            tau=1e-2,
            initial_accumulator=0.0,
            bias_correction=True,
        ),
        torch.optim.Adam,
        {"lr": 0.05, "betas": (0.85, 0.97), "eps": 1e-2},
    ),
]


@pytest.mark.parametrize(
    ("cfg", "factory", "kwargs"),
    TORCH_CASES,
    ids=["sgd", "momentum", "nesterov", "adagrad", "adam-bias-corrected"],
)
def test_matches_torch_optim_where_mathematically_equal(
    cfg: ServerOptimizerConfig,
    factory: type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
) -> None:
    # Same bound as the loop reference: float32 vs float64, relative to the coordinate scale.
    x0, grads = _problem(seed=3)
    got = _run(cfg, x0, grads)
    want = _torch_run(factory, kwargs, x0, grads)
    _, scale = _reference(cfg, x0, grads)
    assert np.all(np.abs(got - want) <= TOL * np.array(scale))


def test_fedavg_lr1_gives_mean_of_client_end_models() -> None:
    start = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    ends = [np.array([3.0, 0.0, 0.5]), np.array([0.0, -4.0, 1.5]), np.array([1.5, 1.0, -2.0])]
    pseudo = np.mean([start - e for e in ends], axis=0).astype(np.float32)
    opt = make_server_optimizer(ServerOptimizerConfig("sgd", lr=1.0), 3)
    np.testing.assert_allclose(opt.step(start, pseudo), np.mean(ends, axis=0), rtol=0, atol=1e-6)


def test_yogi_v_shrinks_when_above_g2_and_grows_when_below() -> None:
    b2 = 0.9
    # coordinate 0: v=1 > g²=0.25 -> v - 0.1*0.25; coordinate 1: v=1 < g²=4 -> v + 0.1*4;
    # coordinate 2: v = g² = 1 -> unchanged (sign 0).
    cfg = ServerOptimizerConfig("yogi", lr=0.1, beta1=0.0, beta2=b2, initial_accumulator=1.0)
    opt = make_server_optimizer(cfg, 3)
    g = np.array([0.5, -2.0, 1.0], dtype=np.float32)
    x = opt.step(np.zeros(3, dtype=np.float32), g)
    v = opt.state_dict()["v"]
    assert isinstance(v, np.ndarray)
    np.testing.assert_allclose(v, [0.975, 1.4, 1.0], rtol=1e-6)
    # Adam would have moved every v towards g²: 0.925, 1.3, 1.0.
    adam = make_server_optimizer(
        ServerOptimizerConfig("adam", beta1=0.0, beta2=b2, initial_accumulator=1.0), 3
    )
    adam.step(np.zeros(3, dtype=np.float32), g)
    np.testing.assert_allclose(adam.state_dict()["v"], [0.925, 1.3, 1.0], rtol=1e-6)
    want_x = [
        -0.1 * gi / (math.sqrt(vi) + 1e-3) for gi, vi in zip(g, [0.975, 1.4, 1.0], strict=True)
    ]
    np.testing.assert_allclose(x, want_x, rtol=1e-6)
    # Starting from v = tau² (< g²), Yogi grows v by (1-b2)·g² exactly as Adagrad would scale it.
    opt2 = make_server_optimizer(ServerOptimizerConfig("yogi", beta1=0.0, beta2=b2), 3)
    opt2.step(np.zeros(3, dtype=np.float32), g)
    np.testing.assert_allclose(
        opt2.state_dict()["v"], 1e-6 + 0.1 * g.astype(np.float64) ** 2, rtol=1e-6
    )


def test_step_does_not_mutate_inputs_and_returns_new_array() -> None:
    x0, grads = _problem()
    for name in NAMES:
        opt = make_server_optimizer(ServerOptimizerConfig(name, lr=0.1), DIM)
        x, g = x0.copy(), grads[0].copy()
        out = opt.step(x, g)
        assert out is not x and not np.shares_memory(out, x)
        np.testing.assert_array_equal(x, x0)
        np.testing.assert_array_equal(g, grads[0])


def test_state_keys_and_initial_accumulator() -> None:
    def keys(**kw: object) -> set[str]:
        return set(make_server_optimizer(ServerOptimizerConfig(**kw), DIM).state_dict())  # type: ignore[arg-type]

    assert keys(name="sgd") == {"steps"}
    assert keys(name="momentum") == {"steps", "m"}
    assert keys(name="adam") == {"steps", "m", "v"}
    assert keys(name="adagrad", beta1=0.0) == {"steps", "v"}  # m == g, nothing to keep
    v = make_server_optimizer(ServerOptimizerConfig("adam", tau=0.02), DIM).state_dict()["v"]
    np.testing.assert_array_equal(v, np.full(DIM, np.float32(0.02**2)))
    v = make_server_optimizer(
        ServerOptimizerConfig("yogi", initial_accumulator=0.3), DIM
    ).state_dict()["v"]
    np.testing.assert_array_equal(v, np.full(DIM, np.float32(0.3)))


@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
def test_state_dict_round_trip_resumes_bit_for_bit(cfg: ServerOptimizerConfig) -> None:
    x0, grads = _problem(seed=4)
    a = make_server_optimizer(cfg, DIM)
    x = x0
    for g in grads[:3]:
        x = a.step(x, g)
    saved = a.state_dict()
    b = make_server_optimizer(cfg, DIM)
    b.load_state_dict(saved)
    assert b.steps == 3
    # The saved dict is a copy: scribbling on it changes nothing.
    for value in saved.values():
        if isinstance(value, np.ndarray):
            value[:] = 123.0
    xa, xb = x, x.copy()
    for g in grads[3:]:
        xa, xb = a.step(xa, g), b.step(xb, g)
    np.testing.assert_array_equal(xa, xb)
    for key, value in a.state_dict().items():
        np.testing.assert_array_equal(value, b.state_dict()[key])


def test_load_state_dict_rejects_bad_state_without_change() -> None:
    cfg = ServerOptimizerConfig("adam", lr=0.1)
    opt = make_server_optimizer(cfg, DIM)
    x0, grads = _problem()
    opt.step(x0, grads[0])
    before = opt.state_dict()
    good = make_server_optimizer(cfg, DIM).state_dict()
    m = np.ones(DIM, dtype=np.float32)
    bad_states: list[dict[str, np.ndarray | int]] = [
        {"steps": 1, "m": m},  # v missing
        {**good, "extra": 1},
        {**good, "m": np.ones(DIM + 1, dtype=np.float32)},
        {**good, "v": np.ones(DIM, dtype=np.float64)},
        {**good, "v": -np.ones(DIM, dtype=np.float32)},
        {**good, "m": np.full(DIM, np.nan, dtype=np.float32)},
        {**good, "steps": -1},
        {**good, "steps": True},
    ]
    for state in bad_states:
        with pytest.raises(ValueError):
            opt.load_state_dict(state)
        after = opt.state_dict()
        assert after.keys() == before.keys()
        for key in before:
            np.testing.assert_array_equal(after[key], before[key])


def test_step_rejects_bad_inputs_without_changing_state() -> None:
    opt = make_server_optimizer(ServerOptimizerConfig("yogi", lr=0.1), DIM)
    x0, grads = _problem()
    opt.step(x0, grads[0])
    before = opt.state_dict()
    nan_g = grads[1].copy()
    nan_g[3] = np.nan
    inf_g = grads[1].copy()
    inf_g[0] = -np.inf
    huge_g = grads[1].copy()
    huge_g[5] = 2e19  # g² overflows float32
    cases: list[tuple[np.ndarray, np.ndarray, str]] = [
        (x0, grads[1][:5], r"pseudo_grad .*shape \(7,\).*\(5,\)"),
        (x0[:6], grads[1], r"params .*shape \(7,\).*\(6,\)"),
        (x0, grads[1].astype(np.float64), "float64"),
        (x0, nan_g, "NaN or Inf"),
        (x0, inf_g, "NaN or Inf"),
        (x0, huge_g, "overflows"),
    ]
    for params, g, match in cases:
        with pytest.raises(ValueError, match=match):
            opt.step(params, g)
    assert opt.steps == 1
    for key, value in opt.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
    # Plain SGD squares nothing, so a large but finite g is fine.
    sgd = make_server_optimizer(ServerOptimizerConfig("sgd"), DIM)
    assert np.isfinite(sgd.step(x0, huge_g)).all()


def test_bad_config_reports_every_problem() -> None:
    cfg = ServerOptimizerConfig(
        name="rmsprop",  # type: ignore[arg-type]
        lr=0.0,
        momentum=1.0,
        nesterov=True,
        beta1=-0.1,
        beta2=1.5,
        tau=0.0,
        initial_accumulator=-1.0,
        bias_correction=True,
    )
    paths = [p.path for p in cfg.validate("server_optimizer")]
    assert sorted(paths) == sorted(
        f"server_optimizer.{f}"
        for f in (
            "name",
            "lr",
            "momentum",
            "nesterov",
            "beta1",
            "beta2",
            "tau",
            "initial_accumulator",
            "bias_correction",
        )
    )
    with pytest.raises(ConfigError) as info:
        make_server_optimizer(cfg, DIM)
    assert len(info.value.problems) == 9
    assert "lr: got 0.0" in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr", float("nan")),
        ("lr", -1.0),
        ("lr", True),
        ("tau", float("inf")),
        ("momentum", -0.01),
        ("beta2", 1.0),
        ("initial_accumulator", float("nan")),
    ],
)
def test_single_bad_value_is_reported(field: str, value: object) -> None:
    problems = ServerOptimizerConfig("adam", **{field: value}).validate(path="srv")  # type: ignore[arg-type]
    assert [p.path for p in problems] == [f"srv.{field}"]


def test_defaults_and_option_combinations_are_valid() -> None:
    for name in NAMES:
        assert ServerOptimizerConfig(name).validate() == []
    assert ServerOptimizerConfig("momentum", nesterov=True).validate() == []
    assert ServerOptimizerConfig("yogi", bias_correction=True).validate() == []
    assert [
        p.path
        for p in ServerOptimizerConfig("adagrad", bias_correction=True).validate("server_optimizer")
    ] == ["server_optimizer.bias_correction"]
    with pytest.raises(ValueError, match="dim"):
        make_server_optimizer(ServerOptimizerConfig(), 0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
def test_step_allocates_only_the_output(cfg: ServerOptimizerConfig) -> None:
    # The output is one float32 vector (4 bytes/param) and all state is updated in place, so
    # a single needless float32 temporary (another 4 bytes/param) fails this.
    dim = 500_000
    opt = make_server_optimizer(cfg, dim)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(dim).astype(np.float32)
    g = rng.standard_normal(dim).astype(np.float32)
    opt.step(x, g)
    tracemalloc.start()
    try:
        out = opt.step(x, g)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del out
    assert peak <= 4 * dim + 64 * 1024, peak
