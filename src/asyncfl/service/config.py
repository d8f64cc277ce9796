"""The service config (``asyncfl serve CONFIG.yaml``), validated in one place.

A task is configured exactly as in a simulation config: its ``algorithm``, ``server_optimizer``,
``client`` and ``model`` sections are the simulator's classes. What simulation gets from its
dataset (input shape, number of classes) a task states itself, since the server holds no data.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from typing import Literal

from asyncfl.algorithms.factory import AlgorithmConfig
from asyncfl.algorithms.fedavg import FedAvgConfig
from asyncfl.algorithms.fedbuff import FedBuffConfig
from asyncfl.core.server_opt import ServerOptimizerConfig
from asyncfl.errors import ConfigError, ConfigProblem
from asyncfl.models.config import ModelConfig
from asyncfl.secure.lightsecagg.codec import FieldCodec
from asyncfl.sim.config import distributed_noise_problems
from asyncfl.sim.dp import DPSection
from asyncfl.sim.secure_rounds import SecureAggregationConfig
from asyncfl.training.config import ClientConfig

__all__ = [
    "AggregatorSection",
    "AuthSection",
    "RolesSection",
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
    """User-level differential privacy, exactly as in simulation (fixed clipping only); with
    ``secure_aggregation.mode`` tee the enclave adds the noise to every release."""
    population: int | None = None
    """Devices eligible for this task: the DP accountant's N (sampling rate, default delta).
    Required with ``privacy.enabled``; the simulator reads it from its dataset. With
    ``secure_aggregation.mode`` lightsecagg it is the group size N (client ids 0..N-1)."""
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    """The simulator's section: ``none``, ``tee`` (FedBuff over the TEE secure buffer; the
    ledger then holds masked contributions only), ``secagg`` / ``secagg+`` (FedAvg rounds
    through the SecAgg protocol; the server only learns each round's sum) or ``lightsecagg``
    (FedBuff over coded masks, no TEE; the group is client ids ``0..population-1``). See
    docs/service.md."""
    secagg_stage_timeout_s: float = 30.0
    """secagg / secagg+: each protocol stage closes this many seconds after it opened (or
    as soon as every client it expects has answered); clients silent by then are the
    protocol's dropouts."""
    lightsecagg_answer_timeout_s: float = 30.0
    """lightsecagg: a closed buffer is discarded if fewer than U of the group's clients have
    sent their aggregated share this many seconds after it was published (clients answer
    when they next check in). See docs/service.md."""
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
        if sa.mode in ("secagg", "secagg+"):
            return _secagg_problems(self)
        if sa.mode == "lightsecagg":
            return _lightsecagg_problems(self)
        if sa.mode != "tee":
            out.append(
                ConfigProblem(
                    "secure_aggregation.mode",
                    sa.mode,
                    "none, tee, secagg, secagg+ or lightsecagg in the service",
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
        # privacy.enabled is fine: the enclave adds the noise (fixed clipping and equal
        # weighting are checked with the other DP settings in validate()).
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


def _secagg_problems(t: TaskConfig) -> list[ConfigProblem]:
    """secagg / secagg+ in the service: FedAvg rounds, as in simulation (SimConfig.validate)."""
    sa, alg, out = t.secure_aggregation, t.algorithm, []
    if not isinstance(alg, FedAvgConfig):
        out.append(
            ConfigProblem(
                "algorithm.name",
                alg.name,
                f"fedavg with secure_aggregation.mode {sa.mode} (SecAgg needs rounds)",
            )
        )
    elif alg.example_weighting not in ("equal", "linear"):
        out.append(
            ConfigProblem(
                "algorithm.example_weighting",
                alg.example_weighting,
                "equal or linear with secure aggregation (integer weights in the ring)",
            )
        )
    if t.max_update_norm is not None:
        out.append(
            ConfigProblem(
                "max_update_norm",
                t.max_update_norm,
                f"null with mode {sa.mode} (a masked update has no visible norm; the "
                "fixed-point codec clips each coordinate to secure_aggregation.clip)",
            )
        )
    if not t.secagg_stage_timeout_s > 0:
        out.append(ConfigProblem("secagg_stage_timeout_s", t.secagg_stage_timeout_s, "> 0"))
    if isinstance(alg, FedAvgConfig) and not sa.validate():
        # The round's weighted sum must not wrap: at least one unit of weight per selected
        # client (linear weighting: each client's weight is capped at the ring's share).
        limit = (1 << (sa.ring_bits - 1)) - 1
        quantum = math.ceil(sa.clip * 2.0**sa.frac_bits)
        if limit // quantum < alg.selection_size:
            out.append(
                ConfigProblem(
                    "secure_aggregation.ring_bits",
                    sa.ring_bits,
                    f"enough bits for {alg.selection_size} inputs (clip * 2^frac_bits * "
                    "selected clients < 2^(ring_bits - 1)); raise ring_bits or lower "
                    "frac_bits or clip",
                )
            )
    if t.privacy.enabled and isinstance(alg, FedAvgConfig):
        out += distributed_noise_problems(t.privacy, sa, alg)
    return out


def _lightsecagg_problems(t: TaskConfig) -> list[ConfigProblem]:
    """lightsecagg in the service: FedBuff over one group of ``population`` clients."""
    sa, alg, out = t.secure_aggregation, t.algorithm, []
    if not isinstance(alg, FedBuffConfig):
        out.append(
            ConfigProblem(
                "algorithm.name",
                alg.name,
                "fedbuff with mode lightsecagg (fedasync would unmask every update alone)",
            )
        )
    else:
        if alg.buffer_size < 2:
            out.append(
                ConfigProblem(
                    "algorithm.buffer_size",
                    alg.buffer_size,
                    ">= 2 with mode lightsecagg (a buffer of one reveals that update)",
                )
            )
        if alg.example_weighting != "equal":
            out.append(
                ConfigProblem(
                    "algorithm.example_weighting",
                    alg.example_weighting,
                    "equal with mode lightsecagg (the service knows no largest example count "
                    "to bound the field's headroom for linear weights)",
                )
            )
        try:
            budget = FieldCodec(clip=sa.clip, frac_bits=sa.frac_bits).max_total_weight()
        except ConfigError:
            budget = 0
        if alg.buffer_size << sa.weight_bits > budget:
            out.append(
                ConfigProblem(
                    "secure_aggregation.frac_bits",
                    sa.frac_bits,
                    f"K={alg.buffer_size} contributions of weight 2^weight_bits="
                    f"{1 << sa.weight_bits} within the field's budget {budget} (p = 2^32 - 5, "
                    "clip * 2^frac_bits * K * 2^weight_bits <= 2^31); e.g. frac_bits 16, "
                    "weight_bits 6",
                )
            )
        if t.population is None or t.population < max(2, alg.buffer_size):
            out.append(
                ConfigProblem(
                    "population",
                    t.population,
                    f"the group size N: client ids 0..N-1, N >= max(2, buffer_size="
                    f"{alg.buffer_size})",
                )
            )
    if t.privacy.enabled:
        out.append(
            ConfigProblem(
                "privacy.enabled", True, "false with mode lightsecagg (DP is not implemented)"
            )
        )
    if t.max_update_norm is not None:
        out.append(
            ConfigProblem(
                "max_update_norm",
                t.max_update_norm,
                "null with mode lightsecagg (a masked update has no visible norm; the "
                "fixed-point codec clips each coordinate to secure_aggregation.clip)",
            )
        )
    if not t.lightsecagg_answer_timeout_s > 0:
        out.append(
            ConfigProblem("lightsecagg_answer_timeout_s", t.lightsecagg_answer_timeout_s, "> 0")
        )
    return out


def _address_problems(name: str, address: str, insecure: bool) -> list[ConfigProblem]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return [ConfigProblem(name, address, "host:port with a port in [0, 65535]")]
    if insecure and not is_loopback(host.strip("[]")):
        return [ConfigProblem(name, address, "a loopback host while server.insecure is true")]
    return []


@dataclass(frozen=True)
class AggregatorSection:
    id: str = "agg-0"
    """Name of this aggregator process (``asyncfl serve --role aggregator --id ID``)."""
    listen: str = "127.0.0.1:50053"
    """host:port it listens on for clients (download, upload) and selectors (leases), with
    the ``server`` section's TLS; port 0 picks a free one."""
    advertise: str | None = None
    """host:port clients and selectors dial (null: ``listen``, with the port it bound)."""
    tasks: tuple[str, ...] = ()
    """Task ids the coordinator may give it (empty: any)."""


@dataclass(frozen=True)
class RolesSection:
    """Roles in separate processes (``asyncfl serve --role``); unused by ``--role all``."""

    coordinator: str = "127.0.0.1:50052"
    """host:port the coordinator listens on and the other roles dial. The selector listens on
    ``server.host``:``server.port`` (the address devices are given)."""
    aggregators: tuple[AggregatorSection, ...] = (AggregatorSection(),)
    """The aggregator processes the coordinator may give tasks to."""
    heartbeat_s: float = 1.0
    """How often aggregators report to the coordinator and selectors refresh their routes."""
    owner_ttl_s: float = 10.0
    """An aggregator silent this long loses its tasks to another live aggregator (or to a
    restart of itself); it stops serving them on its own after half of it."""
    internal_principal: str = "asyncfl-internal"
    """Token principal the roles use with each other (HMAC token from ``auth.secret_file``)."""
    ca_cert: str | None = None
    """PEM root the roles trust when they dial each other over TLS (null: ``server.tls_cert``)."""

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        if not self.heartbeat_s > 0:
            out.append(ConfigProblem("heartbeat_s", self.heartbeat_s, "a number > 0"))
        elif not self.owner_ttl_s >= 4 * self.heartbeat_s:
            need = f">= 4 x heartbeat_s ({self.heartbeat_s})"
            out.append(ConfigProblem("owner_ttl_s", self.owner_ttl_s, need))
        p = self.internal_principal
        if not p or p.isdigit() or "." in p:
            out.append(ConfigProblem("internal_principal", p, "a non-numeric name without '.'"))
        ids = [a.id for a in self.aggregators]
        if not ids or len(set(ids)) != len(ids):
            out.append(ConfigProblem("aggregators", ids, "at least one, with distinct ids"))
        return out


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
    roles: RolesSection = field(default_factory=RolesSection)
    """Addresses and timing of the roles when they run as separate processes."""

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        ids = [t.id for t in self.tasks]
        if not ids:
            out.append(ConfigProblem("tasks", [], "at least one task"))
        if len(set(ids)) != len(ids):
            out.append(ConfigProblem("tasks", ids, "distinct task ids"))
        out += self._validate_roles()
        return out

    def _validate_roles(self) -> list[ConfigProblem]:
        r, insecure = self.roles, self.server.insecure
        out = _address_problems("roles.coordinator", r.coordinator, insecure)
        if r.internal_principal == self.auth.operator_principal:
            out.append(
                ConfigProblem("roles.internal_principal", r.internal_principal, "not the operator")
            )
        known = {t.id for t in self.tasks}
        for i, a in enumerate(r.aggregators):
            at = f"roles.aggregators[{i}]"
            if not a.id or not all(c.isalnum() or c in "-_" for c in a.id):
                out.append(ConfigProblem(f"{at}.id", a.id, "letters, digits, '-' and '_'"))
            out += _address_problems(f"{at}.listen", a.listen, insecure)
            if a.advertise is not None:
                out += _address_problems(f"{at}.advertise", a.advertise, insecure)
            if set(a.tasks) - known:
                out.append(
                    ConfigProblem(f"{at}.tasks", list(a.tasks), f"ids among {sorted(known)}")
                )
        return out
