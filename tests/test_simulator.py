"""The simulator: event order, concurrency, replacement, rounds, determinism, equivalence."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from asyncfl.algorithms import FedAsyncConfig, FedAvgConfig, FedBuffConfig
from asyncfl.core.weights import StalenessConfig
from asyncfl.data.federated import FederatedDataset
from asyncfl.data.synthetic import synthetic_fedprox
from asyncfl.sim.config import RunConfig, SimConfig
from asyncfl.sim.devices import DAY_S, DevicePopulation
from asyncfl.sim.events import EventKind, EventQueue
from asyncfl.sim.factory import build_simulator
from asyncfl.sim.simulator import Simulator
from asyncfl.training.config import ClientConfig

N = 24


@pytest.fixture(scope="module")
def data() -> FederatedDataset:
    return synthetic_fedprox(num_clients=N, size_mean=3.0, size_sigma=0.8, seed=3)


def flat_population(n: int, *, spe: float = 0.0, dropout: float = 0.0) -> DevicePopulation:
    """Equal devices: with spe=0 every client takes the same (transfer) time."""
    return DevicePopulation(
        sec_per_example=np.full(n, spe),
        downlink_bps=np.full(n, 1e6),
        uplink_bps=np.full(n, 1e6),
        dropout_prob=np.full(n, dropout),
        window_start_s=np.zeros(n),
        window_length_s=np.full(n, DAY_S),
        speed_score=np.ones(n),
    )


def _cfg(
    alg: FedAvgConfig | FedBuffConfig | FedAsyncConfig, steps: int = 4, seed: int = 0
) -> SimConfig:
    return SimConfig(
        seed=seed,
        algorithm=alg,
        client=ClientConfig(epochs=1, batch_size=8, lr=0.05),
        run=RunConfig(max_server_steps=steps, eval_every=2),
    )


def test_event_queue_batches_equal_times_in_insertion_order() -> None:
    q = EventQueue()
    q.push(2.0, EventKind.FINISH, 1)
    q.push(1.0, EventKind.DROP, 2)
    q.push(2.0, EventKind.FINISH, 3)
    q.push(1.0, EventKind.FINISH, 4)
    assert [e.ref for e in q.pop_batch()] == [2, 4] and q.now == 1.0
    assert [e.ref for e in q.pop_batch()] == [1, 3] and q.now == 2.0
    with pytest.raises(ValueError, match="in the past"):
        q.push(1.5, EventKind.WAKE)


def test_fedbuff_k_equals_mc_reproduces_fedavg_exactly(data: FederatedDataset) -> None:
    pop = flat_population(N)
    buff = FedBuffConfig(
        concurrency=6,
        buffer_size=6,
        staleness=StalenessConfig(kind="constant"),
        example_weighting="linear",
    )
    avg = FedAvgConfig(cohort_size=6, example_weighting="linear")
    s_buff = build_simulator(_cfg(buff), data=data, population=pop)
    s_avg = build_simulator(_cfg(avg), data=data, population=pop)
    r_buff, r_avg = s_buff.run(), s_avg.run()
    assert r_buff.server_steps == r_avg.server_steps == 4
    np.testing.assert_array_equal(s_buff.agg.params, s_avg.agg.params)
    np.testing.assert_array_equal(r_buff.participation, r_avg.participation)
    assert r_buff.history == r_avg.history
    assert r_buff.sim_time_s == r_avg.sim_time_s
    # And the model really moved.
    assert r_buff.history[-1]["loss"] != r_buff.history[0]["loss"]


def _instrument(sim: Simulator, limit: int, exact: bool = False) -> list[float]:
    """Check between event batches that no more (or, ``exact``, exactly) ``limit`` clients train."""
    times: list[float] = []
    pop_batch = sim.queue.pop_batch

    def checked():  # type: ignore[no-untyped-def]
        busy = int(sim.busy.sum())
        assert busy == limit if exact else busy <= limit
        assert busy == len(sim.tasks)
        batch = pop_batch()
        if batch:
            times.append(batch[0].time)
        return batch

    sim.queue.pop_batch = checked  # type: ignore[method-assign]
    return times


def test_async_keeps_concurrency_and_replaces_dropouts(data: FederatedDataset) -> None:
    pop = replace(
        flat_population(N, spe=0.05, dropout=0.3), sec_per_example=np.linspace(0.01, 0.3, N)
    )
    cfg = _cfg(FedBuffConfig(concurrency=5, buffer_size=3), steps=10)
    sim = build_simulator(cfg, data=data, population=pop)
    times = _instrument(sim, 5, exact=True)
    r = sim.run()
    assert times == sorted(times)  # virtual time never goes backwards
    assert r.server_steps == 10 and r.client_updates == 30
    assert r.dropped_updates > 0
    # Every dispatched task either finished, dropped, or is still in flight.
    assert sim._next_task == r.client_updates + r.dropped_updates + len(sim.tasks)
    assert max(r.staleness_counts) >= 1  # heterogeneous speeds make stale updates


def test_sync_over_selection_cancels_stragglers(data: FederatedDataset) -> None:
    pop = replace(flat_population(N), sec_per_example=np.linspace(0.01, 1.0, N))
    cfg = _cfg(FedAvgConfig(cohort_size=4, over_selection=0.5), steps=5)
    sim = build_simulator(cfg, data=data, population=pop)
    _instrument(sim, 6)
    r = sim.run()
    assert r.server_steps == 5 and r.client_updates == 20
    assert r.cancelled_updates == 5 * 2
    assert not sim.busy.any() or len(sim.tasks) <= 6


def test_sync_deadline_drops_slow_clients(data: FederatedDataset) -> None:
    spe = np.where(np.arange(N) % 2 == 0, 0.001, 100.0)  # half the clients are hopeless
    pop = replace(flat_population(N), sec_per_example=spe)
    cfg = _cfg(FedAvgConfig(cohort_size=8, round_deadline_s=60.0, min_updates=1), steps=3)
    r = build_simulator(cfg, data=data, population=pop).run()
    assert r.server_steps == 3
    assert r.participation[1::2].sum() == 0  # slow clients never make the deadline
    assert r.cancelled_updates > 0
    assert r.sim_time_s == pytest.approx(3 * 60.0)


def test_all_clients_dropping_fails_rounds_cleanly(data: FederatedDataset) -> None:
    pop = flat_population(N, spe=0.01, dropout=0.999)
    cfg = replace(
        _cfg(FedAvgConfig(cohort_size=4)), run=RunConfig(max_server_steps=2, max_sim_time_s=50.0)
    )
    r = build_simulator(cfg, data=data, population=pop).run()
    assert r.server_steps == 0 and r.failed_rounds > 0 and r.stop_reason == "max_sim_time_s"


def test_daily_availability_limits_who_trains(data: FederatedDataset) -> None:
    # Clients 0..11 are online for the first hour of each day only, the rest never overlap t=0.
    start = np.where(np.arange(N) < 12, 0.0, 12 * 3600.0)
    pop = replace(
        flat_population(N, spe=0.01), window_start_s=start, window_length_s=np.full(N, 3600.0)
    )
    cfg = _cfg(FedBuffConfig(concurrency=4, buffer_size=2), steps=6)
    sim = build_simulator(cfg, data=data, population=pop)
    r = sim.run()
    assert r.participation[12:].sum() == 0 and r.participation[:12].sum() == 12
    assert r.sim_time_s < 3600.0


def test_deterministic_under_seed(data: FederatedDataset) -> None:
    pop = replace(flat_population(N, dropout=0.2), sec_per_example=np.linspace(0.01, 0.2, N))
    alg = FedBuffConfig(concurrency=5, buffer_size=2)
    runs = [build_simulator(_cfg(alg, seed=s), data=data, population=pop) for s in (7, 7, 8)]
    results = [s.run() for s in runs]
    np.testing.assert_array_equal(runs[0].agg.params, runs[1].agg.params)
    assert results[0].history == results[1].history
    assert not np.array_equal(runs[0].agg.params, runs[2].agg.params)


def test_fedasync_runs_one_update_per_step(data: FederatedDataset) -> None:
    pop = replace(flat_population(N), sec_per_example=np.linspace(0.01, 0.2, N))
    r = build_simulator(
        _cfg(FedAsyncConfig(concurrency=4), steps=8), data=data, population=pop
    ).run()
    assert r.server_steps == 8 and r.client_updates == 8


def test_scalar_device_queries_match_vectorised() -> None:
    rng = np.random.default_rng(0)
    n = 50
    pop = replace(
        flat_population(n),
        downlink_bps=rng.uniform(1e5, 1e7, n),
        uplink_bps=rng.uniform(1e5, 1e7, n),
        window_start_s=rng.uniform(0, DAY_S, n),
        window_length_s=np.where(np.arange(n) % 5 == 0, DAY_S, rng.uniform(0, DAY_S, n)),
    )
    for t in (0.0, 5_000.0, 100_000.0):
        idx = np.arange(n)
        ends = pop.window_end(t, idx)
        for c in range(n):
            assert pop.window_end_one(t, c) == pytest.approx(ends[c]) or (
                np.isinf(ends[c]) and np.isinf(pop.window_end_one(t, c))
            )
    down, up = pop.transfer_seconds(np.arange(n), 1000, 2000, np.random.default_rng(1))
    for c in range(n):
        d1, u1 = pop.transfer_seconds_one(c, 1000, 2000, np.random.default_rng(1))
        assert d1 == pytest.approx(down[c]) and u1 == pytest.approx(up[c])
