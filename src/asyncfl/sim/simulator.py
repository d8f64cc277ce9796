"""The discrete-event simulator: clients really train, time is simulated.

One loop drives both modes over an :class:`EventQueue`:

- **async** (FedBuff, FedAsync): ``concurrency`` clients train at all times; every finished
  or dropped client is replaced at once by an idle, online client.
- **sync** (FedAvg): a round selects ``ceil(C (1 + o))`` idle online clients; the first C
  updates (or the deadline, or the last dropout) close it; the clients still training are
  cancelled and the next round starts at that instant.

A client's duration is download + compute (examples x epochs x seconds-per-example of its
device) + upload. It drops out with its device's probability at a uniform moment of the
task, or when its daily online window closes first. Training runs when a client *finishes*,
from the model version it downloaded (kept once per version, reference-counted), so
dropped clients cost no compute.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt
import torch
from threadpoolctl import threadpool_limits

from asyncfl.algorithms.base import Aggregator, Outcome
from asyncfl.algorithms.fedavg import FedAvg, FedAvgConfig
from asyncfl.core.update import FloatVector, Update
from asyncfl.core.weights import example_weight
from asyncfl.data.federated import FederatedDataset
from asyncfl.errors import PrivacyBudgetExceeded, UpdateRejected
from asyncfl.sim.config import RunConfig
from asyncfl.sim.devices import DevicePopulation
from asyncfl.sim.dp import DPMechanism
from asyncfl.sim.events import EventKind, EventQueue
from asyncfl.sim.lightsecagg_buffer import LightSecAggRunner
from asyncfl.sim.online import OnlineTracker
from asyncfl.sim.secure_buffer import TeeBufferRunner
from asyncfl.sim.secure_rounds import SecureRoundRunner
from asyncfl.sim.seeding import derive_seed, rng_for
from asyncfl.training.evaluate import evaluate
from asyncfl.training.local import LocalTrainer

__all__ = ["Progress", "SimResult", "Simulator"]

I64 = npt.NDArray[np.int64]
# Selections of at most this many clients try rejection sampling first, with this many
# random draws per wanted client before falling back to a full scan.
_REJECTION_MAX_K = 8
_REJECTION_TRIES = 16
# Consecutive wake-ups without being able to start a round before we give up.
_MAX_IDLE_WAKES = 10_000


@dataclass(frozen=True)
class Progress:
    sim_time_s: float
    server_steps: int
    client_updates: int
    metrics: dict[str, float] | None


@dataclass
class SimResult:
    algorithm: str
    sim_time_s: float = 0.0
    server_steps: int = 0
    client_updates: int = 0
    """Updates the aggregator accepted."""
    dropped_updates: int = 0
    """Clients that dropped out mid-task (random dropout or end of their online window)."""
    cancelled_updates: int = 0
    """Over-selected clients still training when their round closed."""
    discarded_updates: int = 0
    """Accepted updates thrown away (failed rounds, zero-weight buffers)."""
    rejected: dict[str, int] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    wall_time_s: float = 0.0
    train_wall_time_s: float = 0.0
    eval_wall_time_s: float = 0.0
    failed_rounds: int = 0
    stop_reason: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    participation: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    staleness_counts: dict[int, int] = field(default_factory=dict)
    privacy: dict[str, object] | None = None
    """Privacy spent (epsilon at delta) and the mechanism's settings."""
    secure: dict[str, object] | None = None
    """Secure-aggregation protocol statistics (bytes and compute per client and stage)."""


@dataclass
class _Task:
    client: int
    base_version: int
    start: float
    end: float
    dropped: bool
    round_version: int = -1


class Simulator:
    """Runs one simulation. Build with :func:`asyncfl.sim.factory.build_simulator`."""

    def __init__(
        self,
        *,
        aggregator: Aggregator,
        trainer: LocalTrainer,
        data: FederatedDataset,
        population: DevicePopulation,
        run: RunConfig,
        seed: int,
        algorithm_name: str,
        concurrency: int,
        examples_processed: Callable[[int], int],
        secure: SecureRoundRunner | None = None,
        dp: DPMechanism | None = None,
        tee: TeeBufferRunner | LightSecAggRunner | None = None,
    ) -> None:
        if population.size != data.num_clients:
            raise ValueError(
                f"population has {population.size} devices but data has {data.num_clients} clients"
            )
        self.agg = aggregator
        self.trainer = trainer
        self.data = data
        self.pop = population
        self.run_cfg = run
        self.seed = seed
        self.sync = isinstance(aggregator, FedAvg)
        self.concurrency = concurrency
        self._examples_processed = examples_processed
        if secure is not None and not self.sync:
            raise ValueError("secure aggregation rounds need a synchronous (FedAvg) aggregator")
        self.secure = secure
        if tee is not None and self.sync:
            raise ValueError("the TEE secure buffer needs an asynchronous (FedBuff) aggregator")
        self.tee = tee
        self._tee_rng = rng_for(seed, "tee")
        self.dp = dp
        self.queue = EventQueue()
        self.busy = np.zeros(data.num_clients, dtype=bool)
        self.train_sizes = data.train_sizes.astype(np.int64)
        self.has_data = self.train_sizes > 0
        self.tasks: dict[int, _Task] = {}
        self._next_task = 0
        self._versions: dict[int, tuple[FloatVector, int]] = {}
        self._select_rng = rng_for(seed, "select")
        self._online = OnlineTracker(population)
        # One-element index arrays, made once: the async hot path selects one client at a time.
        self._one = np.arange(population.size, dtype=np.int64).reshape(-1, 1)
        self._always_online = self._online.always
        self._device_rng = rng_for(seed, "device")
        self._wake_pending = False
        self._idle_wakes = 0
        self._round_open = False
        self._round_outstanding = 0
        self.model_bytes = aggregator.dim * 4
        self.result = SimResult(algorithm=algorithm_name)
        self.result.participation = np.zeros(data.num_clients, np.int64)
        self._stop: str | None = None

    # -- model versions kept for clients in flight ---------------------------------------
    def _acquire(self, version: int) -> None:
        params, refs = self._versions.get(version, (None, 0))
        if params is None:
            params = self.agg.params.copy()
        self._versions[version] = (params, refs + 1)

    def _release(self, version: int) -> FloatVector:
        params, refs = self._versions[version]
        if refs <= 1:
            del self._versions[version]
        else:
            self._versions[version] = (params, refs - 1)
        return params

    # -- selection and dispatch -----------------------------------------------------------
    def _candidates(self, t: float) -> I64:
        ok = ~self.busy & self.has_data
        if not self._always_online:
            ok &= self._online.at(t)
        return np.flatnonzero(ok)

    def _dispatch(self, clients: I64, t: float) -> None:
        version = self.agg.version
        pop, rng = self.pop, self._device_rng
        spe, p_drop = pop.sec_per_example, pop.dropout_prob
        # Python scalars throughout: this runs once per client update, and numpy on
        # one-element arrays costs more than the arithmetic itself.
        for c in clients.tolist():
            down_s, up_s = pop.transfer_seconds_one(c, self.model_bytes, self.model_bytes, rng)
            compute = self._examples_processed(int(self.train_sizes[c])) * float(spe[c])
            duration = down_s + compute + up_s
            u_drop, u_when = rng.random(2).tolist()
            finish = t + duration
            dropped = False
            if u_drop < p_drop[c]:
                dropped, finish = True, t + u_when * duration
            if not self._always_online:
                window_end = pop.window_end_one(t, c)
                if window_end < finish:
                    dropped, finish = True, window_end
            tid = self._next_task
            self._next_task += 1
            self.tasks[tid] = _Task(c, version, t, finish, dropped, version if self.sync else -1)
            self.busy[c] = True
            self._acquire(version)
            self.result.bytes_down += self.model_bytes
            self.queue.push(finish, EventKind.DROP if dropped else EventKind.FINISH, tid)

    def _select(self, t: float, k: int) -> I64:
        """``k`` distinct idle, online clients with data, uniformly at random (fewer if short)."""
        if k <= _REJECTION_MAX_K:
            # Rejection sampling: O(k) expected when eligible clients are not rare, instead of
            # an O(population) scan for every replacement.
            online = self._online.at(t)
            n = self.busy.shape[0]
            picked: list[int] = []
            for c in self._select_rng.integers(n, size=_REJECTION_TRIES * k).tolist():
                if online[c] and not self.busy[c] and self.has_data[c] and c not in picked:
                    picked.append(c)
                    if len(picked) == k:
                        return np.array(sorted(picked), dtype=np.int64) if k > 1 else self._one[c]
        cand = self._candidates(t)
        if cand.size <= k:
            return cand
        return np.sort(cand[self._select_rng.choice(cand.size, size=k, replace=False)])

    def _schedule_wake(self, t: float) -> None:
        if self._wake_pending:
            return
        idle = np.flatnonzero(~self.busy & self.has_data)
        if idle.size == 0:
            return
        nxt = self.pop.next_online(t, idle)
        later = nxt[np.isfinite(nxt) & (nxt > t)]
        if later.size == 0:
            return
        self._wake_pending = True
        self.queue.push(float(later.min()), EventKind.WAKE)

    def _fill_async(self, t: float) -> None:
        need = self.concurrency - len(self.tasks)
        if need <= 0:
            return
        chosen = self._select(t, need)
        if chosen.size:
            self._dispatch(chosen, t)
        if chosen.size < need:
            self._schedule_wake(t)

    def _start_round(self, t: float) -> None:
        assert isinstance(self.agg, FedAvg)
        cfg: FedAvgConfig = self.agg.cfg
        if self._candidates(t).size < cfg.cohort_size:
            self._idle_wakes += 1
            if self._idle_wakes > _MAX_IDLE_WAKES:
                self._stop = "population_cannot_supply_cohort"
                return
            self._schedule_wake(t)
            return
        self._idle_wakes = 0
        chosen = self._select(t, cfg.selection_size)
        self._round_open = True
        self._round_outstanding = int(chosen.size)
        self._dispatch(chosen, t)
        if cfg.round_deadline_s is not None:
            self.queue.push(t + cfg.round_deadline_s, EventKind.DEADLINE, self.agg.version)

    def _close_round(self, outcome: Outcome, t: float) -> None:
        self._round_open = False
        if self.dp is not None and outcome.step is None:
            self.dp.forget_pending()
        if outcome.reason == "round_failed":
            self.result.failed_rounds += 1
        self.result.discarded_updates += outcome.discarded
        # Cancel the over-selected clients still training for the closed round.
        for tid in [k for k, task in self.tasks.items() if task.round_version >= 0]:
            task = self.tasks.pop(tid)
            self.busy[task.client] = False
            self._release(task.base_version)
            self.result.cancelled_updates += 1
        self._round_outstanding = 0

    # -- event handling -------------------------------------------------------------------
    def _finish(self, tid: int, t: float) -> Outcome | None:
        task = self.tasks.pop(tid, None)
        if task is None:  # cancelled when its round closed
            return None
        self.busy[task.client] = False
        params = self._release(task.base_version)
        x, y = self.data.client_train(task.client)
        t0 = time.perf_counter()
        res = self.trainer.train(
            params, x, y, derive_seed(self.seed, "train", task.client, task.base_version)
        )
        self.result.train_wall_time_s += time.perf_counter() - t0
        self.result.bytes_up += self.model_bytes
        delta = res.delta if self.dp is None else self.dp.clip(res.delta)
        update = Update(task.client, task.base_version, res.num_examples, delta)
        if self.tee is not None:
            out = self.tee.submit(update, self._tee_rng)
        elif self.secure is not None:
            out = self._secure_submit(update)
        else:
            out = self.agg.on_update(update)
        if self.dp is not None:
            if not out.accepted:
                self.dp.forget_last()
            elif out.discarded and out.step is None:
                self.dp.forget_pending()
        if out.accepted:
            self.result.client_updates += 1
            self.result.participation[task.client] += 1
            self.result.staleness_counts[out.staleness] = (
                self.result.staleness_counts.get(out.staleness, 0) + 1
            )
        else:
            assert out.reason is not None
            self.result.rejected[out.reason] = self.result.rejected.get(out.reason, 0) + 1
        if self.sync:
            self._round_outstanding -= 1
        return out

    def _secure_submit(self, update: Update) -> Outcome:
        """The client keeps its encoded update; the aggregator sees only the round's sum."""
        assert self.secure is not None and isinstance(self.agg, FedAvg)
        try:
            update.validate(self.agg.dim, self.agg.version)
        except UpdateRejected as exc:
            return Outcome(accepted=False, reason=exc.reason, detail=exc.detail)
        if update.base_version != self.agg.version:
            return Outcome(accepted=False, reason="late", detail="round already closed")
        e = example_weight(self.agg.cfg.example_weighting, update.num_examples)
        x = update.delta
        if self.dp is not None and self.dp.site == "clients":
            # Distributed DP: the client adds its noise share before encoding and masking,
            # so no party ever sees an un-noised sum.
            x = (x + self.dp.noise_share(x.shape[0])).astype(np.float32)
        self.secure.submit(update.client_id, x, round(e))
        if self.secure.count < self.agg.cfg.cohort_size:
            return Outcome(accepted=True, weight=e)
        return self._secure_close()

    def _secure_close(self) -> Outcome:
        assert self.secure is not None
        count = self.secure.count
        min_inputs = self.dp.min_survivors if self.dp is not None else 2
        weighted_sum, total, survivors = self.secure.close(min_inputs)
        if weighted_sum is None:
            return Outcome(accepted=True, reason="round_failed", discarded=count)
        out = self.agg.on_aggregate(self.agg.version, weighted_sum, total, survivors)
        return replace(out, discarded=out.discarded + count - survivors)

    def _round_deadline(self, version: int) -> Outcome:
        assert isinstance(self.agg, FedAvg)
        if self.secure is None:
            return self.agg.on_deadline(version)
        if version != self.agg.version:
            return Outcome(accepted=True)
        if self.secure.count >= self.agg.cfg.min_updates:
            return self._secure_close()
        return Outcome(accepted=True, reason="round_failed", discarded=self.secure.discard())

    def _drop(self, tid: int) -> None:
        task = self.tasks.pop(tid, None)
        if task is None:
            return
        self.busy[task.client] = False
        self._release(task.base_version)
        self.result.dropped_updates += 1
        if self.sync:
            self._round_outstanding -= 1

    def _after_step(self, t: float, progress: Callable[[Progress], None] | None) -> None:
        r = self.result
        r.server_steps = self.agg.version
        metrics = None
        if r.server_steps % self.run_cfg.eval_every == 0:
            metrics = self._evaluate(t)
        if progress is not None:
            progress(Progress(t, r.server_steps, r.client_updates, metrics))
        limit = self.run_cfg.max_server_steps
        if limit is not None and r.server_steps >= limit:
            self._stop = "max_server_steps"

    def _evaluate(self, t: float) -> dict[str, float]:
        t0 = time.perf_counter()
        self.trainer.load(np.ascontiguousarray(self.agg.params))
        ev = evaluate(self.trainer.model, self.data, self.run_cfg.eval_batch_size)
        metrics = ev.metrics(self.train_sizes)
        if self.dp is not None:
            metrics["epsilon"] = self.dp.accountant.epsilon()
        self.result.eval_wall_time_s += time.perf_counter() - t0
        row = {
            "sim_time_s": t,
            "server_steps": float(self.agg.version),
            "client_updates": float(self.result.client_updates),
            **metrics,
        }
        self.result.history.append(row)
        self.result.final = metrics
        rc = self.run_cfg
        if rc.target_metric is not None and rc.target_value is not None:
            v = metrics.get(rc.target_metric)
            if v is not None and (
                v >= rc.target_value if rc.target_mode == "max" else v <= rc.target_value
            ):
                self._stop = "target_reached"
        return metrics

    def run(self, progress: Callable[[Progress], None] | None = None) -> SimResult:
        threads = torch.get_num_threads()
        torch.set_num_threads(self.run_cfg.torch_threads)
        try:
            # numpy's BLAS too: its per-call thread start-up dominates model-sized vector ops.
            with threadpool_limits(limits=self.run_cfg.torch_threads):
                return self._run(progress)
        finally:
            torch.set_num_threads(threads)
            if self.tee is not None:
                self.tee.close()  # stops a subprocess enclave; a run is not resumed

    def _run(self, progress: Callable[[Progress], None] | None) -> SimResult:
        wall0 = time.perf_counter()
        rc = self.run_cfg
        self._evaluate(0.0)
        if progress is not None:
            progress(Progress(0.0, 0, 0, self.result.final))
        if self._stop is None:
            if self.sync:
                self._start_round(0.0)
            else:
                self._fill_async(0.0)
        t = 0.0
        while self._stop is None:
            nxt = self.queue.peek_time()
            if nxt is None:
                self._stop = "no_more_events"
                break
            if rc.max_sim_time_s is not None and nxt > rc.max_sim_time_s:
                t = rc.max_sim_time_s
                self._stop = "max_sim_time_s"
                break
            batch = self.queue.pop_batch()
            t = self.queue.now
            for ev in batch:
                if self._stop is not None:
                    break
                out: Outcome | None = None
                if ev.kind == EventKind.FINISH:
                    try:
                        out = self._finish(ev.ref, t)
                    except PrivacyBudgetExceeded:
                        self._stop = "privacy_budget"
                        break
                elif ev.kind == EventKind.DROP:
                    self._drop(ev.ref)
                elif ev.kind == EventKind.WAKE:
                    self._wake_pending = False
                elif (
                    ev.kind == EventKind.DEADLINE
                    and self._round_open
                    and isinstance(self.agg, FedAvg)
                    and ev.ref == self.agg.version
                ):
                    out = self._round_deadline(ev.ref)
                    self._close_round(out, t)
                if out is not None and out.step is not None:
                    if self.sync and self._round_open:
                        self._close_round(out, t)
                    self._after_step(t, progress)
                elif out is not None and not self.sync:
                    self.result.discarded_updates += out.discarded
                if (
                    rc.max_client_updates is not None
                    and self.result.client_updates >= rc.max_client_updates
                ):
                    self._stop = "max_client_updates"
            if self._stop is not None:
                break
            if self.sync:
                if self._round_open and self._round_outstanding == 0:
                    # Everyone selected finished or dropped before C updates arrived.
                    out = self._round_deadline(self.agg.version)
                    self._close_round(out, t)
                    if out.step is not None:
                        self._after_step(t, progress)
                if not self._round_open and self._stop is None:
                    self._start_round(t)
            else:
                self._fill_async(t)
        r = self.result
        r.sim_time_s = t
        r.server_steps = self.agg.version
        r.stop_reason = self._stop or "done"
        r.rejected = dict(sorted(r.rejected.items()))
        if self.secure is not None:
            r.secure = self.secure.stats.summary()
        if self.tee is not None:
            r.secure = self.tee.summary()
        if self.dp is not None:
            r.privacy = self.dp.summary()
        if not r.history or r.history[-1]["server_steps"] != float(self.agg.version):
            self._evaluate(t)
        r.wall_time_s = time.perf_counter() - wall0
        return r
