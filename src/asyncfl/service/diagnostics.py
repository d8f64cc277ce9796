"""Operator diagnostics: ``kill -USR1 <pid>`` prints every asyncio task's stack to stderr.

A stalled server or client process is usually idle in its event loop, where a thread dump
(py-spy, faulthandler) shows only the selector; what it waits on is in its tasks' coroutine
chains. ``Task.print_stack`` shows one frame of a suspended coroutine, so this walks the
``cr_await`` chain itself, down to the awaited future. The handler runs on the event loop, so
it sees a consistent set of tasks.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any, TextIO

__all__ = ["coroutine_frames", "dump_tasks", "install_task_dump"]


def coroutine_frames(coro: Any) -> Iterator[FrameType]:
    """The frames of ``coro`` and of everything it awaits, outermost first."""
    while coro is not None:
        frame = next(
            (f for a in ("cr_frame", "gi_frame", "ag_frame") if (f := getattr(coro, a, None))),
            None,
        )
        if frame is None:
            return
        yield frame
        coro = next(
            (c for a in ("cr_await", "gi_yieldfrom", "ag_await") if (c := getattr(coro, a, None))),
            None,
        )


def dump_tasks(out: TextIO | None = None) -> int:
    """Write every task of the running loop, with its await chain, to ``out`` (stderr).
    Returns how many tasks there were."""
    stream = out if out is not None else sys.stderr
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    lines = [f"--- {len(tasks)} asyncio tasks ---"]
    for task in tasks:
        lines.append(f"task {task.get_name()}: {task!r:.300}")
        for frame in coroutine_frames(task.get_coro()):
            code = frame.f_code
            lines.append(f"    {code.co_filename}:{frame.f_lineno or '?'} in {code.co_name}")
    loop = asyncio.get_running_loop()
    timers = sorted(getattr(loop, "_scheduled", ()), key=lambda h: h.when())
    lines.append(f"--- {len(timers)} timers (loop time {loop.time():.3f}) ---")
    lines.extend(f"    at {h.when():.3f}: {h!r:.200}" for h in timers[:20])
    lines.append("--- end of tasks ---")
    stream.write("\n".join(lines) + "\n")
    stream.flush()
    return len(tasks)


def install_task_dump() -> None:
    """Dump task stacks on SIGUSR1 (call from inside the running loop; no-op off POSIX)."""
    if not hasattr(signal, "SIGUSR1"):
        return
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump_tasks)
