"""PrivacyConfig validation reports every bad field; derived quantities; public API list."""

from __future__ import annotations

from typing import Any

import pytest

import asyncfl.privacy as privacy
from asyncfl.core.configload import build_config
from asyncfl.errors import ConfigError
from asyncfl.privacy import PrivacyAccountant, PrivacyConfig, update_noise_multiplier

GOOD: dict[str, Any] = {
    "noise_multiplier": 1.1,
    "clip_norm": 0.7,
    "cohort_size": 100,
    "population": 10_000,
    "delta": 1e-5,
}


def _paths(cfg: PrivacyConfig) -> set[str]:
    return {p.path for p in cfg.validate()}


def test_good_config_has_no_problems() -> None:
    assert PrivacyConfig(**GOOD).validate() == []
    PrivacyConfig(
        **GOOD,
        clipping="adaptive",
        accountant="pld",
        sampling="none",
        noise_source="seeded",
        epsilon_budget=4.0,
    ).check()


def test_every_bad_field_is_reported_at_once() -> None:
    cfg = PrivacyConfig(
        noise_multiplier=-1.0,
        clip_norm=0.0,
        cohort_size=0,
        population=-5,
        delta=2.0,
        epsilon_budget=-1.0,
        clipping="sometimes",  # type: ignore[arg-type]
        target_quantile=1.5,
        clip_learning_rate=0.0,
        clipped_count_stddev=-1.0,
        accountant="moments",  # type: ignore[arg-type]
        sampling="random",  # type: ignore[arg-type]
        noise_source="urandom",  # type: ignore[arg-type]
    )
    assert _paths(cfg) == {
        "noise_multiplier",
        "clip_norm",
        "cohort_size",
        "population",
        "delta",
        "epsilon_budget",
        "clipping",
        "target_quantile",
        "clip_learning_rate",
        "clipped_count_stddev",
        "accountant",
        "sampling",
        "noise_source",
    }
    with pytest.raises(ConfigError) as err:
        cfg.check()
    assert len(err.value.problems) == 13
    assert "noise_multiplier: got -1.0" in str(err.value)


@pytest.mark.parametrize(
    "overrides,path",
    [
        ({"cohort_size": 20_000}, "cohort_size"),  # more than the population
        ({"delta": 2e-4}, "delta"),  # >= 1 / population
        ({"accountant": "pld", "sampling": "fixed_size"}, "accountant"),
        ({"clipping": "adaptive", "clipped_count_stddev": 0.5}, "clipped_count_stddev"),
        ({"clipping": "adaptive", "cohort_size": 10}, "clipped_count_stddev"),  # default m/20 = 0.5
    ],
)
def test_cross_field_problems(overrides: dict[str, Any], path: str) -> None:
    assert _paths(PrivacyConfig(**{**GOOD, **overrides})) == {path}


def test_derived_quantities() -> None:
    fixed = PrivacyConfig(**GOOD)
    assert fixed.sampling_probability == 0.01
    assert fixed.update_noise_multiplier == 1.1
    adaptive = PrivacyConfig(**GOOD, clipping="adaptive")
    assert adaptive.effective_clipped_count_stddev == 5.0  # cohort / 20
    assert adaptive.update_noise_multiplier == update_noise_multiplier(1.1, 5.0)
    ac = adaptive.adaptive_clip_config()
    assert (ac.initial_clip_norm, ac.denominator, ac.clipped_count_stddev) == (0.7, 100.0, 5.0)
    assert PrivacyConfig(**GOOD, sampling="none").sampling_probability == 1.0


def test_accountant_refuses_an_invalid_config() -> None:
    with pytest.raises(ConfigError):
        PrivacyAccountant(PrivacyConfig(**{**GOOD, "delta": 0.0}))


def test_builds_from_plain_data_with_field_paths() -> None:
    cfg = build_config(PrivacyConfig, {**GOOD, "sampling": "async_approx"})
    assert cfg.sampling == "async_approx"
    with pytest.raises(ConfigError) as err:
        build_config(PrivacyConfig, {**GOOD, "delta": 0.5, "sampling": "bogus"})
    assert {p.path for p in err.value.problems} >= {"sampling"}


def test_public_names_are_exactly_what_we_mean() -> None:
    assert set(privacy.__all__) == {
        "AccountantKind",
        "AccountedRun",
        "AdaptiveClipConfig",
        "AdaptiveClipState",
        "AdaptiveClipStateDict",
        "ClippingMode",
        "NoiseSource",
        "NoiseSourceKind",
        "PrivacyAccountant",
        "PrivacyAccountantStateDict",
        "PrivacyConfig",
        "Release",
        "SamplingScheme",
        "SecureNoise",
        "SeededNoise",
        "calibrate_noise_multiplier",
        "centred_unclipped_bit",
        "clip_update",
        "compute_epsilon",
        "distributed_noise_share",
        "gaussian_noise",
        "l2_norm",
        "make_noise_source",
        "neighboring_relation",
        "next_clip_norm",
        "noised_mean",
        "noised_unclipped_fraction",
        "total_noise_multiplier",
        "update_noise_multiplier",
    }
    for name in privacy.__all__:
        assert getattr(privacy, name) is not None
