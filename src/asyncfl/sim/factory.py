"""Build a ready-to-run :class:`Simulator` from a :class:`SimConfig`."""

from __future__ import annotations

from collections.abc import Callable

from asyncfl.algorithms.base import Aggregator
from asyncfl.algorithms.factory import make_aggregator
from asyncfl.algorithms.fedasync import FedAsyncConfig
from asyncfl.algorithms.fedavg import FedAvgConfig
from asyncfl.algorithms.fedbuff import FedBuffConfig
from asyncfl.core.params import ParamSpec
from asyncfl.core.server_opt import make_server_optimizer
from asyncfl.data.federated import FederatedDataset
from asyncfl.data.registry import default_shared_data, load_dataset
from asyncfl.errors import DataError
from asyncfl.sim.config import SimConfig
from asyncfl.sim.devices import DevicePopulation, synthetic_population
from asyncfl.sim.dp import DPMechanism, NoiseSite
from asyncfl.sim.lightsecagg_buffer import LightSecAggRunner, build_lightsecagg_aggregator
from asyncfl.sim.phones import load_phone_population
from asyncfl.sim.secure_buffer import TeeBufferRunner, build_tee_aggregator
from asyncfl.sim.secure_rounds import SecureRoundRunner
from asyncfl.sim.seeding import derive_seed, rng_for
from asyncfl.sim.simulator import Simulator
from asyncfl.training.local import LocalTrainer

__all__ = ["build_population", "build_simulator"]


def build_population(cfg: SimConfig, size: int, log: Callable[[str], None]) -> DevicePopulation:
    rng = rng_for(cfg.seed, "population")
    if cfg.population.kind == "phones":
        try:
            return load_phone_population(
                cfg.population.phones, size, rng, default_shared_data() / "devices", log=log
            )
        except DataError as exc:
            log(f"{exc}\nFalling back to the synthetic device population.")
    return synthetic_population(cfg.population.synthetic, size, rng)


def build_simulator(
    cfg: SimConfig,
    *,
    data: FederatedDataset | None = None,
    population: DevicePopulation | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> Simulator:
    """Everything a run needs, from the config (``data``/``population`` may be given directly)."""
    if data is None:
        data = load_dataset(cfg.data, cfg.seed)
    if population is None:
        population = build_population(cfg, data.num_clients, log)
    model = cfg.model.build(data.input_shape, data.num_classes, derive_seed(cfg.seed, "model_init"))
    trainer = LocalTrainer(model, cfg.client)
    init = ParamSpec.from_module(model).flatten(model.state_dict())
    alg = cfg.algorithm
    optimizer = make_server_optimizer(cfg.server_optimizer, init.shape[0])
    concurrency = alg.selection_size if isinstance(alg, FedAvgConfig) else alg.concurrency
    dp = None
    if cfg.privacy.enabled:
        denominator = (
            alg.cohort_size
            if isinstance(alg, FedAvgConfig)
            else (alg.buffer_size if isinstance(alg, FedBuffConfig) else 1)
        )
        pcfg = cfg.privacy.privacy_config(
            denominator, data.num_clients, sync=isinstance(alg, FedAvgConfig)
        )
        mode = cfg.secure_aggregation.mode
        site: NoiseSite = (
            "enclave" if mode == "tee" else "clients" if mode in ("secagg", "secagg+") else "server"
        )
        # With distributed noise, no released sum has fewer than min_updates shares.
        min_survivors = alg.min_updates if isinstance(alg, FedAvgConfig) else 1
        dp = DPMechanism(pcfg, derive_seed(cfg.seed, "dp_noise"), site, min_survivors)
        if pcfg.noise_source == "seeded":
            log("privacy.noise_source=seeded: reproducible noise, NO formal privacy guarantee")
    secure = None
    tee: TeeBufferRunner | LightSecAggRunner | None = None
    aggregator: Aggregator
    if cfg.secure_aggregation.mode == "tee":
        assert not isinstance(alg, FedAvgConfig)  # SimConfig.validate refuses it
        fedbuff = alg if isinstance(alg, FedBuffConfig) else alg.as_fedbuff()
        weighting = fedbuff.example_weighting
        aggregator, tee = build_tee_aggregator(
            cfg.secure_aggregation,
            fedbuff,
            init,
            optimizer,
            max_example_weight=int(data.train_sizes.max()) if weighting == "linear" else 1,
            mixing_rate=alg.mixing_rate if isinstance(alg, FedAsyncConfig) else 1.0,
            dp=dp,
            noise_seed=derive_seed(cfg.seed, "dp_noise"),
        )
        if fedbuff.buffer_size < 2:
            log(
                "secure_aggregation.mode=tee with buffer size 1 (fedasync): every release "
                "unmasks ONE update, so the server learns each update; the TEE then protects "
                "only the upload in transit and at rest"
            )
    elif cfg.secure_aggregation.mode == "lightsecagg":
        assert not isinstance(alg, FedAvgConfig)  # SimConfig.validate refuses it
        fedbuff = alg if isinstance(alg, FedBuffConfig) else alg.as_fedbuff()
        aggregator, tee = build_lightsecagg_aggregator(
            cfg.secure_aggregation,
            fedbuff,
            init,
            optimizer,
            num_users=data.num_clients,
            max_example_weight=(
                int(data.train_sizes.max()) if fedbuff.example_weighting == "linear" else 1
            ),
            mixing_rate=alg.mixing_rate if isinstance(alg, FedAsyncConfig) else 1.0,
        )
        if fedbuff.buffer_size < 2:
            log(
                "secure_aggregation.mode=lightsecagg with buffer size 1 (fedasync): every "
                "unmasking reveals ONE update to the server"
            )
    else:
        aggregator = make_aggregator(alg, init, optimizer, dp)
    if cfg.secure_aggregation.mode in ("secagg", "secagg+"):
        secure = SecureRoundRunner(
            cfg.secure_aggregation, init.shape[0], rng_for(cfg.seed, "secagg")
        )
    return Simulator(
        aggregator=aggregator,
        trainer=trainer,
        data=data,
        population=population,
        run=cfg.run,
        seed=cfg.seed,
        algorithm_name=alg.name if not isinstance(alg, FedAsyncConfig) else "fedasync",
        concurrency=concurrency,
        examples_processed=cfg.client.examples_processed,
        secure=secure,
        dp=dp,
        tee=tee,
    )
