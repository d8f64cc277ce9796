"""Fixed-point codec: error bound vs a float64 reference with asymmetric weights; no wrap."""

from __future__ import annotations

import numpy as np
import pytest

from asyncfl.errors import ConfigError
from asyncfl.secure.fixedpoint import FixedPointCodec, Rounding


def _ring_sum(codec: FixedPointCodec, encoded: list[np.ndarray]) -> np.ndarray:
    ring = codec.ring
    acc = ring.zeros(encoded[0].shape[0])
    for e in encoded:
        acc += e
    return ring.reduce(acc)


@pytest.mark.parametrize("rounding", list(Rounding))
@pytest.mark.parametrize(("frac_bits", "ring_bits"), [(16, 32), (24, 62), (30, 64)])
def test_weighted_mean_within_bound_of_float64_reference(
    rounding: Rounding, frac_bits: int, ring_bits: int
) -> None:
    rng = np.random.default_rng(frac_bits + ring_bits)
    clip = 2.0
    codec = FixedPointCodec(clip, frac_bits, ring_bits, rounding)
    weights = [1, 7, 250, 3, 41]  # distinct, asymmetric
    vecs = [rng.normal(0, 1.5 * (i + 1), 5_000).astype(np.float32) for i in range(5)]
    encoded = [codec.encode(v, w, rng) for v, w in zip(vecs, weights, strict=True)]
    total = sum(weights)
    got = codec.decode_sum(_ring_sum(codec, encoded), total)
    # Reference: plain float64 loop over clients of the clipped inputs.
    ref = np.zeros(5_000)
    for v, w in zip(vecs, weights, strict=True):
        ref += w * np.clip(v.astype(np.float64), -clip, clip)
    ref /= total
    err = np.abs(got.astype(np.float64) - ref).max()
    assert err <= codec.error_bound(total)
    # The bound is not vacuous: an unweighted mean would be far outside it.
    unweighted = np.mean([np.clip(v, -clip, clip) for v in vecs], axis=0)
    assert np.abs(unweighted - ref).max() > 100 * codec.error_bound(total)


def test_stochastic_rounding_is_unbiased() -> None:
    rng = np.random.default_rng(0)
    codec = FixedPointCodec(1.0, 4, 32)
    x = np.full(200_000, 0.3, dtype=np.float32)  # 0.3 * 16 = 4.8: rounds to 4 or 5
    dec = codec.decode_sum(codec.encode(x, 1, rng), 1).astype(np.float64)
    # Each decode is 0.25 or 0.3125 with p = 0.2/0.8; std of the mean = 0.0625*0.4/sqrt(n).
    assert abs(dec.mean() - np.float32(0.3)) < 5 * 0.0625 * 0.4 / np.sqrt(x.size)


def test_the_no_wrap_limit_is_exact() -> None:
    codec = FixedPointCodec(1.0, 8, 16, Rounding.NEAREST)  # Q = 256, limit = 32767 // 256
    assert codec.quantum_bound() == 256
    assert codec.max_total_weight() == 127
    assert codec.max_summands(max_weight=10) == 12
    x = np.full(4, -1.0, dtype=np.float32)
    enc = [codec.encode(x, 1) for _ in range(127)]
    assert np.all(codec.decode_sum(_ring_sum(codec, enc), 127) == -1.0)
    # One more summand would wrap; the codec refuses the total weight, naming the numbers.
    with pytest.raises(ConfigError, match=r"total_weight: got 128.*\[1, 127\]"):
        codec.decode_sum(_ring_sum(codec, [*enc, codec.encode(x, 1)]), 128)
    with pytest.raises(ConfigError, match="total_weight"):
        codec.error_bound(0)


def test_configs_that_wrap_are_rejected_with_all_problems() -> None:
    with pytest.raises(ConfigError, match="clip \\* 2\\^frac_bits = 65536"):
        FixedPointCodec(1.0, 16, 16)
    with pytest.raises(ConfigError) as info:
        FixedPointCodec(-1.0, 60, 70)
    assert {p.path for p in info.value.problems} == {"clip", "frac_bits", "ring_bits"}


def test_encode_validates_inputs() -> None:
    codec = FixedPointCodec(1.0, 8, 32)
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(np.array([np.nan], dtype=np.float32), 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="rng"):
        codec.encode(np.zeros(3, dtype=np.float32), 1)
    with pytest.raises(ValueError, match="weight=0"):
        codec.encode(np.zeros(3, dtype=np.float32), 0, np.random.default_rng(0))
