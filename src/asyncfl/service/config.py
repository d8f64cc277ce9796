"""The service config (``asyncfl serve CONFIG.yaml``), validated in one place.

A task is configured exactly as in a simulation config: its ``algorithm``, ``server_optimizer``,
``client`` and ``model`` sections are the simulator's classes. What simulation gets from its
dataset (input shape, number of classes) a task states itself, since the server holds no data.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from asyncfl.algorithms.factory import AlgorithmConfig
from asyncfl.algorithms.fedavg import FedAvgConfig
from asyncfl.algorithms.fedbuff import FedBuffConfig
from asyncfl.core.server_opt import ServerOptimizerConfig
from asyncfl.errors import ConfigProblem
from asyncfl.models.config import ModelConfig
from asyncfl.sim.dp import DPSection
from asyncfl.sim.secure_rounds import SecureAggregationConfig
from asyncfl.training.config import ClientConfig

__all__ = [
    "AuthSection",
    "SelectorSection",
    "ServerSection",
    "ServiceConfig",
    "StorageSection",
    "TaskConfig",
    "is_loopback",
]

_MIB = 1 << 20


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerSection:
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 50051
    """TCP port; 0 picks a free one (written to ``storage.dir/port``)."""
    tls_cert: str | None = None
    """PEM certificate chain of the server (required unless ``insecure``)."""
    tls_key: str | None = None
    """PEM private key of ``tls_cert``."""
    insecure: bool = False
    """Plaintext gRPC; allowed only when ``host`` is a loopback address."""
    max_message_bytes: int = 4 * _MIB
    """Largest single gRPC message accepted or sent (models stream in chunks below this)."""
    chunk_bytes: int = 1 * _MIB
    """Size of each model chunk the server streams (a multiple of 4)."""

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        if not 0 <= self.port <= 65535:
            out.append(ConfigProblem("port", self.port, "an integer in [0, 65535]"))
        if self.insecure and not is_loopback(self.host):
            out.append(
                ConfigProblem("insecure", True, f"false for non-loopback host {self.host!r}")
            )
        if not self.insecure and (self.tls_cert is None or self.tls_key is None):
            out.append(
                ConfigProblem(
                    "tls_cert", self.tls_cert, "cert and key paths (or insecure: true on loopback)"
                )
            )
        if self.max_message_bytes < 64 * 1024:
            out.append(ConfigProblem("max_message_bytes", self.max_message_bytes, ">= 65536"))
        if not (
            4 <= self.chunk_bytes <= self.max_message_bytes - 1024 and self.chunk_bytes % 4 == 0
        ):
            out.append(
                ConfigProblem(
                    "chunk_bytes",
                    self.chunk_bytes,
                    "a multiple of 4 at least 1 KiB below max_message_bytes",
                )
            )
        return out


@dataclass(frozen=True)
class AuthSection:
    secret_file: str | None = None
    """File holding the server secret (>= 32 bytes); a client's token is
    ``<client id>.<hex HMAC-SHA256(secret, client id)>``. Required."""
    operator_principal: str = "operator"
    """Principal whose token may call Status (and only Status)."""

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        if self.secret_file is None:
            out.append(ConfigProblem("secret_file", None, "a path to the server secret"))
        if not self.operator_principal or self.operator_principal.isdigit():
            out.append(
                ConfigProblem("operator_principal", self.operator_principal, "a non-numeric name")
            )
        return out


@dataclass(frozen=True)
class StorageSection:
    dir: str = "asyncfl-state"
    """Folder for the SQLite ledger and the safetensors checkpoints."""
    keep_checkpoints: int = 2
    """Checkpoints kept per task (older ones are deleted after a step commits)."""
    keep_applied_deltas: bool = False
    """Keep every applied update's delta in the ledger (audit/replay; costs model-size rows)."""

    def validate(self) -> list[ConfigProblem]:
        if self.keep_checkpoints < 1:
            return [ConfigProblem("keep_checkpoints", self.keep_checkpoints, "an integer >= 1")]
        return []


@dataclass(frozen=True)
class SelectorSection:
    retry_after_s: float = 2.0
    """What a client without work is told to wait before checking in again."""
    min_checkin_interval_s: float = 0.0
    """Rate limit: a client checking in sooner than this after its last check-in is refused."""
    min_examples: int = 1
    """Eligibility: devices with fewer examples get no work."""

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        if not self.retry_after_s > 0:
            out.append(ConfigProblem("retry_after_s", self.retry_after_s, "a number > 0"))
        if self.min_checkin_interval_s < 0:
            out.append(ConfigProblem("min_checkin_interval_s", self.min_checkin_interval_s, ">= 0"))
        if self.min_examples < 0:
            out.append(ConfigProblem("min_examples", self.min_examples, "an integer >= 0"))
        return out


@dataclass(frozen=True)
class TaskConfig:
    id: str = "default"
    """Task name (letters, digits, '-', '_')."""
    seed: int = 0
    """Seeds the model initialisation (as ``seed`` in a simulation config)."""
    input_shape: tuple[int, ...] = (60,)
    """Shape of one input example (the simulator reads it from the dataset)."""
    num_classes: int = 10
    """Output classes (or vocabulary size)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture (as in simulation)."""
    client: ClientConfig = field(default_factory=ClientConfig)
    """Local training, sent to every client with its assignment."""
    server_optimizer: ServerOptimizerConfig = field(default_factory=ServerOptimizerConfig)
    """How the server applies the aggregated delta."""
    algorithm: AlgorithmConfig = field(default_factory=FedBuffConfig)
    """fedbuff, fedavg or fedasync, chosen by ``name``."""
    max_server_steps: int = 100
    """The task finishes at this model version."""
    lease_timeout_s: float = 600.0
    """A client must upload within this many seconds of its assignment."""
    max_update_norm: float | None = None
    """Refuse updates whose L2 norm exceeds this (null: no bound)."""
    privacy: DPSection = field(default_factory=DPSection)
    """User-level differential privacy, exactly as in simulation (fixed clipping only)."""
    population: int | None = None
    """Devices eligible for this task: the DP accountant's N (sampling rate, default delta).
    Required with ``privacy.enabled``; the simulator reads it from its dataset."""
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    """The simulator's section: ``none`` or ``tee`` (FedBuff over the TEE secure buffer; the
    ledger then holds masked contributions only). See docs/service.md."""
    tee_vendor_key_file: str | None = None
    """tee: the simulated hardware vendor's signing key (64 hex digits); null: created in
    ``storage.dir`` as ``<task>.tee-vendor.key`` on first start. Devices are configured with
    its public key."""

    def _validate_secure(self) -> list[ConfigProblem]:
        sa = self.secure_aggregation
        if sa.mode == "none":
            return []
        # (sa.validate() runs on its own when the config is loaded: not repeated here.)
        out: list[ConfigProblem] = []
        if sa.mode != "tee":
            out.append(
                ConfigProblem(
                    "secure_aggregation.mode",
                    sa.mode,
                    "none or tee in the service (secagg, secagg+ and lightsecagg need "
                    "client-to-client rounds the service does not carry yet)",
                )
            )
            return out
        if not isinstance(self.algorithm, FedBuffConfig):
            out.append(
                ConfigProblem("algorithm.name", self.algorithm.name, "fedbuff with mode tee")
            )
        elif self.algorithm.example_weighting != "equal":
            out.append(
                ConfigProblem(
                    "algorithm.example_weighting",
                    self.algorithm.example_weighting,
                    "equal with mode tee (the service knows no largest example count to size "
                    "the ring for linear weights)",
                )
            )
        if self.privacy.enabled:
            out.append(
                ConfigProblem(
                    "privacy.enabled",
                    True,
                    "false with mode tee: noise inside the enclave is not wired into the "
                    "service yet",
                )
            )
        if self.max_update_norm is not None:
            out.append(
                ConfigProblem(
                    "max_update_norm",
                    self.max_update_norm,
                    "null with mode tee (a masked update has no visible norm; the fixed-point "
                    "codec clips each coordinate to secure_aggregation.clip)",
                )
            )
        return out

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = self._validate_secure()
        if self.population is not None and self.population < 1:
            out.append(ConfigProblem("population", self.population, "null or an integer >= 1"))
        if self.privacy.enabled:
            if self.population is None:
                out.append(
                    ConfigProblem(
                        "population", None, "the number of eligible devices (privacy.enabled)"
                    )
                )
            if self.privacy.clipping != "fixed":
                out.append(
                    ConfigProblem(
                        "privacy.clipping",
                        self.privacy.clipping,
                        "fixed in the service: adaptive clipping needs each client's noised "
                        "unclipped bit, which the upload protocol does not carry yet",
                    )
                )
            weighting = getattr(self.algorithm, "example_weighting", "equal")
            if weighting != "equal":
                out.append(
                    ConfigProblem(
                        "algorithm.example_weighting",
                        weighting,
                        "equal with differential privacy (a user's weight must be <= 1)",
                    )
                )
        if not self.id or not all(c.isalnum() or c in "-_" for c in self.id):
            out.append(ConfigProblem("id", self.id, "letters, digits, '-' and '_'"))
        if self.max_server_steps < 1:
            out.append(ConfigProblem("max_server_steps", self.max_server_steps, "an integer >= 1"))
        if not self.lease_timeout_s > 0:
            out.append(ConfigProblem("lease_timeout_s", self.lease_timeout_s, "a number > 0"))
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            out.append(ConfigProblem("max_update_norm", self.max_update_norm, "null or > 0"))
        if self.num_classes < 2:
            out.append(ConfigProblem("num_classes", self.num_classes, "an integer >= 2"))
        if not self.input_shape or any(d < 1 for d in self.input_shape):
            out.append(ConfigProblem("input_shape", list(self.input_shape), "sizes >= 1"))
        return out

    @property
    def concurrency(self) -> int:
        """Clients training at once: Mc (async) or the over-selected cohort (FedAvg)."""
        alg = self.algorithm
        return alg.selection_size if isinstance(alg, FedAvgConfig) else alg.concurrency

    @property
    def algorithm_name(self) -> Literal["fedavg", "fedbuff", "fedasync"]:
        return self.algorithm.name


@dataclass(frozen=True)
class ServiceConfig:
    server: ServerSection = field(default_factory=ServerSection)
    """Listening address, TLS and message limits."""
    auth: AuthSection = field(default_factory=AuthSection)
    """Bearer tokens."""
    storage: StorageSection = field(default_factory=StorageSection)
    """Durable state."""
    selector: SelectorSection = field(default_factory=SelectorSection)
    """Check-in policy."""
    tasks: tuple[TaskConfig, ...] = (TaskConfig(),)
    """The tasks this server runs (one aggregator each)."""

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        ids = [t.id for t in self.tasks]
        if not ids:
            out.append(ConfigProblem("tasks", [], "at least one task"))
        if len(set(ids)) != len(ids):
            out.append(ConfigProblem("tasks", ids, "distinct task ids"))
        return out
