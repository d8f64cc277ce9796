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
from asyncfl.errors import CryptoError, ProtocolError
from asyncfl.secure.fixedpoint import FixedPointCodec
from asyncfl.secure.tee import (
    EnclaveBackend,
    EnclaveConfig,
    InProcessBackend,
    SimulatedVendor,
    SubprocessBackend,
    TeeClient,
    expected_measurement,
)
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
) -> tuple[SecureFedBuff, TeeBufferRunner]:
    """The enclave (booted), the aggregator in front of it, and the clients' side."""
    codec = FixedPointCodec(clip=cfg.clip, frac_bits=cfg.frac_bits, ring_bits=cfg.ring_bits)
    enclave_cfg = EnclaveConfig(
        task=task,
        dim=int(params.shape[0]),
        ring_bits=cfg.ring_bits,
        frac_bits=cfg.frac_bits,
        clip=cfg.clip,
        weight_bits=cfg.weight_bits,
        min_contributions=alg.buffer_size,
        max_weight=(1 << cfg.weight_bits) * max(max_example_weight, 1),
    )
    vendor = SimulatedVendor.generate()
    backend: EnclaveBackend = (
        SubprocessBackend(enclave_cfg, vendor)
        if cfg.tee_backend == "subprocess"
        else InProcessBackend(enclave_cfg, vendor)
    )
    agg = SecureFedBuff(
        alg,
        params,
        optimizer,
        backend=backend,
        codec=codec,
        weight_bits=cfg.weight_bits,
        mixing_rate=mixing_rate,
    )
    client = TeeClient(
        vendor_public=vendor.public,
        expected=expected_measurement(enclave_cfg),
        codec=codec,
        task=task,
        dim=enclave_cfg.dim,
    )
    return agg, TeeBufferRunner(agg, client, backend)


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
