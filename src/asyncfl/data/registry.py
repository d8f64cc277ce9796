"""Pick and load a federated dataset from its config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from asyncfl.data.federated import FederatedDataset
from asyncfl.errors import ConfigProblem

__all__ = ["DataConfig", "load_dataset"]

DatasetName = Literal["synthetic", "digits", "femnist", "shakespeare", "fashion_mnist"]


@dataclass(frozen=True)
class DataConfig:
    name: DatasetName = "synthetic"
    """synthetic: FedProx Synthetic(alpha, beta); digits / fashion_mnist: Dirichlet label
    partition; femnist: one client per writer; shakespeare: one client per (play, role)."""
    num_clients: int = 100
    """Clients to generate (synthetic, digits, fashion_mnist) or the most to keep (femnist,
    shakespeare; see ``all_clients``)."""
    synthetic_alpha: float = 1.0
    """FedProx Synthetic(alpha, beta): model heterogeneity."""
    synthetic_beta: float = 1.0
    """FedProx Synthetic(alpha, beta): feature heterogeneity."""
    synthetic_iid: bool = False
    """Synthetic-IID: one shared model and feature distribution."""
    size_mean: float = 4.0
    """log-mean of the lognormal (power-law-like) client sizes of the synthetic data."""
    size_sigma: float = 1.0
    """log-std of the synthetic client sizes."""
    dirichlet_alpha: float = 0.5
    """Label skew of Dirichlet partitions (digits, fashion_mnist): small = very non-IID."""
    test_fraction: float = 0.2
    """Share of each client's examples held out for per-client evaluation."""
    path: str | None = None
    """Data file or folder (femnist: the .npz); default: ../shared/data/... beside the repo."""
    seq_len: int = 80
    """Characters per Shakespeare sample."""
    all_clients: bool = False
    """femnist/shakespeare: keep every writer / role, ignoring num_clients."""

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        if self.num_clients < 1:
            out.append(ConfigProblem("num_clients", self.num_clients, "an integer >= 1"))
        if not 0.0 < self.test_fraction < 1.0:
            out.append(ConfigProblem("test_fraction", self.test_fraction, "a number in (0, 1)"))
        if self.dirichlet_alpha <= 0:
            out.append(ConfigProblem("dirichlet_alpha", self.dirichlet_alpha, "a number > 0"))
        for name in ("synthetic_alpha", "synthetic_beta", "size_sigma"):
            if getattr(self, name) < 0:
                out.append(ConfigProblem(name, getattr(self, name), "a number >= 0"))
        if self.seq_len < 2:
            out.append(ConfigProblem("seq_len", self.seq_len, "an integer >= 2"))
        return out


def default_shared_data() -> Path:
    """``../shared/data`` beside the repository (where the offline data of this project lives)."""
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def load_dataset(cfg: DataConfig, seed: int) -> FederatedDataset:
    keep = None if cfg.all_clients else cfg.num_clients
    if cfg.name == "synthetic":
        from asyncfl.data.synthetic import synthetic_fedprox

        return synthetic_fedprox(
            num_clients=cfg.num_clients,
            alpha=cfg.synthetic_alpha,
            beta=cfg.synthetic_beta,
            size_mean=cfg.size_mean,
            size_sigma=cfg.size_sigma,
            test_fraction=cfg.test_fraction,
            seed=seed,
            iid=cfg.synthetic_iid,
        )
    if cfg.name == "digits":
        from asyncfl.data.arrays import digits_dirichlet

        return digits_dirichlet(cfg.num_clients, cfg.dirichlet_alpha, cfg.test_fraction, seed)
    if cfg.name == "fashion_mnist":
        from asyncfl.data.arrays import fashion_mnist_dirichlet

        return fashion_mnist_dirichlet(
            cfg.num_clients, cfg.dirichlet_alpha, cfg.test_fraction, seed
        )
    if cfg.name == "femnist":
        from asyncfl.data.femnist import load_femnist

        path = (
            Path(cfg.path) if cfg.path else default_shared_data() / "femnist" / "femnist_sf005.npz"
        )
        return load_femnist(path, max_clients=keep, test_fraction=cfg.test_fraction, seed=seed)
    from asyncfl.data.shakespeare import load_shakespeare

    ds: FederatedDataset = load_shakespeare(
        max_clients=keep, seq_len=cfg.seq_len, test_fraction=cfg.test_fraction, seed=seed
    )
    return ds
