"""How many threads torch runs on in one task, when several tasks share the machine's cores."""

from __future__ import annotations

import contextlib
import os


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_task(setting: str | int | None, concurrent_tasks: int) -> int:
    """``auto`` (or empty): the cores divided among the tasks that may run at once, at least 1 (tasks
    then do not oversubscribe the CPU: on 2 cores with two tasks at once, a rapid trial's torch stages ran
    2-10x slower with torch's default); a number: that many; ``0``: torch's default (one a core)."""
    raw = str(setting if setting is not None else "auto").strip().lower()
    if raw in ("", "auto"):
        return max(1, available_cores() // max(1, concurrent_tasks))
    try:
        return max(0, int(raw))
    except ValueError:
        raise ValueError(f"task_threads: {setting!r} is not 'auto' or a whole number") from None


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch threads (0: leave torch's setting); the previous count is restored
    after it, so an in-process run (``dag.test()``, a sweep) leaves the process as it found it."""
    if n <= 0:
        yield
        return
    import torch

    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
