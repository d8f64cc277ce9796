"""The public surface is what we mean it to be, and layers import only downward."""

from __future__ import annotations

import ast
from pathlib import Path

import asyncfl

SRC = Path(__file__).resolve().parents[1] / "src" / "asyncfl"

EXPECTED = {
    "Aggregator", "AsyncFLError", "ConfigError", "CryptoError", "DataError", "FedAsyncConfig",
    "FedAvg", "FedAvgConfig", "FedBuff", "FedBuffConfig", "Outcome", "ParamSpec",
    "PrivacyBudgetExceeded", "ProtocolError", "ServerOptimizerConfig", "SimConfig", "SimResult",
    "Simulator", "Update", "UpdateRejected", "__version__", "build_config", "build_simulator",
    "make_aggregator", "make_server_optimizer",
}  # fmt: skip

# Each layer and the layers it may import (besides itself and errors).
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "models": {"core"},
    "privacy": {"core"},
    "secure": {"core", "privacy"},
    "training": {"core", "data", "models"},
    "algorithms": {"core", "privacy", "secure"},
    "sim": {"core", "data", "models", "training", "algorithms", "privacy", "secure"},
    "experiments": {"core", "data", "models", "training", "algorithms", "privacy", "secure", "sim"},
    "service": {"core", "data", "models", "training", "algorithms", "privacy", "secure", "sim"},
}


def test_public_names() -> None:
    assert set(asyncfl.__all__) == EXPECTED
    for name in asyncfl.__all__:
        assert getattr(asyncfl, name) is not None


def _imported_layers(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("asyncfl."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("asyncfl."):
                    out.add(alias.name.split(".")[1])
    return out


def test_layers_import_only_downward() -> None:
    bad = []
    for layer, allowed in ALLOWED.items():
        for path in (SRC / layer).rglob("*.py"):
            extra = _imported_layers(path) - allowed - {layer, "errors"}
            if extra:
                bad.append(f"{path.relative_to(SRC)} imports {sorted(extra)}")
    assert not bad, "layering violations:\n" + "\n".join(bad)
