"""The aggregator role: one task's model, version, buffer and server optimizer, made durable.

The aggregation itself is the simulator's: ``make_aggregator`` + ``make_server_optimizer`` from
the same config sections, fed one :class:`~asyncfl.core.update.Update` at a time. This class adds
what a real server needs around it: the ledger commit of every accepted update and the
checkpoint of every step (exactly-once rules in ``store.py``), recovery after a crash, duplicate
uploads recognised by their upload id, and the service-level checks (norm bound, finished
task) made *before* the algorithm sees the update so a refusal leaves every state unchanged.

Not thread-safe: the server calls it under one lock per task.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asyncfl.algorithms.base import Aggregator, Outcome
from asyncfl.algorithms.factory import make_aggregator
from asyncfl.algorithms.fedavg import FedAvg
from asyncfl.core.configload import to_plain
from asyncfl.core.params import ParamSpec
from asyncfl.core.server_opt import ServerOptimizer, make_server_optimizer
from asyncfl.core.update import FloatVector, Update
from asyncfl.errors import PrivacyBudgetExceeded
from asyncfl.privacy import clip_update
from asyncfl.secure.tee import SimulatedVendor
from asyncfl.secure.tee.client import MaskedUpdate
from asyncfl.service.checkpoint import (
    Checkpoint,
    checkpoint_name,
    read_checkpoint,
    write_checkpoint,
)
from asyncfl.service.config import TaskConfig
from asyncfl.service.errors import ServiceError
from asyncfl.service.lightsecagg_task import KeyStore, LightSecAggTask, LightSecAggUpload
from asyncfl.service.privacy import (
    accountant_json,
    dp_noise_seed,
    load_accountant,
    make_task_dp,
    replay_release_notes,
)
from asyncfl.service.store import LedgerRow, SecureRoundRow, Store, TaskRecord
from asyncfl.service.tee import TeeAggregator, build_tee
from asyncfl.sim.dp import DPMechanism
from asyncfl.sim.seeding import derive_seed

__all__ = ["Accepted", "Submission", "TaskRuntime", "initial_params"]

log = logging.getLogger("asyncfl.service.task")


@dataclass(frozen=True, eq=False)
class Submission:
    """One received upload, as the aggregator role gets it."""

    client_id: int
    upload_id: str
    base_version: int
    num_examples: int
    delta: FloatVector
    tee: MaskedUpdate | None = None
    """``secure_aggregation: tee``: the masked ring vector + sealed seed (``delta`` is then
    empty and unused)."""
    lightsecagg: LightSecAggUpload | None = None
    """``secure_aggregation: lightsecagg``: the encrypted mask shares + masked field vector
    (``delta`` is then empty and unused)."""


@dataclass(frozen=True)
class Accepted:
    version: int
    """Model version after the update."""
    staleness: int
    weight: float
    stepped: bool
    lightsecagg_buffer_id: int = 0
    """lightsecagg: the buffer the contribution went into (the device drops its own mask share
    once that buffer settles)."""


def initial_params(cfg: TaskConfig) -> FloatVector:
    """The task's initial model, seeded exactly as the simulator seeds its model."""
    model = cfg.model.build(cfg.input_shape, cfg.num_classes, derive_seed(cfg.seed, "model_init"))
    return ParamSpec.from_module(model).flatten(model.state_dict())


class TaskRuntime:
    def __init__(
        self,
        cfg: TaskConfig,
        store: Store,
        ckpt_dir: Path,
        keep_checkpoints: int = 2,
        *,
        vendor: SimulatedVendor | None = None,
    ):
        if cfg.secure_aggregation.mode == "tee" and vendor is None:
            raise ValueError(f"task {cfg.id!r} has secure_aggregation tee: pass its vendor key")
        self.cfg = cfg
        self.vendor = vendor
        self.tee: TeeAggregator | None = None
        """The enclave and the secure aggregator (``secure_aggregation: tee`` tasks)."""
        self.lsa: LightSecAggTask | None = None
        """The group, mailboxes and masked buffers (``secure_aggregation: lightsecagg``)."""
        self._lost_buffer = 0
        self.store = store
        self.ckpt_dir = ckpt_dir
        self.keep_checkpoints = keep_checkpoints
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.agg: Aggregator
        self.optimizer: ServerOptimizer
        self._finished = False
        self.budget_spent = False
        """Finished because one more step would exceed the privacy budget."""
        self.dp: DPMechanism | None = None
        self.accepted_total = 0
        self.discarded_total = 0
        """Accepted updates that will never be applied: discarded buffers (a failed FedAvg
        round, a zero-weight buffer, a TEE buffer lost with its enclave boot)."""
        self.recover()

    # -- state ------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.agg.version

    @property
    def finished(self) -> bool:
        """No more steps: the last one is taken (even while it is still being persisted: the
        aggregator's version moves first, and a check-in in that window must not be handed
        a lease for a step that will never come), or the task was recorded as finished."""
        return self._finished or self.agg.version >= self.cfg.max_server_steps

    @finished.setter
    def finished(self, value: bool) -> None:
        self._finished = value

    @property
    def dim(self) -> int:
        return self.agg.dim

    @property
    def sync(self) -> bool:
        return isinstance(self.agg, FedAvg)

    def buffer_holds(self, client_id: int) -> bool:
        """Whether ``client_id``'s update waits in the buffer that is filling now, where a
        second one from it would be refused ``duplicate_client`` (the TEE and LightSecAgg
        buffers take K distinct clients). Always False for the other modes."""
        # Called on the event loop while a worker thread may rebuild the task (recover()):
        # read each reference once.
        tee, lsa = self.tee, self.lsa
        if tee is not None:
            return tee.agg.has_buffered(client_id)
        if lsa is not None:
            return lsa.agg.has_buffered(client_id)
        return False

    def params(self) -> FloatVector:
        """The current model. The aggregator replaces (never mutates) its vector on a step, so
        this reference stays a consistent snapshot of its version while it streams."""
        return self.agg.params

    def _config_json(self) -> str:
        return json.dumps(to_plain(self.cfg), sort_keys=True)

    def recover(self) -> None:
        """(Re)build the in-memory state from the durable state: checkpoint + buffered rows."""
        rec = self.store.task(self.cfg.id)
        if rec is None:
            init = initial_params(self.cfg)
            path = self.ckpt_dir / checkpoint_name(self.cfg.id, 0)
            opt = make_server_optimizer(self.cfg.server_optimizer, init.shape[0])
            dp0 = make_task_dp(self.cfg)
            privacy = None if dp0 is None else accountant_json(dp0)
            write_checkpoint(path, Checkpoint(0, init, opt.state_dict(), privacy))
            rec = TaskRecord(self.cfg.id, 0, path.name, init.shape[0], self._config_json(), False)
            self.store.create_task(rec)
        ckpt = read_checkpoint(self.ckpt_dir / rec.checkpoint)
        if ckpt.version != rec.version or ckpt.params.shape != (rec.dim,):
            raise RuntimeError(
                f"checkpoint {rec.checkpoint} holds version {ckpt.version} dim "
                f"{ckpt.params.shape}; the ledger expects version {rec.version} dim {rec.dim}"
            )
        self.optimizer = make_server_optimizer(self.cfg.server_optimizer, rec.dim)
        self.optimizer.load_state_dict(ckpt.optimizer)
        # tee + DP: releases requested at this version whose step never committed (noted
        # write-ahead; the server may have seen them): accounted below, and the noise stream
        # of the seeded (research) mode moves on so it never repeats.
        notes = 0
        if self.vendor is not None and self.cfg.privacy.enabled:
            notes = self.store.release_notes(self.cfg.id).get(rec.version, 0)
        self.dp = make_task_dp(self.cfg, rec.version, stream=notes)
        if self.dp is not None:
            if ckpt.privacy is None:
                raise RuntimeError(
                    f"checkpoint {rec.checkpoint} has no privacy accountant but task "
                    f"{self.cfg.id!r} has privacy.enabled; use a new task id to turn DP on"
                )
            load_accountant(self.dp, ckpt.privacy)
            if notes:
                replay_release_notes(self.dp, notes)
                log.info(
                    "uncommitted enclave releases accounted",
                    extra={"task": self.cfg.id, "version": rec.version, "releases": notes},
                )
        if self.vendor is not None:
            self._boot_tee(ckpt.params, dp_noise_seed(self.cfg, rec.version, notes))
        elif self.cfg.secure_aggregation.mode == "lightsecagg":
            if self.lsa is not None:
                self.lsa.close()
            keys = KeyStore(self.store.path.parent / "lightsecagg.sqlite")
            self.lsa = LightSecAggTask(
                self.cfg, ckpt.params, self.optimizer, keys, new_session=lambda: os.urandom(16)
            )
            self.agg = self.lsa.agg
        else:
            self.agg = make_aggregator(self.cfg.algorithm, ckpt.params, self.optimizer, self.dp)
        self.agg.resume_at(rec.version)
        self.budget_spent = self.dp is not None and self.dp.accountant.would_exceed()
        self.finished = (
            rec.finished or rec.version >= self.cfg.max_server_steps or self.budget_spent
        )
        self._remove_orphans(rec.version)
        counts = self.store.counts(self.cfg.id)
        self.accepted_total = sum(counts.values())
        self.discarded_total = counts.get("discarded", 0)
        if (self.tee is not None or self.lsa is not None) and counts.get("buffered", 0):
            # The masks of these rows died with the enclave that held their seeds (a new boot
            # has a new key and epoch): they can never be unmasked, so they are marked
            # discarded, never replayed. Released steps are in the checkpoint: exactly once.
            # (lightsecagg: the devices' share state does not follow a restart; same rule.)
            self.discarded_total += self.store.commit(self.cfg.id, [], discard=True)
            log.info(
                "enclave restarted: masked buffer discarded",
                extra={"task": self.cfg.id, "discarded": counts["buffered"]},
            )
        for row in self.store.rows(self.cfg.id, "buffered"):
            assert row.delta is not None and row.delta.dtype == np.float32
            out = self.agg.on_update(
                Update(row.client_id, row.base_version, row.num_examples, row.delta)  # type: ignore[arg-type]
            )
            if not out.accepted or out.step is not None or out.discarded:
                # Only possible if the task's config changed between runs (e.g. a smaller K).
                raise RuntimeError(
                    f"replaying ledger row {row.seq} of task {self.cfg.id!r} gave {out}; "
                    "was the task's algorithm config changed? Use a new task id instead."
                )
        log.info(
            "task recovered",
            extra={"task": self.cfg.id, "version": rec.version, "buffered": self.agg.buffered},
        )

    def _boot_tee(self, params: FloatVector, noise_seed: int) -> None:
        """A fresh enclave (new key and epoch, empty buffer) and the secure aggregator."""
        assert self.vendor is not None
        if self.tee is not None:
            self.tee.close()
            self.tee = None
        self.tee = build_tee(
            self.cfg,
            params,
            self.optimizer,
            self.vendor,
            dp=self.dp,
            noise_seed=noise_seed,
            before_release=None if self.dp is None else self._note_release,
        )
        self.agg = self.tee.agg

    def _note_release(self) -> None:
        # Write-ahead (tee + DP): the release about to be requested is spent once the server
        # sees it, even if this process dies before the step commits (see recover()).
        self.store.note_release(self.cfg.id, self.agg.version)

    def close(self) -> None:
        """Stop the enclave (tee tasks); the durable state stays as it is."""
        if self.tee is not None:
            self.tee.close()
            self.tee = None
        if self.lsa is not None:
            self.lsa.close()
            self.lsa = None

    def _remove_orphans(self, current: int) -> None:
        prefix = f"{self.cfg.id}-v"
        for p in self.ckpt_dir.glob(f"{prefix}*.safetensors"):
            v = int(p.name[len(prefix) : -len(".safetensors")])
            # Newer than the ledger: written by a step whose commit never happened.
            if v > current or v <= current - self.keep_checkpoints:
                p.unlink(missing_ok=True)
        for p in self.ckpt_dir.glob(f".{prefix}*.tmp-*"):
            p.unlink(missing_ok=True)

    # -- events -----------------------------------------------------------------------------
    def submit(
        self,
        client_id: int,
        upload_id: str,
        base_version: int,
        num_examples: int,
        delta: FloatVector,
    ) -> Accepted:
        """Accept one update durably or raise :class:`ServiceError` with state unchanged."""
        res = self.submit_many(
            [Submission(client_id, upload_id, base_version, num_examples, delta)]
        )[0]
        if isinstance(res, ServiceError):
            raise res
        return res

    def submit_many(self, items: Sequence[Submission]) -> list[Accepted | ServiceError]:
        """Accept a batch of concurrent uploads with one ledger commit per segment (group commit).

        Items go through the algorithm in order, exactly as one :meth:`submit` each; the rows
        accepted in memory are committed together in ONE transaction when a step (or a
        discard) happens and at the end of the batch, so the fsync is shared. An item's result
        is an :class:`Accepted` only once its row has committed; a refusal leaves every state
        unchanged; if a commit fails, memory is rebuilt from disk and every item not yet
        committed gets ``internal`` (retryable: its retry with the same upload id is new).
        """
        results: list[Accepted | ServiceError | None] = [None] * len(items)
        first_of: dict[tuple[int, str], int] = {}
        pending: list[tuple[int, LedgerRow, Accepted]] = []
        try:
            for i, it in enumerate(items):
                key = (it.client_id, it.upload_id)
                if key in first_of:  # the same upload twice in one batch: it shares the fate
                    continue
                first_of[key] = i
                try:
                    row, out = self._admit(it)
                except ServiceError as err:
                    results[i] = err
                    if self._lost_buffer:
                        # The enclave restarted: the masked buffer, including this batch's
                        # rows accepted so far, is gone. Commit them as discarded.
                        lost = Outcome(accepted=True, discarded=self._lost_buffer)
                        self._lost_buffer = 0
                        self._persist([r for _, r, _ in pending], lost)
                        for j, _, a in pending:
                            results[j] = a
                        self.accepted_total += len(pending)
                        pending = []
                    continue
                acc = Accepted(
                    self.agg.version,
                    out.staleness,
                    out.weight,
                    out.step is not None,
                    0 if self.lsa is None else self.lsa.last_buffer_id,
                )
                pending.append((i, row, acc))
                if out.step is not None or out.discarded:
                    self._persist([r for _, r, _ in pending], out)
                    for j, _, a in pending:
                        results[j] = a
                    self.accepted_total += len(pending)
                    pending = []
            if pending:
                self._persist([r for _, r, _ in pending], Outcome(accepted=True))
                for j, _, a in pending:
                    results[j] = a
                self.accepted_total += len(pending)
                pending = []
        except Exception:
            if pending:  # not committed: drop them from memory too (no-op if _persist did)
                self.recover()
            log.exception("batch of %d uploads failed", len(items))
        out_list: list[Accepted | ServiceError] = []
        for i, it in enumerate(items):
            first = first_of.get((it.client_id, it.upload_id), i)
            res = results[first]
            if first != i and isinstance(res, Accepted):
                res = ServiceError("duplicate_upload", f"client {it.client_id} in one batch")
            out_list.append(res if res is not None else ServiceError("internal", "not committed"))
        return out_list

    def _admit(self, it: Submission) -> tuple[LedgerRow, Outcome]:
        """Checks, then the algorithm; raises :class:`ServiceError` with state unchanged."""
        if self.store.find_upload(self.cfg.id, it.client_id, it.upload_id) is not None:
            raise ServiceError("duplicate_upload", f"client {it.client_id} upload {it.upload_id}")
        if self.finished:
            if self.budget_spent:
                raise ServiceError("privacy_budget_spent", f"task {self.cfg.id}")
            raise ServiceError("task_finished", f"task {self.cfg.id} at {self.version}")
        if self.tee is not None:
            return self._admit_masked(it)
        if self.lsa is not None:
            if it.lightsecagg is None:
                raise ServiceError("bad_encoding", f"task {self.cfg.id} takes LightSecAgg uploads")
            up = it.lightsecagg
            return self.lsa.admit(it.client_id, it.upload_id, it.base_version, it.num_examples, up)
        if it.tee is not None or it.lightsecagg is not None:
            raise ServiceError("bad_encoding", f"task {self.cfg.id} takes float32 updates")
        delta = it.delta
        if self.dp is not None:
            # Clipped on the device already; clipping again makes the sensitivity bound the
            # server's own guarantee. The ledger keeps what the algorithm added. ValueError:
            # not a finite 1-D float32 vector, which the algorithm refuses below.
            with contextlib.suppress(ValueError):
                delta = clip_update(delta, self.dp.clip_norm)[0]
        bound = self.cfg.max_update_norm
        if bound is not None and delta.dtype == np.float32 and delta.ndim == 1:
            norm = float(np.linalg.norm(delta.astype(np.float64)))
            if math.isfinite(norm) and norm > bound:
                raise ServiceError("norm_too_large", f"norm {norm:.4g} > {bound}")
        version_before = self.agg.version
        out = self.agg.on_update(Update(it.client_id, it.base_version, it.num_examples, delta))
        if not out.accepted:
            assert out.reason is not None
            raise ServiceError(out.reason, out.detail or "")
        row = LedgerRow(
            self.cfg.id,
            it.client_id,
            it.upload_id,
            it.base_version,
            it.num_examples,
            version_before,
            out.staleness,
            out.weight,
            delta,
        )
        return row, out

    def _admit_masked(self, it: Submission) -> tuple[LedgerRow, Outcome]:
        """The tee path: the secure aggregator and its enclave; the ledger keeps the MASKED
        vector (the server never holds an individual unmasked update)."""
        assert self.tee is not None
        if it.tee is None:
            raise ServiceError("bad_encoding", f"task {self.cfg.id} takes masked ring vectors")
        up = it.tee
        if up.client_id != it.client_id or up.base_version != it.base_version:
            raise ServiceError("malformed_message", "masked update names another client/version")
        version_before = self.agg.version
        try:
            out = self.tee.agg.on_masked_update(up)
        except PrivacyBudgetExceeded as exc:  # raised before anything is registered
            raise ServiceError("privacy_budget_spent", str(exc)) from None
        if not out.accepted:
            assert out.reason is not None
            # A refusal from a new enclave boot cleared the masked buffer (out.discarded):
            # submit_many commits its rows as discarded before answering.
            self._lost_buffer = out.discarded
            raise ServiceError(out.reason, out.detail or "")
        row = LedgerRow(
            self.cfg.id,
            it.client_id,
            it.upload_id,
            it.base_version,
            it.num_examples,
            version_before,
            out.staleness,
            out.weight,
            up.masked,
        )
        return row, out

    def deadline(self, version: int) -> Outcome:
        """Close FedAvg round ``version`` (its deadline passed or all its clients are gone)."""
        if not isinstance(self.agg, FedAvg) or self.finished:
            return Outcome(accepted=True)
        out = self.agg.on_deadline(version)
        if out.step is not None or out.discarded:
            self._persist([], out)
        return out

    def apply_aggregate(
        self,
        base_version: int,
        weighted_sum: FloatVector,
        example_total: float,
        rows: Sequence[LedgerRow],
        secure_round: SecureRoundRow,
    ) -> Outcome:
        """Step with a SecAgg round's decoded sum (``secure_aggregation`` secagg/secagg+).

        ``rows`` name the round's survivors (no deltas: the server never holds one); they
        commit as applied in the step's transaction with ``secure_round``, so the round is
        applied exactly once. Nothing is written unless the aggregator steps.
        """
        if self.finished:
            return Outcome(accepted=False, reason="task_finished")
        out = self.agg.on_aggregate(base_version, weighted_sum, example_total, len(rows))
        if out.step is not None:
            self._persist(rows, out, secure_round=secure_round)
            self.accepted_total += len(rows)
        return out

    def settle_lightsecagg(self, now: float) -> list[Outcome]:
        """lightsecagg: step or discard, oldest first, the closed buffers that are settled (U
        answers in, or past their deadline); each commits exactly its own (oldest) rows."""
        outs: list[Outcome] = []
        while self.lsa is not None and not self.finished:
            done = self.lsa.settle_one(now)
            if done is None:
                break
            out, rows = done
            self._persist([], out, limit=rows)
            outs.append(out)
            if out.discarded:
                log.info(
                    "lightsecagg buffer discarded: too few answers by its deadline",
                    extra={"task": self.cfg.id, "discarded": out.discarded},
                )
        if self.lsa is not None and self.finished and self.lsa.drop_all():
            self.discarded_total += self.store.commit(self.cfg.id, [], discard=True)
        return outs

    def _persist(
        self,
        rows: Sequence[LedgerRow],
        out: Outcome,
        *,
        secure_round: SecureRoundRow | None = None,
        limit: int | None = None,
    ) -> None:
        """Make ``out`` durable; on failure rebuild memory from disk so the two never diverge.
        ``limit``: the step or discard covers only the oldest ``limit`` buffered rows (a
        lightsecagg buffer settles while the next one fills)."""
        try:
            if out.step is not None:
                v = out.step.version
                path = self.ckpt_dir / checkpoint_name(self.cfg.id, v)
                privacy = None if self.dp is None else accountant_json(self.dp)
                write_checkpoint(
                    path, Checkpoint(v, self.agg.params, self.optimizer.state_dict(), privacy)
                )
                spent = self.dp is not None and self.dp.accountant.would_exceed()
                finished = v >= self.cfg.max_server_steps or spent
                self.store.commit(
                    self.cfg.id,
                    rows,
                    step=(v, path.name),
                    finished=finished,
                    secure_round=secure_round,
                    limit=limit,
                )
                self.finished = finished
                self.budget_spent = spent
                old = self.ckpt_dir / checkpoint_name(self.cfg.id, v - self.keep_checkpoints)
                old.unlink(missing_ok=True)
                log.info(
                    "server step",
                    extra={
                        "task": self.cfg.id,
                        "version": v,
                        "updates": out.step.num_updates,
                        "norm": out.step.pseudo_grad_norm,
                    },
                )
            else:
                self.discarded_total += self.store.commit(
                    self.cfg.id, rows, discard=out.discarded > 0, limit=limit
                )
            if self.lsa is not None:
                self.lsa.published()
        except Exception:
            log.exception("persisting failed; rebuilding task state from disk")
            self.recover()
            raise
