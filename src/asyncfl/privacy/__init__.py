"""User-level differential privacy: clipping, noise, adaptive clipping and accounting.

The mechanism (DP-FedAvg, McMahan et al. 2018) per server step: clip each user's update
to L2 norm C (:func:`clip_update`, or :class:`AdaptiveClipState` for Andrew et al. 2021),
sum, add N(0, (zC)²) once and divide by a FIXED denominator (:func:`noised_mean`), and
record the release with a :class:`PrivacyAccountant` (dp-accounting's RDP or PLD), which
refuses steps past the budget. :class:`PrivacyConfig` holds every choice in one place.
"""

from asyncfl.privacy.accounting import (
    AccountedRun,
    PrivacyAccountant,
    PrivacyAccountantStateDict,
    Release,
    compute_epsilon,
    neighboring_relation,
)
from asyncfl.privacy.adaptive_clip import (
    AdaptiveClipConfig,
    AdaptiveClipState,
    AdaptiveClipStateDict,
    centred_unclipped_bit,
    next_clip_norm,
    noised_unclipped_fraction,
    total_noise_multiplier,
    update_noise_multiplier,
)
from asyncfl.privacy.calibration import calibrate_noise_multiplier
from asyncfl.privacy.clipping import clip_update, l2_norm
from asyncfl.privacy.config import AccountantKind, ClippingMode, PrivacyConfig, SamplingScheme
from asyncfl.privacy.noise import (
    NoiseSource,
    NoiseSourceKind,
    SecureNoise,
    SeededNoise,
    distributed_noise_share,
    gaussian_noise,
    make_noise_source,
    noised_mean,
)

__all__ = [
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
]
