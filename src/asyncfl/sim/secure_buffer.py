"""Asynchronous FedBuff/FedAsync through the TEE secure buffer in the simulator (Papaya, §5).

Each finishing client plays the device side (:class:`~asyncfl.secure.tee.TeeClient`: verify
the report the aggregator relays, encode, mask with a fresh seed, seal the seed) and the
aggregator (:class:`~asyncfl.algorithms.secure_fedbuff.SecureFedBuff`) sees only the masked
upload. The enclave runs in process by default or, with ``tee_backend: subprocess``, in its
own OS process behind a socket.

Modelling choices (docs/security.md): the simulation harness owns the simulated vendor key;
compute and bytes of the protocol are recorded, not added to simulated time; fixed-point
rounding uses the run's seeded generator (masks come from the OS CSPRNG and cancel, so a run
stays reproducible).

Ring: the enclave, the aggregator and the clients compute in the smallest ring that holds a
full release (:func:`~asyncfl.secure.tee.enclave.with_smallest_ring`): ``Z_{2^32}`` (uint32,
half the memory traffic) when ``K`` contributions of the largest weight plus the noise tail
fit in 31 bits, else the configured ``ring_bits``. Results are the same in either ring.

Differential privacy (``dp``): clients clip on the device (the simulator calls
:meth:`DPMechanism.clip`), the enclave adds ``N(0, (z C')^2)`` to every release in the ring
(``C' = C + sqrt(d) 2^-f``, :func:`~asyncfl.secure.tee.enclave.dp_noise_std`), from the OS
CSPRNG or, with ``noise_source: seeded``, from ``noise_seed`` (research only), and the
aggregator divides by the fixed denominator and accounts each release with ``dp``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from asyncfl.algorithms.base import Outcome
from asyncfl.algorithms.fedbuff import FedBuffConfig
from asyncfl.algorithms.secure_fedbuff import SecureFedBuff
from asyncfl.core.server_opt import ServerOptimizer
from asyncfl.core.update import FloatVector, Update
from asyncfl.errors import ConfigError, ConfigProblem, CryptoError, ProtocolError
from asyncfl.privacy.noise import SeededNoise
from asyncfl.secure.fixedpoint import FixedPointCodec
from asyncfl.secure.tee import (
    EnclaveBackend,
    InProcessBackend,
    SimulatedVendor,
    SubprocessBackend,
    TeeClient,
    expected_measurement,
)
from asyncfl.secure.tee.enclave import enclave_config_builder, pick_ring
from asyncfl.sim.dp import DPMechanism
from asyncfl.sim.secure_rounds import SecureAggregationConfig

__all__ = ["TeeBufferRunner", "TeeStats", "build_tee_aggregator"]


@dataclass
class TeeStats:
    uploads: int = 0
    bytes_up: int = 0
    client_seconds: float = 0.0
    server_seconds: float = 0.0
    releases: int = 0
    max_error_bound: float = 0.0
    ring_bits: int = 0
    frac_bits: int = 0
    weight_bits: int = 0

    def summary(self, restarts: int) -> dict[str, object]:
        n = max(self.uploads, 1)
        return {
            "mode": "tee",
            "uploads": self.uploads,
            "releases": self.releases,
            "enclave_restarts": restarts,
            "bytes_up_per_client": self.bytes_up / n,
            "client_seconds_per_update": self.client_seconds / n,
            "server_seconds_per_step": self.server_seconds / max(self.releases, 1),
            "decode_error_bound": self.max_error_bound,
            "ring_bits": self.ring_bits,
            "frac_bits": self.frac_bits,
            "weight_bits": self.weight_bits,
        }


def build_tee_aggregator(
    cfg: SecureAggregationConfig,
    alg: FedBuffConfig,
    params: FloatVector,
    optimizer: ServerOptimizer,
    *,
    max_example_weight: int,
    mixing_rate: float = 1.0,
    task: str = "sim",
    dp: DPMechanism | None = None,
    noise_seed: int | None = None,
) -> tuple[SecureFedBuff, TeeBufferRunner]:
    """The enclave (booted), the aggregator in front of it, and the clients' side.

    With ``dp`` the enclave adds the DP noise; ``noise_seed`` is used only when ``dp``'s
    noise source is ``seeded``. Raises :class:`~asyncfl.errors.ConfigError` if the ring
    cannot hold ``K`` contributions of the largest weight (plus the noise tail).
    """
    dim = int(params.shape[0])
    if dp is not None and dp.site != "enclave":
        raise ValueError("build the DPMechanism with site='enclave' for the TEE buffer")

    make = enclave_config_builder(
        task=task,
        dim=dim,
        clip=cfg.clip,
        min_contributions=alg.buffer_size,
        max_example_weight=max_example_weight,
        dp=None if dp is None else (dp.cfg.noise_multiplier, dp.clip_norm),
    )
    enclave_cfg = make(cfg.frac_bits, cfg.weight_bits, cfg.ring_bits)
    max_weight = enclave_cfg.max_weight
    if enclave_cfg.weight_budget() < alg.buffer_size * max_weight:
        raise ConfigError(
            [
                ConfigProblem(
                    "secure_aggregation.ring_bits",
                    cfg.ring_bits,
                    f"enough bits for K={alg.buffer_size} contributions of weight {max_weight} "
                    f"(2^weight_bits x largest example weight) plus the noise tail: the budget is "
                    f"{enclave_cfg.weight_budget()}; raise ring_bits or lower frac_bits, "
                    "weight_bits or clip",
                )
            ]
        )
    enclave_cfg = pick_ring(make, enclave_cfg, fit=cfg.tee_fit_ring32)
    noise_std = enclave_cfg.noise_std
    codec = FixedPointCodec(
        clip=cfg.clip, frac_bits=enclave_cfg.frac_bits, ring_bits=enclave_cfg.ring_bits
    )
    seeded = dp is not None and dp.cfg.noise_source == "seeded"
    if seeded and noise_seed is None:
        raise ValueError("privacy.noise_source=seeded needs noise_seed")
    vendor = SimulatedVendor.generate()
    backend: EnclaveBackend = (
        SubprocessBackend(enclave_cfg, vendor, noise_seed=noise_seed if seeded else None)
        if cfg.tee_backend == "subprocess"
        else InProcessBackend(
            enclave_cfg,
            vendor,
            noise=SeededNoise(noise_seed) if seeded and noise_seed is not None else None,
        )
    )
    agg = SecureFedBuff(
        alg,
        params,
        optimizer,
        backend=backend,
        codec=codec,
        weight_bits=enclave_cfg.weight_bits,
        mixing_rate=mixing_rate,
        dp=dp,
        dp_noise_std=noise_std,
    )
    client = TeeClient(
        vendor_public=vendor.public,
        expected=expected_measurement(enclave_cfg),
        codec=codec,
        task=task,
        dim=enclave_cfg.dim,
    )
    runner = TeeBufferRunner(agg, client, backend)
    runner.stats.ring_bits = enclave_cfg.ring_bits
    runner.stats.frac_bits = enclave_cfg.frac_bits
    runner.stats.weight_bits = enclave_cfg.weight_bits
    return agg, runner


class TeeBufferRunner:
    """Runs the device side of each upload and hands the masked result to the aggregator."""

    def __init__(self, agg: SecureFedBuff, client: TeeClient, backend: EnclaveBackend) -> None:
        self.agg = agg
        self.client = client
        self.backend = backend
        self.stats = TeeStats()

    def submit(self, update: Update, rng: np.random.Generator) -> Outcome:
        t0 = time.perf_counter()
        try:
            up = self.client.upload(
                self.agg.report,
                client_id=update.client_id,
                base_version=update.base_version,
                num_examples=update.num_examples,
                delta=update.delta,
                rng=rng,
            )
        except (CryptoError, ProtocolError) as exc:
            return Outcome(accepted=False, reason="attestation_failed", detail=str(exc))
        except ValueError as exc:
            return Outcome(accepted=False, reason="bad_update", detail=str(exc))
        t1 = time.perf_counter()
        out = self.agg.on_masked_update(up)
        st = self.stats
        st.client_seconds += t1 - t0
        st.server_seconds += time.perf_counter() - t1
        st.uploads += 1
        st.bytes_up += up.wire_bytes
        if out.step is not None:
            st.releases += 1
            bound = self.agg.error_bound(round(out.step.total_weight))
            st.max_error_bound = max(st.max_error_bound, bound)
        return out

    def summary(self) -> dict[str, object]:
        return self.stats.summary(self.agg.enclave_restarts)

    def close(self) -> None:
        self.backend.close()
