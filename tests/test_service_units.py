"""Service parts without a network: error catalog, generated stubs, tokens and leases, slots,
the durable task runtime (exactly-once on recovery), checkpoints."""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest

from asyncfl.core.configload import build_config
from asyncfl.service.auth import Secret
from asyncfl.service.checkpoint import (
    Checkpoint,
    checkpoint_name,
    read_checkpoint,
    write_checkpoint,
)
from asyncfl.service.config import ServiceConfig, TaskConfig
from asyncfl.service.errors import CATALOG, ServiceError, entry_for
from asyncfl.service.selector import Slots
from asyncfl.service.store import Store
from asyncfl.service.task import TaskRuntime

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "asyncfl"


def test_catalog_covers_every_algorithm_reason() -> None:
    pattern = re.compile(
        r'(?:_reject\(|UpdateRejected\(|reason=|RefusalCode\.[A-Z_]+:)\s*"([a-z_]+)"'
    )
    found: set[str] = set()
    for path in [*(SRC / "algorithms").glob("*.py"), SRC / "core" / "update.py"]:
        found |= set(pattern.findall(path.read_text()))
    assert {"bad_shape", "not_finite", "too_stale", "late"} <= found  # the scan works
    assert found - set(CATALOG) == set()
    assert entry_for("no_such_reason") == CATALOG["internal"]
    with pytest.raises(KeyError):
        ServiceError("no_such_reason")
    # Only OK-like codes would be a bug: every entry refuses.
    assert all(e.code != grpc.StatusCode.OK for e in CATALOG.values())


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    (out / "asyncfl" / "v1").mkdir(parents=True)
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(out)], check=True, capture_output=True
    )
    committed = SRC / "service" / "proto" / "asyncfl" / "v1"
    for name in sorted(p.name for p in (out / "asyncfl" / "v1").glob("*_pb2*.py*")):
        assert (out / "asyncfl" / "v1" / name).read_text() == (committed / name).read_text(), (
            f"{name} is stale: run scripts/gen_proto.sh"
        )


def test_tokens_and_leases() -> None:
    s, other = Secret(b"k" * 32), Secret(b"j" * 32)
    tok = s.token("12")
    assert s.verify_token(tok) == "12"
    assert other.verify_token(tok) is None
    assert s.verify_token("13" + tok[2:]) is None  # a token speaks for its principal only
    assert s.verify_token("garbage") is None
    lease = s.sign_lease("t", 12, 3, 1000.5)
    got = s.verify_lease(lease)
    assert got is not None and (got.task_id, got.client_id, got.version) == ("t", 12, 3)
    assert s.verify_lease(lease.replace(":12:", ":13:")) is None
    assert other.verify_lease(lease) is None
    with pytest.raises(ValueError, match="bytes"):
        Secret(b"short")


def test_slots_fast_replacement_and_rounds() -> None:
    fb = Slots(capacity=2, sync=False)
    assert fb.try_take("a", 0, 0.0, 10.0) and fb.try_take("b", 0, 0.0, 10.0)
    assert not fb.try_take("c", 0, 0.0, 10.0)  # Mc reached: retry later
    fb.release("a")  # a finished client frees its slot at once
    assert fb.try_take("c", 0, 1.0, 10.0)
    assert fb.try_take("d", 0, 10.5, 10.0)  # "b" expired at 10.0
    avg = Slots(capacity=2, sync=True)
    assert avg.try_take("a", 0, 0.0, 10.0) and avg.try_take("b", 0, 0.0, 10.0)
    avg.release("a")
    assert not avg.try_take("c", 0, 0.0, 10.0)  # a round selects at most its cohort
    avg.release("b")
    assert avg.round_exhausted(0)
    assert avg.try_take("c", 1, 0.0, 10.0)  # the next version opens a new round


def test_a_client_checking_in_again_ends_its_previous_lease() -> None:
    """A device checks in only after its previous assignment is over (uploaded, or given up
    after a failed download): that lease must not hold a slot until it expires."""
    fb = Slots(capacity=2, sync=False)
    assert fb.try_take("a1", 0, 0.0, 100.0, client_id=7)
    assert fb.try_take("b1", 0, 0.0, 100.0, client_id=8)
    assert not fb.try_take("c1", 0, 1.0, 100.0, client_id=9)  # full
    assert fb.try_take("a2", 0, 2.0, 100.0, client_id=7)  # 7's download failed: it is back
    assert set(fb.active) == {"b1", "a2"}
    fb.release("a1")  # a late release of the replaced lease changes nothing
    assert set(fb.active) == {"b1", "a2"}
    assert not fb.try_take("c2", 0, 3.0, 100.0, client_id=9)  # still full: no slot was lost
    fb.release("a2")
    assert fb.try_take("c3", 0, 4.0, 100.0, client_id=9)


def _task(tmp: Path, **alg: object) -> TaskConfig:
    raw = {
        "auth": {"secret_file": "x"},
        "tasks": [
            {
                "id": "t",
                "model": {"name": "logistic"},
                "input_shape": [4],
                "num_classes": 3,
                "algorithm": {"name": "fedbuff", "buffer_size": 3, **alg},
                "server_optimizer": {"name": "adam", "lr": 0.1},
                "max_server_steps": 5,
            }
        ],
    }
    return build_config(ServiceConfig, raw).tasks[0]


def test_runtime_recovers_buffer_and_refuses_duplicates(tmp_path: Path) -> None:
    cfg = _task(tmp_path, staleness={"kind": "polynomial", "a": 0.5})
    store = Store(tmp_path / "l.sqlite")
    rt = TaskRuntime(cfg, store, tmp_path / "ck")
    rng = np.random.default_rng(1)
    deltas = [rng.normal(0, 0.1, rt.dim).astype(np.float32) for _ in range(5)]
    rt.submit(1, "a", 0, 10, deltas[0])
    rt.submit(2, "b", 0, 20, deltas[1])
    res = rt.submit(3, "c", 0, 30, deltas[2])
    assert res.stepped and res.version == 1
    rt.submit(4, "d", 0, 40, deltas[3])  # buffered, staleness 1
    with pytest.raises(ServiceError) as dup:
        rt.submit(4, "d", 0, 40, deltas[3])
    assert dup.value.reason == "duplicate_upload"
    with pytest.raises(ServiceError) as bad:
        rt.submit(5, "e", 0, 1, deltas[4][:-1])
    assert bad.value.reason == "bad_shape"
    # A step whose commit never happened leaves an orphan checkpoint; recovery deletes it.
    # "Restart" on a copy of the files (the original keeps running as the reference): the
    # fresh runtime sees the same model, optimizer and buffer.
    shutil.copytree(tmp_path / "ck", tmp_path / "ck2")
    with (
        sqlite3.connect(tmp_path / "l.sqlite") as src,
        sqlite3.connect(tmp_path / "l2.sqlite") as dst,
    ):
        src.backup(dst)
    orphan = tmp_path / "ck2" / checkpoint_name("t", 2)
    orphan.write_bytes(b"torn")
    again = TaskRuntime(cfg, Store(tmp_path / "l2.sqlite"), tmp_path / "ck2")
    assert not orphan.exists()
    assert again.version == 1 and again.agg.buffered == 1
    np.testing.assert_array_equal(again.params(), rt.params())
    for key, value in rt.optimizer.state_dict().items():
        np.testing.assert_array_equal(again.optimizer.state_dict()[key], value)
    # Finishing the step in both gives bit-identical models (same buffer, same optimizer).
    for r in (rt, again):
        r.submit(6, "f", 1, 5, deltas[4])
        r.submit(7, "g", 0, 5, deltas[0])
    np.testing.assert_array_equal(again.params(), rt.params())
    assert again.version == 2


def test_checkpoint_roundtrip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    p = rng.normal(size=1001).astype(np.float32)
    opt: dict[str, np.ndarray | int] = {"steps": 7, "m": rng.normal(size=1001).astype(np.float32)}
    path = tmp_path / "c.safetensors"
    write_checkpoint(path, Checkpoint(7, p, opt))
    back = read_checkpoint(path)
    assert back.version == 7 and back.optimizer["steps"] == 7
    np.testing.assert_array_equal(back.params, p)
    np.testing.assert_array_equal(back.optimizer["m"], opt["m"])
    assert [f.name for f in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left


def test_config_reports_every_problem() -> None:
    with pytest.raises(Exception) as exc:
        build_config(
            ServiceConfig,
            {
                "auth": {},
                "server": {"host": "0.0.0.0", "insecure": True},
                "tasks": [{"id": "a b", "max_server_steps": 0}],
            },
        )
    text = str(exc.value)
    for field in ("insecure", "secret_file", "id", "max_server_steps"):
        assert field in text


def test_group_commit_equals_one_by_one(tmp_path: Path) -> None:
    """A batch (with a step inside, an in-batch duplicate and a refusal) gives the same
    answers, model and ledger as submitting one at a time, in fewer transactions."""
    from asyncfl.service.task import Accepted, Submission

    cfg = _task(tmp_path, staleness={"kind": "polynomial", "a": 0.5})
    rng = np.random.default_rng(7)
    deltas = [rng.normal(0, 0.1, 15).astype(np.float32) * (i + 1) for i in range(6)]
    items = [
        Submission(1, "a", 0, 10, deltas[0]),
        Submission(2, "b", 0, 20, deltas[1]),
        Submission(2, "b", 0, 20, deltas[1]),  # the same upload twice in one batch
        Submission(3, "c", 0, 30, deltas[2][:-1]),  # bad shape
        Submission(4, "d", 0, 40, deltas[3]),  # third accepted: step to version 1
        Submission(5, "e", 0, 50, deltas[4]),  # buffered at staleness 1
        Submission(6, "f", 1, 60, deltas[5]),
    ]
    commits: dict[str, int] = {"batch": 0, "single": 0}

    def runtime(name: str) -> TaskRuntime:
        store = Store(tmp_path / f"{name}.sqlite")
        inner = store.commit

        def counting(*args: object, **kw: object) -> int:
            commits[name] += 1
            return inner(*args, **kw)  # type: ignore[arg-type]

        store.commit = counting  # type: ignore[method-assign]
        return TaskRuntime(cfg, store, tmp_path / name)

    batch, single = runtime("batch"), runtime("single")
    got = batch.submit_many(items)
    want: list[object] = []
    for it in items:
        try:
            want.append(
                single.submit(
                    it.client_id, it.upload_id, it.base_version, it.num_examples, it.delta
                )
            )
        except ServiceError as err:
            want.append(err.reason)
    assert [r if isinstance(r, Accepted) else r.reason for r in got] == want
    assert want[2] == "duplicate_upload" and want[3] == "bad_shape"
    np.testing.assert_array_equal(batch.params(), single.params())
    assert (batch.version, batch.agg.buffered, batch.accepted_total) == (1, 2, 5)
    key = [
        (r.client_id, r.upload_id, r.status, r.applied_version, r.weight)
        for r in batch.store.rows("t")
    ]
    assert key == [
        (r.client_id, r.upload_id, r.status, r.applied_version, r.weight)
        for r in single.store.rows("t")
    ]
    assert commits == {"batch": 2, "single": 5}  # one for the step segment, one for the tail


def test_the_task_reads_finished_while_its_last_step_is_persisted(tmp_path: Path) -> None:
    """The aggregator's version moves before the checkpoint and the ledger commit are written;
    in that window a check-in must already see the task finished (a lease for the step after
    the last one led a SecAgg client into a round that could never start)."""
    cfg = _task(tmp_path)  # buffer 3, 5 steps
    rt = TaskRuntime(cfg, Store(tmp_path / "l.sqlite"), tmp_path / "ck")
    seen: list[tuple[int, bool]] = []
    inner = rt.store.commit

    def watching(*args: object, **kw: object) -> int:
        if kw.get("step") is not None:
            seen.append((rt.version, rt.finished))
        return inner(*args, **kw)  # type: ignore[arg-type]

    rt.store.commit = watching  # type: ignore[method-assign]
    delta = np.linspace(-0.1, 0.2, rt.dim, dtype=np.float32)
    for i in range(15):
        rt.submit(i, f"u{i}", rt.version, 10 + i, delta)
    assert seen == [(1, False), (2, False), (3, False), (4, False), (5, True)]
    assert rt.finished
    with pytest.raises(ServiceError) as done:
        rt.submit(99, "late", 5, 10, delta)
    assert done.value.reason == "task_finished"


def test_task_dump_shows_the_whole_await_chain() -> None:
    """``kill -USR1`` diagnostics: the awaited coroutine deep inside a task is named, and the
    loop's pending timers are listed."""
    import asyncio
    import io

    from asyncfl.service.diagnostics import dump_tasks

    async def innermost_wait(ev: asyncio.Event) -> None:
        await asyncio.wait_for(ev.wait(), 30)

    async def middle(ev: asyncio.Event) -> None:
        await innermost_wait(ev)

    async def main() -> str:
        ev = asyncio.Event()
        task = asyncio.create_task(middle(ev), name="waiter")
        await asyncio.sleep(0.01)
        out = io.StringIO()
        assert dump_tasks(out) >= 2  # main, the waiter (and wait_for's inner task)
        ev.set()
        await task
        return out.getvalue()

    text = asyncio.run(main())
    waiter = text[text.index("task waiter") : text.index("timers")]
    assert "in middle" in waiter and "in innermost_wait" in waiter
    assert "_release_waiter" in text  # wait_for's timeout, 30 s ahead
