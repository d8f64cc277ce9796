"""Model checkpoints in safetensors, written atomically.

A checkpoint holds the flat model, the server optimizer's state (``m``/``v``/``steps``) and the
version. It is written to a temporary file in the same folder, fsync'ed, renamed over the final
name with ``os.replace`` (atomic on POSIX) and the folder is fsync'ed so the rename itself is
durable: after a crash a checkpoint file is either complete or absent, never torn. Which
checkpoint is *current* is decided by the ledger (``store.py``), not by the files present.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from asyncfl.core.update import FloatVector

__all__ = ["Checkpoint", "checkpoint_name", "read_checkpoint", "write_checkpoint"]


@dataclass(frozen=True, eq=False)
class Checkpoint:
    version: int
    params: FloatVector
    optimizer: dict[str, np.ndarray | int]
    """``ServerOptimizer.state_dict()``."""
    privacy: str | None = None
    """The DP accountant's ``state_dict()`` as JSON (tasks with ``privacy.enabled``)."""


def checkpoint_name(task_id: str, version: int) -> str:
    return f"{task_id}-v{version:08d}.safetensors"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    tensors: dict[str, np.ndarray] = {"params": np.ascontiguousarray(ckpt.params)}
    meta = {"version": str(ckpt.version), "format": "asyncfl-checkpoint-1"}
    for key, value in ckpt.optimizer.items():
        if isinstance(value, np.ndarray):
            tensors[f"optimizer.{key}"] = np.ascontiguousarray(value)
        else:
            meta[f"optimizer.{key}"] = str(int(value))
    if ckpt.privacy is not None:
        meta["privacy.accountant"] = ckpt.privacy
    blob = st_save(tensors, metadata=meta)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_checkpoint(path: Path) -> Checkpoint:
    blob = path.read_bytes()
    tensors = st_load(blob)
    # safetensors keeps the metadata in a JSON header: 8-byte little-endian length, then JSON.
    import json

    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
    meta: dict[str, str] = header.get("__metadata__", {})
    optimizer: dict[str, np.ndarray | int] = {
        k.removeprefix("optimizer."): v for k, v in tensors.items() if k.startswith("optimizer.")
    }
    for k, v in meta.items():
        if k.startswith("optimizer."):
            optimizer[k.removeprefix("optimizer.")] = int(v)
    params = tensors["params"].astype(np.float32, copy=False)
    return Checkpoint(
        int(meta["version"]), params, optimizer, privacy=meta.get("privacy.accountant")
    )
