"""``secure_aggregation: secagg / secagg+`` in the service.

First the server-side round driver (:class:`SecAggRound`) as a state machine, with real
:class:`SecAggClient` machines and no network: it sums exactly the survivors' weighted
inputs, survives a dropout at any stage, closes stages at their deadline, keeps the unmasking
floor, and refuses every bad message without changing state. Then over gRPC on 127.0.0.1
(in-process server): tasks step with the exact weighted mean (within the fixed-point bound),
a client that vanishes after sharing its keys does not stop the round (SecAgg and SecAgg+),
a restart abandons the round in flight and the task completes with each round applied once,
distributed DP noise has the calibrated level, hostile messages to the new RPCs get their
catalog status and change nothing, and a ``kill -9`` of the server process mid-task loses no
applied round and applies none twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
import sqlite3
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from asyncfl.core.configload import build_config
from asyncfl.core.update import FloatVector
from asyncfl.errors import ConfigError
from asyncfl.secure.secagg import SecAggClient, Stage
from asyncfl.secure.secagg.messages import (
    AdvertiseKeys,
    ClientMessage,
    EncryptedShare,
    KeyBroadcast,
    PublicKeys,
    ShareBroadcast,
    UnmaskRequest,
    UnmaskResponse,
)
from asyncfl.service.auth import Secret, bearer_metadata
from asyncfl.service.checkpoint import checkpoint_name, read_checkpoint
from asyncfl.service.client import ClientOptions, TrainResult, run_client_async
from asyncfl.service.config import ServiceConfig
from asyncfl.service.errors import REASON_KEY, ServiceError
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
from asyncfl.service.proto.asyncfl.v1 import service_pb2_grpc as pb_grpc
from asyncfl.service.secagg_round import (
    Phase,
    RoundDone,
    RoundInfo,
    SecAggParams,
    SecAggRound,
    round_config,
)
from asyncfl.service.secagg_wire import SHARE_BYTES, params_from_pb
from asyncfl.service.server import ServiceHandle, start_server
from asyncfl.service.task import initial_params

SC = grpc.StatusCode


def _params(mode: str = "secagg", **kw: Any) -> SecAggParams:
    base: dict[str, Any] = {
        "mode": mode,
        "clip": 1.0,
        "frac_bits": 20,
        "ring_bits": 48,
        "threshold_fraction": 0.5,
        # SecAgg+ with no corrupt or dropout budget: a sparse degree-2 graph from n = 4 on.
        "corrupt_fraction": 0.0,
        "dropout_fraction": 0.0,
        "stage_timeout_s": 5.0,
        "max_weight": 1000,
    }
    base.update(kw)
    return SecAggParams(**base)


def _inputs(n: int, dim: int) -> dict[int, FloatVector]:
    # Distinct scales and offsets per client: a wrong weight or a missing input shows.
    rng = np.random.default_rng(7)
    return {10 + i: (rng.normal(0.1 * i, 0.2 + 0.1 * i, dim)).astype(np.float32) for i in range(n)}


def _digest(msg: ClientMessage) -> bytes:
    return hashlib.sha256(repr(msg).encode()).digest()


class _Driver:
    """Moves messages between client machines and the round as a transport would."""

    def __init__(
        self,
        rnd: SecAggRound,
        inputs: dict[int, FloatVector],
        weights: dict[int, int],
    ) -> None:
        self.rnd = rnd
        self.inputs = inputs
        self.weights = weights
        self.now = 0.0
        self.machines: dict[int, SecAggClient] = {}
        self.replies: dict[int, Any] = {}
        self.encoded: dict[int, Any] = {}

    def join_all(self, clients: Iterable[int]) -> None:
        for c in clients:
            self.rnd.join(c, num_examples=self.weights[c], weight=self.weights[c])
        self.rnd.advance(self.now)
        if self.rnd.phase is Phase.FAILED:
            return
        codec = self.rnd.params.codec
        for c in self.rnd.participants:
            info = self.rnd.reply(c, None)
            assert isinstance(info, RoundInfo) and info.weight == self.weights[c]
            # The device derives the config itself; it must equal the server's.
            cfg = round_config(
                self.rnd.params, self.rnd.dim, info.participants, info.session_id, info.graph_seed
            )
            assert cfg == self.rnd.config
            self.machines[c] = SecAggClient(c, cfg)
            self.encoded[c] = codec.encode(self.inputs[c], info.weight, np.random.default_rng(c))

    def stage(self, stage: Stage, drop: Iterable[int] = (), close: bool = True) -> None:
        gone = set(drop)
        for c in list(self.machines):
            if c in gone or not self._alive(c, stage):
                continue
            msg = self.message(c, stage)
            self.rnd.receive(c, msg, _digest(msg))
        for c in gone:
            self.machines.pop(c, None)
        if close:
            self.close(stage)

    def _alive(self, c: int, stage: Stage) -> bool:
        return stage is Stage.ADVERTISE_KEYS or c in self.replies

    def message(self, c: int, stage: Stage) -> ClientMessage:
        m = self.machines[c]
        if stage is Stage.ADVERTISE_KEYS:
            return m.advertise_keys()
        if stage is Stage.SHARE_KEYS:
            return m.share_keys(self.replies[c])
        if stage is Stage.MASKED_INPUT:
            return m.masked_input(self.replies[c], self.encoded[c])
        return m.unmask(self.replies[c])

    def close(self, stage: Stage) -> None:
        if not self.rnd.closable(self.now):
            self.now = self.rnd.stage_deadline  # whoever is missing is a dropout
        assert self.rnd.closable(self.now)
        self.rnd.advance(self.now)
        self.replies = {}
        if self.rnd.phase in (Phase.FAILED, Phase.UNMASKED):
            return
        for c in list(self.machines):
            try:
                self.replies[c] = self.rnd.reply(c, stage)
            except ServiceError as err:
                assert err.reason == "late"
                self.machines.pop(c)

    def run(self, drops: dict[Stage, set[int]] | None = None) -> None:
        drops = drops or {}
        self.join_all(self.weights)
        for stage in Stage:
            if self.rnd.phase is Phase.FAILED:
                return
            self.stage(stage, drops.get(stage, ()))


def _reference(
    inputs: dict[int, FloatVector], weights: dict[int, int], clients: Iterable[int]
) -> Any:
    return sum(
        weights[c] * np.clip(inputs[c].astype(np.float64), -1.0, 1.0) for c in sorted(clients)
    )


def _round(params: SecAggParams, n: int, dim: int = 40, **kw: Any) -> SecAggRound:
    return SecAggRound(params, dim=dim, version=3, cohort_size=n, min_joined=1, **kw)


# -- the round driver as a state machine ----------------------------------------------------
@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
def test_round_sums_the_weighted_inputs(mode: str) -> None:
    n, dim = 5, 40
    inputs = _inputs(n, dim)
    weights = {c: 3 + 2 * i for i, c in enumerate(sorted(inputs))}
    rnd = _round(_params(mode), n, dim)
    d = _Driver(rnd, inputs, weights)
    d.run()
    assert rnd.phase is Phase.UNMASKED and rnd.survivors == frozenset(inputs)
    if mode == "secagg+":  # really sparse: every client has 2 of its 4 peers as neighbours
        assert rnd.config is not None and {len(v) for v in rnd.config.graph.values()} == {2}
    total = sum(weights.values())
    assert rnd.total_weight == total
    assert rnd.weighted_sum is not None
    # Decoded mean within the codec's bound of the reference mean, times the total weight.
    bound = rnd.params.codec.error_bound(total) * total
    err = np.abs(rnd.weighted_sum.astype(np.float64) - _reference(inputs, weights, inputs))
    assert err.max() <= bound, (err.max(), bound)
    rnd.applied(4)
    assert rnd.phase is Phase.APPLIED and rnd.weighted_sum is None
    assert rnd.reply(10, Stage.UNMASKING) == RoundDone(4, n)


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
@pytest.mark.parametrize(
    "stage", [Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASKING], ids=lambda s: s.name
)
def test_a_dropout_at_any_stage_leaves_the_survivors_sum(mode: str, stage: Stage) -> None:
    n, dim = 5, 30
    inputs = _inputs(n, dim)
    weights = {c: 1 + i for i, c in enumerate(sorted(inputs))}
    rnd = _round(_params(mode), n, dim)
    d = _Driver(rnd, inputs, weights)
    d.run({stage: {12}})
    assert rnd.phase is Phase.UNMASKED, rnd.failure
    # Dropped before its masked input: not in the sum. After it: its input is in the sum
    # (its masks are removed with the others' shares).
    in_sum = set(inputs) - ({12} if stage is not Stage.UNMASKING else set())
    assert rnd.survivors == frozenset(in_sum)
    assert rnd.dropouts[stage] == 1
    total = sum(weights[c] for c in in_sum)
    bound = rnd.params.codec.error_bound(total) * total
    assert rnd.weighted_sum is not None
    err = np.abs(rnd.weighted_sum.astype(np.float64) - _reference(inputs, weights, in_sum))
    assert err.max() <= bound


def test_collection_over_selection_deadline_and_too_few() -> None:
    rnd = _round(_params(), 3)
    for c in (1, 2, 3):
        rnd.join(c, 5, 5)
    with pytest.raises(ServiceError) as e:
        rnd.join(4, 5, 5)  # the cohort is full: the over-selected fourth is late
    assert e.value.reason == "late"
    rnd.join(2, 5, 5)  # a retried join is a no-op
    with pytest.raises(ServiceError) as e:
        rnd.join(2, 5, 6)
    assert e.value.reason == "duplicate"
    assert rnd.closable(0.0) and rnd.reply(1, None) is None
    rnd.advance(0.0)
    assert rnd.phase is Phase.ADVERTISE_KEYS and rnd.participants == (1, 2, 3)

    few = _round(_params(), 4)
    few.join(1, 5, 5)
    assert not few.closable(0.0)
    few.request_close()  # the round deadline: one input cannot be hidden in a sum
    few.advance(0.0)
    assert few.phase is Phase.FAILED
    with pytest.raises(ServiceError) as e:
        few.reply(1, None)
    assert e.value.reason == "round_failed"

    some = _round(_params(), 4)
    for c in (1, 2):
        some.join(c, 5, 5)
    some.request_close()
    some.advance(0.0)
    assert some.phase is Phase.ADVERTISE_KEYS and some.participants == (1, 2)

    with pytest.raises(ServiceError) as e:
        _round(_params(max_weight=10), 3).join(1, 11, 11)
    assert e.value.reason == "bad_weight"


def test_the_unmasking_floor_fails_the_round_before_any_unmask_request() -> None:
    n, dim = 4, 10
    inputs = _inputs(n, dim)
    weights = dict.fromkeys(inputs, 1)
    rnd = _round(_params(min_inputs=3), n, dim)
    d = _Driver(rnd, inputs, weights)
    d.join_all(weights)
    d.stage(Stage.ADVERTISE_KEYS)
    d.stage(Stage.SHARE_KEYS)
    d.stage(Stage.MASKED_INPUT, drop={10, 11})  # two masked inputs < min_inputs = 3
    assert rnd.phase is Phase.FAILED and "fewer than 3" in (rnd.failure or "")
    with pytest.raises(ServiceError) as e:
        rnd.reply(12, Stage.MASKED_INPUT)  # no unmask request is ever handed out
    assert e.value.reason == "round_failed"


def test_stage_closes_early_when_all_answered_else_at_its_deadline() -> None:
    inputs = _inputs(3, 8)
    weights = dict.fromkeys(inputs, 1)
    rnd = _round(_params(stage_timeout_s=5.0), 3, 8)
    d = _Driver(rnd, inputs, weights)
    d.now = 100.0
    d.join_all(weights)
    assert rnd.stage_deadline == 105.0
    d.stage(Stage.ADVERTISE_KEYS, close=False)
    assert rnd.closable(100.0)  # everyone answered: no need to wait
    d.close(Stage.ADVERTISE_KEYS)
    d.stage(Stage.SHARE_KEYS, drop={11}, close=False)
    assert not rnd.closable(104.9) and rnd.closable(105.0)


def test_bad_messages_are_refused_and_change_nothing() -> None:
    n, dim = 4, 12
    inputs = _inputs(n, dim)
    weights = {c: 2 + i for i, c in enumerate(sorted(inputs))}
    rnd = _round(_params(), n, dim)
    d = _Driver(rnd, inputs, weights)
    d.join_all(weights)
    assert rnd.config is not None
    a, b, late = 10, 11, 13
    keys_a = d.message(a, Stage.ADVERTISE_KEYS)
    rnd.receive(a, keys_a, _digest(keys_a))
    rnd.receive(a, keys_a, _digest(keys_a))  # an identical retry is a no-op

    def refused(reason: str, client: int, msg: ClientMessage) -> None:
        before = (rnd.phase, rnd.closable(0.0), rnd.reply(a, Stage.ADVERTISE_KEYS))
        with pytest.raises(ServiceError) as e:
            rnd.receive(client, msg, _digest(msg))
        assert e.value.reason == reason, (e.value.reason, e.value.detail)
        assert (rnd.phase, rnd.closable(0.0), rnd.reply(a, Stage.ADVERTISE_KEYS)) == before

    other = SecAggClient(a, rnd.config).advertise_keys()  # fresh keys: another message
    refused("duplicate", a, other)
    refused("protocol", b, other)  # b cannot send a's message (the sender is the token's id)
    keys_b = d.message(b, Stage.ADVERTISE_KEYS)
    refused("round_failed", b, AdvertiseKeys(bytes(16), b, keys_b.keys))  # another session
    refused("protocol", b, AdvertiseKeys(rnd.session_id, b, PublicKeys(b"x" * 5, b"y" * 32)))
    refused("late", 99, AdvertiseKeys(rnd.session_id, 99, keys_b.keys))  # not a participant
    refused("protocol", b, UnmaskResponse(rnd.session_id, b, (), ()))  # out of turn
    rnd.receive(b, keys_b, _digest(keys_b))
    m = d.message(12, Stage.ADVERTISE_KEYS)
    rnd.receive(12, m, _digest(m))
    keys_late = d.machines[late].advertise_keys()
    d.close(Stage.ADVERTISE_KEYS)  # client 13 stayed silent: a dropout
    refused("late", late, keys_late)
    assert late not in d.machines  # the round went on without it
    for stage in (Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASKING):
        d.stage(stage)
    # The round completes with the exact sum of the three: nothing refused left a trace.
    assert rnd.phase is Phase.UNMASKED and rnd.survivors == {a, b, 12}
    total = sum(weights[c] for c in (a, b, 12))
    assert rnd.weighted_sum is not None
    ref = _reference(inputs, weights, (a, b, 12))
    err = np.abs(rnd.weighted_sum.astype(np.float64) - ref)
    assert err.max() <= rnd.params.codec.error_bound(total) * total


def test_device_and_server_derive_the_same_config_and_refuse_bad_parameters() -> None:
    p = _params("secagg+")
    ids = (3, 5, 8, 13, 21)
    one = round_config(p, 10, ids, bytes(16), 42)
    assert one == round_config(p, 10, ids, bytes(16), 42)
    assert one.threshold == 2  # degree 2 graph, threshold 2 (choose_parameters)
    plain = round_config(_params("secagg", threshold_fraction=0.5), 10, ids, bytes(16), 0)
    assert plain.threshold == 3  # floor(5 * 0.5) + 1, as the simulator
    with pytest.raises(ConfigError):
        round_config(p, 10, ids, bytes(3), 0)  # a session id must be 16 bytes


def test_config_takes_secagg_fedavg_and_names_each_fix(tmp_path: Path) -> None:
    ok = _config(tmp_path, _task("secagg+", cohort=4, steps=2)).tasks[0]
    assert ok.secure_aggregation.mode == "secagg+" and ok.secagg_stage_timeout_s == 10.0
    bad = _task("secagg", cohort=4, steps=2, max_update_norm=1.0, secagg_stage_timeout_s=0)
    bad["algorithm"]["example_weighting"] = "sqrt"
    dp = _task("secagg", cohort=4, steps=2, population=100)
    dp["privacy"] = {"enabled": True, "noise_multiplier": 1.0, "clip_norm": 1.0}
    dp["algorithm"].update({"example_weighting": "equal", "min_updates": 2})
    async_task = _task("secagg", cohort=4, steps=2)
    async_task["algorithm"] = {"name": "fedbuff", "concurrency": 4, "buffer_size": 2}
    narrow = _task("secagg", cohort=200, steps=2)
    narrow["secure_aggregation"].update({"ring_bits": 32, "frac_bits": 24})
    for task, fields in [
        (bad, {"max_update_norm", "secagg_stage_timeout_s", "algorithm.example_weighting"}),
        # The noise share (std z C / sqrt(min_updates)) must fit the fixed-point range.
        (dp, {"secure_aggregation.clip"}),
        (async_task, {"algorithm.name"}),
        # 200 inputs of up to 2^24 each would wrap a 32-bit ring.
        (narrow, {"secure_aggregation.ring_bits"}),
    ]:
        with pytest.raises(ConfigError) as e:
            _config(tmp_path, task)
        paths = [p.path for p in e.value.problems]
        assert all(any(path.endswith(f) for path in paths) for f in fields), paths


# -- over gRPC on 127.0.0.1 ------------------------------------------------------------------
INPUT, CLASSES = 8, 3
DIM = INPUT * CLASSES + CLASSES


def _task(mode: str, cohort: int, steps: int, **kw: Any) -> dict[str, Any]:
    task: dict[str, Any] = {
        "id": "sa",
        "input_shape": [INPUT],
        "num_classes": CLASSES,
        "model": {"name": "logistic"},
        "algorithm": {"name": "fedavg", "cohort_size": cohort},
        "server_optimizer": {"name": "sgd", "lr": 1.0},
        "max_server_steps": steps,
        "secure_aggregation": {"mode": mode, "corrupt_fraction": 0.0, "dropout_fraction": 0.0},
        # Long enough that no honest in-process client misses a stage on a loaded machine.
        "secagg_stage_timeout_s": 10.0,
    }
    task.update(kw)
    return task


def _config(tmp: Path, *tasks: dict[str, Any]) -> ServiceConfig:
    if not (tmp / "secret").exists():
        (tmp / "secret").write_text(secrets.token_hex(32))
    return build_config(
        ServiceConfig,
        {
            "server": {"host": "127.0.0.1", "port": 0, "insecure": True},
            "auth": {"secret_file": str(tmp / "secret")},
            "storage": {"dir": str(tmp / "state"), "keep_applied_deltas": True},
            "selector": {"retry_after_s": 0.02},
            "tasks": list(tasks),
        },
    )


def _delta(params: FloatVector, client: int) -> FloatVector:
    """Deterministic 'training' that depends on the model (errors propagate to the next
    round) with a per-client scale and offset (broken weighting would show)."""
    scale = 0.03 + 0.02 * (client % 4)
    return (scale * np.sin(params.astype(np.float64) + 0.7 * client) + 0.01 * client).astype(
        np.float32
    )


def _examples(client: int) -> int:
    return 3 + 2 * client


class _Trainer:
    def __init__(self, client: int, zero: bool = False) -> None:
        self.client = client
        self.zero = zero

    def __call__(self, params: FloatVector, version: int, assignment: pb.Assignment) -> TrainResult:
        d = np.zeros_like(params) if self.zero else _delta(params, self.client)
        return TrainResult(d, _examples(self.client))


def _options(h: ServiceHandle, secret: Secret, client: int, **kw: Any) -> ClientOptions:
    return ClientOptions(
        address=f"127.0.0.1:{h.port}",
        token=secret.token(str(client)),
        client_id=client,
        num_examples=10,
        task_id="sa",
        backoff_base_s=0.01,
        **kw,
    )


async def _honest(h: ServiceHandle, secret: Secret, clients: Iterable[int], **kw: Any) -> list[Any]:
    return list(
        await asyncio.gather(
            *(
                asyncio.wait_for(run_client_async(_options(h, secret, c, **kw), _Trainer(c)), 60)
                for c in clients
            )
        )
    )


def _fedavg_reference(init: FloatVector, rounds: list[list[int]]) -> np.ndarray:
    """Example-weighted FedAvg with SGD(lr=1), in float64, from the clients' deltas."""
    p = init.astype(np.float64)
    for clients in rounds:
        total = sum(_examples(c) for c in clients)
        mean = sum(
            _examples(c) * _delta(p.astype(np.float32), c).astype(np.float64) for c in clients
        )
        p = p - mean / total
    return p


def _ledger(tmp: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    with sqlite3.connect(tmp / "state" / "ledger.sqlite") as db:
        rows = db.execute(
            "SELECT client_id, applied_version, status, delta FROM updates ORDER BY seq"
        ).fetchall()
        rounds = db.execute(
            "SELECT version, participants, survivors, total_weight FROM secure_rounds "
            "ORDER BY version"
        ).fetchall()
    return rows, rounds


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
def test_task_steps_with_the_exact_weighted_mean(tmp_path: Path, mode: str) -> None:
    steps, clients = 2, [1, 2, 3, 4]
    cfg = _config(tmp_path, _task(mode, cohort=4, steps=steps))
    secret = Secret.from_file(tmp_path / "secret")

    async def run() -> tuple[FloatVector, list[Any]]:
        h = await start_server(cfg)
        try:
            reports = await _honest(h, secret, clients)
            return h.coordinator.tasks["sa"].runtime.params().copy(), reports
        finally:
            await h.stop()

    final, reports = asyncio.run(run())
    assert all(r.done and r.accepted == steps for r in reports)
    ref = _fedavg_reference(initial_params(cfg.tasks[0]), [clients] * steps)
    # Per round the decoded mean is within 2^-frac_bits of the exact one (frac_bits 24); the
    # next round's deltas are 0.09-Lipschitz in the model: bound (1 + 1.09) 2^-24, plus
    # float32 rounding of the model (one ulp per step).
    ulp = float(np.spacing(np.float32(np.abs(ref).max())))
    err = float(np.max(np.abs(final.astype(np.float64) - ref)))
    assert err <= 2.1 * 2.0**-24 + 2 * steps * ulp, err
    rows, rounds = _ledger(tmp_path)
    assert [(v, p, s) for v, p, s, _ in rounds] == [(1, 4, 4), (2, 4, 4)]
    assert rounds[0][3] == sum(_examples(c) for c in clients)
    # The survivors are in the ledger, applied once, and no row holds an update.
    assert sorted((c, v) for c, v, _, _ in rows) == sorted((c, v) for c in clients for v in (1, 2))
    assert all(status == "applied" and delta is None for _, _, status, delta in rows)


async def _stub(h: ServiceHandle) -> tuple[grpc.aio.Channel, Any]:
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{h.port}")
    return ch, pb_grpc.FederatedLearningStub(ch)  # type: ignore[no-untyped-call]


class _Scripted:
    """A client driven step by step over the wire (to vanish, or to misbehave, on cue)."""

    def __init__(self, stub: Any, secret: Secret, client: int, task: str = "sa") -> None:
        self.stub = stub
        self.md = bearer_metadata(secret.token(str(client)))
        self.client = client
        self.task = task
        self.a = pb.Assignment()
        self.session = b""
        self.machine: SecAggClient | None = None
        self.weight = 0

    async def check_in(self) -> pb.Assignment:
        while True:
            resp = await self.stub.CheckIn(
                pb.CheckInRequest(num_examples=10, task_id=self.task), metadata=self.md
            )
            if resp.WhichOneof("outcome") == "assignment":
                self.a = resp.assignment
                return self.a
            await asyncio.sleep(0.02)

    def request(self, **body: Any) -> pb.SecAggRequest:
        return pb.SecAggRequest(
            task_id=self.task, lease_id=self.a.lease_id, session_id=self.session, **body
        )

    async def call(self, **body: Any) -> pb.SecAggResponse:
        resp: pb.SecAggResponse = await self.stub.SecAgg(self.request(**body), metadata=self.md)
        return resp

    async def until(self, want: str, sent: int, first: pb.SecAggResponse) -> pb.SecAggResponse:
        resp = first
        while resp.WhichOneof("outcome") != want:
            assert resp.WhichOneof("outcome") == "retry_after_s", resp
            resp = await self.call(poll=sent)
        return resp

    async def join(self, num_examples: int = 5) -> None:
        first = await self.call(join=pb.SecAggJoin(num_examples=num_examples))
        r = (await self.until("round", pb.SECAGG_STAGE_JOIN, first)).round
        self.session, self.weight = r.session_id, r.weight
        params = params_from_pb(self.a.secagg)
        cfg = round_config(params, DIM, tuple(r.participants), r.session_id, r.graph_seed)
        self.machine = SecAggClient(self.client, cfg)

    async def advertise(self) -> pb.SecAggResponse:
        assert self.machine is not None
        k = self.machine.advertise_keys().keys
        first = await self.call(advertise_keys=pb.SecAggKeys(c_pk=k.c_pk, s_pk=k.s_pk))
        return await self.until("key_broadcast", pb.SECAGG_STAGE_ADVERTISE_KEYS, first)

    def shares(self, kb: pb.SecAggResponse) -> pb.SecAggShares:
        assert self.machine is not None
        keys = tuple((int(k.client_id), PublicKeys(k.c_pk, k.s_pk)) for k in kb.key_broadcast.keys)
        sk = self.machine.share_keys(KeyBroadcast(self.session, self.client, keys))
        return pb.SecAggShares(
            shares=[
                pb.SecAggCiphertext(peer=e.receiver, ciphertext=e.ciphertext) for e in sk.shares
            ]
        )

    async def share(self, kb: pb.SecAggResponse) -> pb.SecAggResponse:
        first = await self.call(share_keys=self.shares(kb))
        return await self.until("share_broadcast", pb.SECAGG_STAGE_SHARE_KEYS, first)

    def masked_chunks(self, sb: pb.SecAggResponse, x: FloatVector) -> list[pb.SecAggInputChunk]:
        assert self.machine is not None
        enc = params_from_pb(self.a.secagg).codec.encode(x, self.weight, np.random.default_rng(0))
        cts = tuple(
            EncryptedShare(int(c.peer), self.client, c.ciphertext)
            for c in sb.share_broadcast.shares
        )
        y = self.machine.masked_input(ShareBroadcast(self.session, self.client, cts), enc).masked
        return self.input_chunks(y.astype("<u8").tobytes(), DIM, pb.DTYPE_RING_U64)

    def input_chunks(self, raw: bytes, dim: int, dtype: int) -> list[pb.SecAggInputChunk]:
        header = pb.SecAggInputHeader(
            task_id=self.task,
            lease_id=self.a.lease_id,
            session_id=self.session,
            dim=dim,
            dtype=dtype,  # type: ignore[arg-type]
        )
        return [pb.SecAggInputChunk(header=header), pb.SecAggInputChunk(data=raw)]

    async def send_input(self, chunks: list[pb.SecAggInputChunk]) -> pb.SecAggResponse:
        resp: pb.SecAggResponse = await self.stub.SecAggMaskedInput(
            _aiter(chunks), metadata=self.md
        )
        return resp

    async def masked(self, sb: pb.SecAggResponse, x: FloatVector) -> pb.SecAggResponse:
        first = await self.send_input(self.masked_chunks(sb, x))
        return await self.until("unmask_request", pb.SECAGG_STAGE_MASKED_INPUT, first)

    async def unmask(self, ur: pb.SecAggResponse) -> pb.SecAggResponse:
        assert self.machine is not None
        u = ur.unmask_request
        req = UnmaskRequest(self.session, self.client, frozenset(u.survivors), frozenset(u.dropped))
        ans = self.machine.unmask(req)
        first = await self.call(
            unmask=pb.SecAggUnmaskShares(
                b_shares=[pb.SecAggShare(owner=v, share=s) for v, s in ans.b_shares],
                s_shares=[pb.SecAggShare(owner=v, share=s) for v, s in ans.s_shares],
            )
        )
        return await self.until("done", pb.SECAGG_STAGE_UNMASKING, first)


async def _aiter(items: Iterable[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
def test_a_client_vanishing_after_sharing_keys_does_not_stop_the_round(
    tmp_path: Path, mode: str
) -> None:
    honest = [1, 2, 3]
    # The masked-input stage waits this long for the vanished client, then goes on.
    cfg = _config(tmp_path, _task(mode, cohort=4, steps=1, secagg_stage_timeout_s=2.5))
    secret = Secret.from_file(tmp_path / "secret")

    async def vanish(h: ServiceHandle) -> None:
        ch, stub = await _stub(h)
        async with ch:
            c = _Scripted(stub, secret, 9)
            await c.check_in()
            await c.join()
            kb = await c.advertise()
            # Its encrypted shares reach the server; then it is gone for good.
            resp = await c.call(share_keys=c.shares(kb))
            assert resp.WhichOneof("outcome") in ("retry_after_s", "share_broadcast")

    async def run() -> tuple[FloatVector, list[Any]]:
        h = await start_server(cfg)
        try:
            reports, _ = await asyncio.gather(_honest(h, secret, honest, max_updates=1), vanish(h))
            # The operator sees the round and the dropout it survived in Status.
            ch, stub = await _stub(h)
            async with ch:
                md = bearer_metadata(secret.token("operator"))
                (st,) = (await stub.Status(pb.StatusRequest(), metadata=md)).tasks
            assert (st.secagg_rounds_applied, st.secagg_rounds_failed) == (1, 0)
            assert dict(st.secagg_dropouts) == {"MASKED_INPUT": 1}
            return h.coordinator.tasks["sa"].runtime.params().copy(), reports
        finally:
            await h.stop()

    final, reports = asyncio.run(run())
    assert [r.accepted for r in reports] == [1, 1, 1]
    ref = _fedavg_reference(initial_params(cfg.tasks[0]), [honest])
    ulp = float(np.spacing(np.float32(np.abs(ref).max())))
    assert float(np.max(np.abs(final.astype(np.float64) - ref))) <= 2.0**-24 + ulp
    rows, rounds = _ledger(tmp_path)
    assert rounds == [(1, 4, 3, float(sum(_examples(c) for c in honest)))]
    assert sorted(c for c, _, _, _ in rows) == honest


def test_a_restart_abandons_the_round_in_flight(tmp_path: Path) -> None:
    steps = 2
    cfg = _config(tmp_path, _task("secagg", cohort=3, steps=steps))
    secret = Secret.from_file(tmp_path / "secret")

    async def run() -> None:
        h = await start_server(cfg)
        ch, stub = await _stub(h)
        scripted = [_Scripted(stub, secret, c) for c in (5, 6, 7)]
        try:
            for c in scripted:
                await c.check_in()
            await asyncio.gather(*(c.join() for c in scripted))
            await asyncio.gather(*(c.advertise() for c in scripted))
        finally:
            await ch.close()
            await h.stop()  # mid-round: keys exchanged, no masked input yet
        h = await start_server(cfg)
        try:
            ch, stub = await _stub(h)
            async with ch:
                c = _Scripted(stub, secret, 5)
                c.a, c.session = scripted[0].a, scripted[0].session
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.call(poll=pb.SECAGG_STAGE_ADVERTISE_KEYS)
                assert e.value.code() == SC.FAILED_PRECONDITION
                assert dict(e.value.trailing_metadata() or ())[REASON_KEY] == "round_failed"
            assert h.coordinator.tasks["sa"].runtime.version == 0
            reports = await _honest(h, secret, [1, 2, 3])
            assert all(r.done and r.accepted == steps for r in reports)
        finally:
            await h.stop()

    asyncio.run(run())
    rows, rounds = _ledger(tmp_path)
    # Each round is applied exactly once; the abandoned one left nothing behind.
    assert [v for v, _, _, _ in rounds] == [1, 2]
    assert sorted(c for c, _, _, _ in rows) == [1, 1, 2, 2, 3, 3]


def test_a_joiner_of_a_round_that_can_never_start_hears_so_at_once(tmp_path: Path) -> None:
    """A client waits in a collecting round; the task then finishes (here: marked so, as when
    its privacy budget is spent). Its next poll is refused with task_finished, not answered
    "retry" until its lease times out (a stall seen at the end of the end-to-end test)."""
    cfg = _config(tmp_path, _task("secagg", cohort=3, steps=2))
    secret = Secret.from_file(tmp_path / "secret")

    async def run() -> None:
        h = await start_server(cfg)
        ch, stub = await _stub(h)
        try:
            c = _Scripted(stub, secret, 5)
            await c.check_in()
            first = await c.call(join=pb.SecAggJoin(num_examples=5))
            assert first.WhichOneof("outcome") == "retry_after_s"  # 1 of 3 joined
            h.coordinator.tasks["sa"].runtime.finished = True
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.call(poll=pb.SECAGG_STAGE_JOIN)
            assert dict(e.value.trailing_metadata() or ())[REASON_KEY] == "task_finished"
            assert loop.time() - start < 3.0  # no long poll: the round can never start
        finally:
            await ch.close()
            await h.stop()

    asyncio.run(run())


def test_distributed_dp_noise_has_the_calibrated_level(tmp_path: Path) -> None:
    """Every device adds N(0, (z C)^2 / m) to its (here: zero) update before masking; the
    released sum of n inputs then has per-coordinate std sqrt(n / m) z C, the aggregator
    divides it by the fixed denominator (the cohort size) and accounts the release."""
    z, clip, m, n = 1.5, 0.5, 3, 4
    task = _task(
        "secagg",
        cohort=n,
        steps=1,
        input_shape=[60],
        num_classes=10,
        population=1000,
        privacy={"enabled": True, "noise_multiplier": z, "clip_norm": clip},
    )
    task["algorithm"].update({"min_updates": m, "example_weighting": "equal"})
    task["secure_aggregation"]["clip"] = 4.0  # >= C + 6 x share std = 3.1
    cfg = _config(tmp_path, task)
    secret = Secret.from_file(tmp_path / "secret")
    dim = 60 * 10 + 10

    async def run() -> tuple[Any, float]:
        h = await start_server(cfg)
        try:
            opts = [_options(h, secret, c, max_updates=1) for c in range(n)]
            await asyncio.gather(
                *(run_client_async(o, _Trainer(o.client_id, zero=True)) for o in opts)
            )
            rt = h.coordinator.tasks["sa"].runtime
            assert rt.dp is not None and rt.dp.accountant.steps == 1
            eps = rt.dp.accountant.epsilon()
            return h.coordinator.store.secure_rounds("sa"), eps
        finally:
            await h.stop()

    (record,), eps = asyncio.run(run())
    assert eps > 0 and record.survivors == n and record.aggregate is not None
    noise = record.aggregate.astype(np.float64)
    want = math.sqrt(n / m) * z * clip
    # 610 coordinates: the sample std is within 4% (1 sigma) of the truth; 20% is > 5 sigma.
    assert abs(noise.std() / want - 1) < 0.2, (noise.std(), want)
    assert abs(noise.mean()) < 5 * want / math.sqrt(dim)
    stepped = read_checkpoint(tmp_path / "state" / "checkpoints" / checkpoint_name("sa", 1)).params
    init = initial_params(cfg.tasks[0])
    np.testing.assert_allclose(init - stepped, record.aggregate / n, atol=1e-5)


async def _status(call: Any) -> tuple[SC, str]:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code(), str(dict(err.trailing_metadata() or ()).get(REASON_KEY, ""))
    return SC.OK, ""


def test_hostile_secagg_messages_change_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Malformed, forged, replayed and out-of-turn messages to SecAgg / SecAggMaskedInput:
    each gets its catalog status, the round and the task are exactly as before, and the round
    then completes with the exact sum of the two honest inputs."""
    import asyncfl.service.secagg_task as secagg_task

    monkeypatch.setattr(secagg_task, "_LONG_POLL_S", 0.2)  # accepted calls return quickly
    plain = {
        "id": "fb",
        "input_shape": [INPUT],
        "num_classes": CLASSES,
        "model": {"name": "logistic"},
        "algorithm": {"name": "fedbuff", "concurrency": 4, "buffer_size": 2},
    }
    cfg = _config(tmp_path, _task("secagg", cohort=2, steps=1, secagg_stage_timeout_s=60.0), plain)
    secret = Secret.from_file(tmp_path / "secret")
    rng = np.random.default_rng(3)
    xs = {7: rng.normal(0, 0.3, DIM).astype(np.float32), 8: rng.normal(0.2, 0.1, DIM)}
    xs[8] = xs[8].astype(np.float32)

    async def scenario() -> None:
        h = await start_server(cfg)
        ch, stub = await _stub(h)
        try:
            a, b = _Scripted(stub, secret, 7), _Scripted(stub, secret, 8)
            await a.check_in()
            await b.check_in()
            await asyncio.gather(a.join(3), b.join(9))
            assert a.machine is not None and b.machine is not None
            ka = a.machine.advertise_keys().keys
            resp = await a.call(advertise_keys=pb.SecAggKeys(c_pk=ka.c_pk, s_pk=ka.s_pk))
            assert resp.WhichOneof("outcome") == "retry_after_s"
            sa = h.coordinator.tasks["sa"].secagg
            assert sa is not None and sa.current is not None
            rnd = sa.current

            def snapshot() -> tuple[Any, ...]:
                rt = h.coordinator.tasks["sa"].runtime
                return (
                    rt.version,
                    rt.params().tobytes(),
                    h.coordinator.store.counts("sa"),
                    len(h.coordinator.store.secure_rounds("sa")),
                    sa.current is rnd,
                    rnd.phase,
                    rnd.participants,
                    tuple(rnd.received(s) for s in Stage),
                )

            before = snapshot()
            md_a = a.md
            forged = a.a.lease_id[:-1] + ("1" if a.a.lease_id.endswith("0") else "0")
            keys = pb.SecAggKeys(c_pk=ka.c_pk, s_pk=ka.s_pk)
            other_keys = pb.SecAggKeys(c_pk=bytes(32), s_pk=bytes(range(32)))
            share = pb.SecAggShare(owner=7, share=bytes(SHARE_BYTES))
            ct = pb.SecAggCiphertext(peer=8, ciphertext=bytes(140))

            def step(meta: Any = md_a, **fields: Any) -> Any:
                req = a.request()
                for k, v in fields.items():
                    if k in ("task_id", "lease_id", "session_id", "poll"):
                        setattr(req, k, v)
                    else:
                        getattr(req, k).CopyFrom(v)
                return stub.SecAgg(req, metadata=meta)

            def masked(*chunks: pb.SecAggInputChunk, meta: Any = md_a) -> Any:
                return stub.SecAggMaskedInput(_aiter(chunks), metadata=meta)

            good_raw = bytes(8 * DIM)

            def hdr(**kw: Any) -> pb.SecAggInputChunk:
                fields: dict[str, Any] = {
                    "task_id": "sa",
                    "lease_id": a.a.lease_id,
                    "session_id": a.session,
                    "dim": DIM,
                    "dtype": pb.DTYPE_RING_U64,
                }
                fields.update(kw)
                return pb.SecAggInputChunk(header=pb.SecAggInputHeader(**fields))

            def data(raw: bytes) -> pb.SecAggInputChunk:
                return pb.SecAggInputChunk(data=raw)

            inv, pre, dup = SC.INVALID_ARGUMENT, SC.FAILED_PRECONDITION, SC.ALREADY_EXISTS
            cases: list[tuple[Any, SC, str]] = [
                (step(task_id="nope", advertise_keys=keys), SC.NOT_FOUND, "unknown_task"),
                (step(task_id="fb", advertise_keys=keys), inv, "bad_encoding"),
                (step(lease_id=forged, advertise_keys=other_keys), pre, "bad_lease"),
                (step(lease_id=b.a.lease_id, advertise_keys=other_keys), pre, "bad_lease"),
                (step(), inv, "malformed_message"),
                (step(poll=99), inv, "malformed_message"),
                (step(session_id=bytes(16), advertise_keys=keys), pre, "round_failed"),
                (step(session_id=b"", poll=pb.SECAGG_STAGE_SHARE_KEYS), pre, "round_failed"),
                (
                    step(advertise_keys=pb.SecAggKeys(c_pk=b"x", s_pk=ka.s_pk)),
                    inv,
                    "malformed_message",
                ),
                (step(advertise_keys=other_keys), dup, "duplicate"),
                (step(share_keys=pb.SecAggShares(shares=[ct])), inv, "protocol"),
                (step(share_keys=pb.SecAggShares(shares=[ct] * 3)), inv, "malformed_message"),
                (
                    step(
                        share_keys=pb.SecAggShares(
                            shares=[pb.SecAggCiphertext(peer=8, ciphertext=bytes(4000))]
                        )
                    ),
                    inv,
                    "malformed_message",
                ),
                (step(unmask=pb.SecAggUnmaskShares(b_shares=[share])), inv, "protocol"),
                (
                    step(
                        unmask=pb.SecAggUnmaskShares(
                            b_shares=[pb.SecAggShare(owner=7, share=b"\x01" * 16)]
                        )
                    ),
                    inv,
                    "malformed_message",
                ),
                (step(poll=pb.SECAGG_STAGE_MASKED_INPUT), inv, "protocol"),
                (step(join=pb.SecAggJoin(num_examples=4)), dup, "duplicate"),
                (step(meta=(), advertise_keys=keys), SC.UNAUTHENTICATED, "unauthenticated"),
                (
                    step(meta=bearer_metadata(secret.token("operator")), advertise_keys=keys),
                    SC.PERMISSION_DENIED,
                    "permission_denied",
                ),
                (masked(data(good_raw)), inv, "malformed_message"),
                (masked(), inv, "malformed_message"),
                (masked(hdr(session_id=bytes(16)), data(good_raw)), pre, "round_failed"),
                (masked(hdr(dim=DIM + 1), data(good_raw)), inv, "bad_shape"),
                (masked(hdr(dtype=pb.DTYPE_RING_U32), data(good_raw)), inv, "bad_dtype"),
                (masked(hdr(dtype=pb.DTYPE_FLOAT32), data(good_raw)), inv, "bad_dtype"),
                (
                    masked(hdr(), data(good_raw), data(b"\0" * 8)),
                    SC.RESOURCE_EXHAUSTED,
                    "message_too_large",
                ),
                (masked(hdr(), data(good_raw[:-8])), inv, "malformed_message"),
                (masked(hdr(), hdr(), data(good_raw)), inv, "malformed_message"),
                (masked(hdr(), data(good_raw)), inv, "protocol"),  # out of turn
                (masked(hdr(task_id="fb"), data(good_raw)), inv, "bad_encoding"),
                (masked(hdr(lease_id=forged), data(good_raw)), pre, "bad_lease"),
                (
                    stub.UploadUpdate(
                        _aiter(
                            [
                                pb.UploadChunk(
                                    header=pb.UploadHeader(
                                        task_id="sa",
                                        lease_id=a.a.lease_id,
                                        upload_id="u1",
                                        dim=DIM,
                                        dtype=pb.DTYPE_FLOAT32,
                                    )
                                ),
                                pb.UploadChunk(data=bytes(4 * DIM)),
                            ]
                        ),
                        metadata=md_a,
                    ),
                    inv,
                    "bad_encoding",
                ),
            ]
            for call, want_code, want_reason in cases:
                assert await _status(call) == (want_code, want_reason), want_reason
            raw_unary = ch.unary_unary("/asyncfl.v1.FederatedLearning/SecAgg")
            raw_stream = ch.stream_unary("/asyncfl.v1.FederatedLearning/SecAggMaskedInput")
            for i in range(20):
                blob = rng.bytes(int(rng.integers(1, 600)))
                call = (
                    raw_unary(blob, metadata=md_a)
                    if i % 2
                    else raw_stream(_aiter([blob[:7], blob[7:]]), metadata=md_a)
                )
                code, _ = await _status(call)
                # Random bytes may parse as a (meaningless) message: refused either way.
                assert code in (SC.INVALID_ARGUMENT, SC.FAILED_PRECONDITION, SC.NOT_FOUND), code
            # A's identical retry is a poll, not a second message.
            assert (await a.call(advertise_keys=keys)).WhichOneof("outcome") == "retry_after_s"
            assert snapshot() == before
            assert rnd.received(Stage.ADVERTISE_KEYS) == {7}

            # The round goes on and its sum is exactly the honest inputs' (within 2^-20).
            kb_b = await b.advertise()
            kb_a = await a.until(
                "key_broadcast", pb.SECAGG_STAGE_ADVERTISE_KEYS, await a.call(advertise_keys=keys)
            )
            sb_a, sb_b = await asyncio.gather(a.share(kb_a), b.share(kb_b))
            ur_a, ur_b = await asyncio.gather(a.masked(sb_a, xs[7]), b.masked(sb_b, xs[8]))
            done = await asyncio.gather(a.unmask(ur_a), b.unmask(ur_b))
            assert {d.done.model_version for d in done} == {1}
            (record,) = h.coordinator.store.secure_rounds("sa")
            assert record.aggregate is not None
            ref = 3 * xs[7].astype(np.float64) + 9 * xs[8].astype(np.float64)
            codec = params_from_pb(a.a.secagg).codec
            bound = 12 * codec.error_bound(12) + float(np.spacing(np.float32(np.abs(ref).max())))
            assert np.abs(record.aggregate - ref).max() <= bound
        finally:
            await ch.close()
            await h.stop(0)

    asyncio.run(scenario())


@pytest.mark.slow
def test_kill_9_mid_task_abandons_the_round_and_applies_each_round_once(tmp_path: Path) -> None:
    """A server process is killed with SIGKILL while clients (one `asyncfl client` process)
    run SecAgg rounds (the kill lands in whatever phase the next round is in); after a
    restart the clients find their rounds gone, check in again, and the task completes: one
    applied round per version, each replaying bit for bit, and every update a client saw
    applied is in the ledger."""
    import json
    import signal
    import time

    from _service_util import (
        INPUT_SHAPE,
        check_secure_ledger_exactly_once,
        finish_clients,
        free_port,
        start_clients,
        task_version,
        write_setup,
    )
    from _service_util import start_server as start_server_process

    steps = 10
    task = {
        "id": "crash",
        "model": {"name": "logistic"},
        "input_shape": INPUT_SHAPE,
        "num_classes": 10,
        "algorithm": {"name": "fedavg", "cohort_size": 4},
        "max_server_steps": steps,
        "secure_aggregation": {"mode": "secagg"},
        "secagg_stage_timeout_s": 5.0,
    }
    port = free_port()
    config = write_setup(tmp_path, task, port, keep_applied_deltas=True)
    report = tmp_path / "uploads.jsonl"
    clients = start_clients(tmp_path, port, "0-7", report)
    server = start_server_process(config, port, tmp_path / "server.log")
    try:
        deadline = time.monotonic() + 40
        while task_version(tmp_path, "crash") < 3:
            assert time.monotonic() < deadline, "no progress before the crash"
            time.sleep(0.02)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        assert task_version(tmp_path, "crash") < steps, "the task finished before the kill"
        server = start_server_process(config, port, tmp_path / "server.log")
        _, err = finish_clients(clients, 90, [server], [tmp_path / "server.log"])
        assert clients.returncode == 0, err.decode()[-3000:]
    finally:
        server.kill()
        server.wait(timeout=10)
        if clients.poll() is None:
            clients.kill()
    assert check_secure_ledger_exactly_once(tmp_path, task, participants=4) == steps
    uploads = [json.loads(line) for line in report.read_text().splitlines()]
    applied = {(u["client_id"], u["upload_id"]) for u in uploads if u["outcome"] == "accepted"}
    with sqlite3.connect(tmp_path / "state" / "ledger.sqlite") as db:
        rows = set(db.execute("SELECT client_id, upload_id FROM updates").fetchall())
    # (A client whose round was applied just before the kill never hears "done": it reports
    # round_failed, and its update is in the ledger once all the same.)
    assert applied <= rows and len(rows) == 4 * steps
