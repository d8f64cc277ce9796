"""``secure_aggregation: {mode: tee}`` in the service: the secure buffer's enclave beside the
server (Papaya, Huba et al., MLSys 2022, §5).

The aggregator role runs :class:`~asyncfl.algorithms.secure_fedbuff.SecureFedBuff` over the
enclave exactly as the simulator does (:mod:`asyncfl.sim.secure_buffer`): each client verifies
the enclave's attestation report, uploads ``y = q + PRG(seed) mod 2^k`` and its seed sealed to
the enclave, and the server only ever unmasks sums of K contributions.

This module holds what both sides need to agree on:

- :func:`enclave_config_for`: the enclave's measured config, derived from the task config and
  the model size alone, so a device can compute the measurement it expects from the published
  task config (:func:`expected_measurement_for`) without trusting the server;
- :func:`load_vendor`: the simulated hardware vendor key (the "CPU" that signs reports),
  persisted so a restarted server's new enclave boots are vouched for by the same key;
- :class:`TeeTrust`: what a client is configured with (vendor public key, expected
  measurement); a client without it refuses tee tasks.

Differential privacy (``privacy.enabled``): the enclave adds the Gaussian noise to every
release (:func:`~asyncfl.secure.tee.enclave.dp_noise_std`, from its own CSPRNG, or a seed
handed to it at boot in the research-only ``seeded`` mode), and the clip norm that noise is
calibrated to is part of the measured config, so a device clips to the attested norm, not to
one the server chose. What is enforced where: docs/security.md.

Not done (the config refuses them): example weighting other than ``equal``, FedAsync/FedAvg
over the TEE buffer, adaptive clipping.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from asyncfl.algorithms.fedbuff import FedBuffConfig
from asyncfl.algorithms.secure_fedbuff import ReleaseAccounting, SecureFedBuff
from asyncfl.core.server_opt import ServerOptimizer
from asyncfl.core.update import FloatVector
from asyncfl.errors import ConfigError, ConfigProblem
from asyncfl.privacy.noise import SeededNoise
from asyncfl.secure.fixedpoint import FixedPointCodec
from asyncfl.secure.tee import (
    EnclaveBackend,
    EnclaveConfig,
    InProcessBackend,
    SimulatedVendor,
    SubprocessBackend,
)
from asyncfl.secure.tee.client import expected_measurement
from asyncfl.secure.tee.enclave import enclave_config_builder, pick_ring
from asyncfl.service.config import TaskConfig

__all__ = [
    "TeeAggregator",
    "TeeTrust",
    "build_tee",
    "enclave_config_for",
    "expected_measurement_for",
    "load_vendor",
]


@dataclass(frozen=True)
class TeeTrust:
    """A device's trust anchor for tee tasks, configured on the device (never from the server)."""

    vendor_public: bytes
    """The hardware vendor's Ed25519 public key (32 bytes)."""
    expected_measurement: bytes
    """SHA-256 measurement of the enclave program + config the device agrees to seal to."""


def enclave_config_for(cfg: TaskConfig, dim: int) -> EnclaveConfig:
    """The enclave config of task ``cfg`` with a ``dim``-parameter model (equal weighting:
    the largest integer weight is ``2^weight_bits``). Raises :class:`ConfigError` if the
    ring cannot hold a release of K contributions."""
    sa = cfg.secure_aggregation
    alg = cfg.algorithm
    if not isinstance(alg, FedBuffConfig):
        raise ConfigError([ConfigProblem("algorithm.name", alg.name, "fedbuff with tee")])
    dp = cfg.privacy

    make = enclave_config_builder(
        task=cfg.id,
        dim=dim,
        clip=sa.clip,
        min_contributions=alg.buffer_size,
        dp=(dp.noise_multiplier, dp.clip_norm) if dp.enabled else None,
    )
    max_weight = 1 << sa.weight_bits
    problem = ConfigProblem(
        "secure_aggregation.ring_bits",
        sa.ring_bits,
        f"enough bits for K={alg.buffer_size} contributions of weight {max_weight} plus the DP "
        "noise tail; raise ring_bits or lower frac_bits, weight_bits or clip",
    )
    try:
        ec = make(sa.frac_bits, sa.weight_bits, sa.ring_bits)
    except ConfigError as exc:  # the enclave's own ring_bits check: name the task's field
        ring = [p for p in exc.problems if p.path == "ring_bits"]
        other = [p for p in exc.problems if p.path != "ring_bits"]
        raise ConfigError(([problem] if ring else []) + other) from exc
    if ec.weight_budget() < alg.buffer_size * max_weight:
        raise ConfigError([problem])
    return pick_ring(make, ec, fit=sa.tee_fit_ring32)


def expected_measurement_for(cfg: TaskConfig, dim: int) -> bytes:
    """The measurement a device expects for task ``cfg``: this build's enclave code + config."""
    return expected_measurement(enclave_config_for(cfg, dim))


def vendor_key_path(cfg: TaskConfig, storage_dir: Path) -> Path:
    """Where task ``cfg``'s simulated vendor key lives (``tee_vendor_key_file`` or beside the
    ledger)."""
    key = cfg.tee_vendor_key_file
    return Path(key) if key else storage_dir / f"{cfg.id}.tee-vendor.key"


def load_vendor(path: Path) -> SimulatedVendor:
    """The simulated vendor key in ``path`` (hex of 32 bytes), created (mode 0600) if absent.

    In a real TEE this key is the CPU vendor's and never on the server; here the server plays
    the hardware (docs/security.md: simulated attestation proves nothing against the host).
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex())
    text = path.read_text().strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(
            [ConfigProblem("tee_vendor_key_file", str(path), "a file holding 64 hex digits")]
        )
    return SimulatedVendor.from_private(raw)


@dataclass
class TeeAggregator:
    """The task's secure aggregator, its enclave backend and the enclave's config."""

    agg: SecureFedBuff
    backend: EnclaveBackend
    enclave: EnclaveConfig
    vendor_public: bytes

    def close(self) -> None:
        self.backend.close()


def build_tee(
    cfg: TaskConfig,
    params: FloatVector,
    optimizer: ServerOptimizer,
    vendor: SimulatedVendor,
    *,
    dp: ReleaseAccounting | None = None,
    noise_seed: int | None = None,
    before_release: Callable[[], None] | None = None,
) -> TeeAggregator:
    """Boot a fresh enclave (new key, new epoch, empty buffer) and the aggregator before it.

    With ``privacy.enabled``, ``dp`` accounts the enclave's noised releases and ``noise_seed``
    seeds the enclave's noise when ``privacy.noise_source`` is ``seeded`` (research only, no
    formal guarantee; otherwise the enclave draws it from its own OS CSPRNG).
    """
    sa = cfg.secure_aggregation
    alg = cfg.algorithm
    assert isinstance(alg, FedBuffConfig)  # TaskConfig.validate refuses anything else
    if (dp is None) == cfg.privacy.enabled:
        raise ValueError(f"task {cfg.id!r}: pass dp exactly when privacy.enabled")
    seeded = cfg.privacy.enabled and cfg.privacy.noise_source == "seeded"
    if seeded and noise_seed is None:
        raise ValueError(f"task {cfg.id!r}: privacy.noise_source seeded needs noise_seed")
    ec = enclave_config_for(cfg, int(params.shape[0]))
    codec = FixedPointCodec(clip=sa.clip, frac_bits=ec.frac_bits, ring_bits=ec.ring_bits)
    seed = noise_seed if seeded else None
    backend: EnclaveBackend = (
        SubprocessBackend(ec, vendor, noise_seed=seed)
        if sa.tee_backend == "subprocess"
        else InProcessBackend(ec, vendor, noise=None if seed is None else SeededNoise(seed))
    )
    try:
        agg = SecureFedBuff(
            alg,
            params,
            optimizer,
            backend=backend,
            codec=codec,
            weight_bits=ec.weight_bits,
            dp=dp,
            dp_noise_std=ec.noise_std,
            before_release=before_release,
        )
    except BaseException:
        backend.close()
        raise
    return TeeAggregator(agg, backend, ec, vendor.public)
