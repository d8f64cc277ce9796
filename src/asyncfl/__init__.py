"""asyncfl: asynchronous federated learning at scale.

The public names most users need are re-exported here; everything else lives in its layer
(``asyncfl.algorithms``, ``asyncfl.core``, ``asyncfl.sim``, ``asyncfl.data``,
``asyncfl.models``, ``asyncfl.training``, ``asyncfl.privacy``, ``asyncfl.secure``).
"""

from importlib.metadata import PackageNotFoundError, version

from asyncfl.algorithms import (
    Aggregator,
    FedAsyncConfig,
    FedAvg,
    FedAvgConfig,
    FedBuff,
    FedBuffConfig,
    Outcome,
    make_aggregator,
)
from asyncfl.core.configload import build_config
from asyncfl.core.params import ParamSpec
from asyncfl.core.server_opt import ServerOptimizerConfig, make_server_optimizer
from asyncfl.core.update import Update
from asyncfl.errors import (
    AsyncFLError,
    ConfigError,
    CryptoError,
    DataError,
    PrivacyBudgetExceeded,
    ProtocolError,
    UpdateRejected,
)
from asyncfl.sim.config import SimConfig
from asyncfl.sim.factory import build_simulator
from asyncfl.sim.simulator import SimResult, Simulator

try:
    __version__ = version("asyncfl")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "Aggregator",
    "AsyncFLError",
    "ConfigError",
    "CryptoError",
    "DataError",
    "FedAsyncConfig",
    "FedAvg",
    "FedAvgConfig",
    "FedBuff",
    "FedBuffConfig",
    "Outcome",
    "ParamSpec",
    "PrivacyBudgetExceeded",
    "ProtocolError",
    "ServerOptimizerConfig",
    "SimConfig",
    "SimResult",
    "Simulator",
    "Update",
    "UpdateRejected",
    "__version__",
    "build_config",
    "build_simulator",
    "make_aggregator",
    "make_server_optimizer",
]
