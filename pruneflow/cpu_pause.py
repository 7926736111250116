"""A benchmark measures alone on its host: it stops the host's registered torch tasks while it measures.

A torch task registers its process in the host's folder of CPU tasks (:func:`registered`, one small JSON
file per process, :func:`pruneflow.settings.cpu_tasks_dir`). A benchmark, around its warm-up and timed
rounds only, stops every registered process with SIGSTOP and resumes it with SIGCONT (:func:`paused`).
Both hold the folder's lock file meanwhile, so a task that starts while a benchmark measures waits to
register (and to run) until the benchmark is done, and two benchmarks of one host never measure at once.
So a benchmark waits for nothing and nothing runs beside it, instead of waiting for every CPU-pool slot
to drain while a core idles (``benchmarks/sweep_timeline.py``).

A stopped task keeps its memory and its Airflow heartbeat (the task supervisor, a separate process,
sends it); its stages see only a pause of about the benchmark's length. Nothing that could wait on a
stopped task runs while they are stopped: the model is compiled and parity-checked before, and the
results are written after.

If the benchmark process dies while tasks are stopped (even by SIGKILL), a watchdog resumes them: a
small process in its own session, started before anything is stopped, that sends SIGCONT when its pipe
from the benchmark closes. Only processes of the same user in the same PID namespace can be stopped; a
file whose process is gone (or whose pid now names another process) is removed and skipped.

Pure Python and torch-free: the benchmark worker imports it. POSIX only; elsewhere nothing is stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
from filelock import FileLock

from pruneflow.settings import cpu_tasks_dir

__all__ = ["paused", "registered", "registered_tasks"]

LOCK = ".measuring.lock"
STOP_WAIT_S = 2.0  # a SIGSTOPped process on a busy host stops within milliseconds; this is a bound

# Reads its pipe until the benchmark closes it (or dies), then resumes the pids it was given.
_WATCHDOG = (
    "import os, signal, sys\n"
    "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
    "sys.stdin.buffer.read()\n"
    "for pid in sys.argv[1:]:\n"
    "    try:\n"
    "        os.kill(int(pid), signal.SIGCONT)\n"
    "    except OSError:\n"
    "        pass\n"
)


def _can_pause() -> bool:
    return hasattr(signal, "SIGSTOP")


def _own_folder(folder: Path) -> Path:
    """The folder, made private to this user if new; refused if another user owns it (whoever can write
    there chooses which processes a benchmark stops)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    owner = folder.stat().st_uid
    if hasattr(os, "getuid") and owner != os.getuid():
        raise PermissionError(f"the folder of CPU tasks {folder} belongs to uid {owner}, not to this user "
                              f"({os.getuid()}): set PRUNEFLOW_CPU_TASKS to a folder of your own")
    return folder


@contextlib.contextmanager
def registered(folder: Path | None = None, label: str = "") -> Iterator[Path]:
    """Register this process as a CPU task of the host while the block runs (a benchmark may stop it);
    ``folder`` defaults to the deployment's (:func:`pruneflow.settings.cpu_tasks_dir`)."""
    folder = _own_folder(folder or cpu_tasks_dir())
    me = psutil.Process()
    path = folder / f"{me.pid}.json"
    with FileLock(folder / LOCK):
        path.write_text(json.dumps({"pid": me.pid, "create_time": me.create_time(), "label": label}))
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def registered_tasks(folder: Path) -> list[psutil.Process]:
    """The live registered processes other than this one; files of processes that are gone are removed."""
    tasks = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            entry = json.loads(path.read_text())
            proc = psutil.Process(int(entry["pid"]))
            alive = proc.create_time() == entry["create_time"] and proc.status() != psutil.STATUS_ZOMBIE
        except FileNotFoundError:
            continue  # its task ended just now
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            alive = False
        if not alive:
            path.unlink(missing_ok=True)
        elif proc.pid != os.getpid():
            tasks.append(proc)
    return tasks


@contextlib.contextmanager
def paused(folder: Path | None = None, say: Callable[[str], None] | None = None) -> Iterator[list[int]]:
    """Stop the host's registered CPU tasks while the block runs; yields their pids (empty: none).
    ``folder`` defaults to the deployment's, as in :func:`registered`."""
    if not _can_pause():
        yield []
        return
    folder = _own_folder(folder or cpu_tasks_dir())
    with FileLock(folder / LOCK), _stopped(registered_tasks(folder), say) as stopped:
        yield stopped


@contextlib.contextmanager
def _stopped(tasks: list[psutil.Process], say: Callable[[str], None] | None) -> Iterator[list[int]]:
    if not tasks:
        yield []
        return
    pids = [p.pid for p in tasks]
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, *map(str, pids)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, start_new_session=True)
    stopped: list[int] = []
    try:
        watchdog.stdout.readline()  # it is up before anything is stopped
        for proc in tasks:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGSTOP)  # psutil checks the pid still names the same process
                stopped.append(proc.pid)
        _wait_until_stopped(tasks)
        if say:
            say(f"paused {len(stopped)} CPU task(s) while measuring: pid {', '.join(map(str, stopped))}")
        yield stopped
    finally:
        for proc in tasks:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGCONT)
        watchdog.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(timeout=10)
        watchdog.stdout.close()


def _wait_until_stopped(tasks: list[psutil.Process], timeout: float = STOP_WAIT_S) -> None:
    """Return once every task has stopped (or is gone): SIGSTOP takes effect when the kernel next
    schedules the task, not when ``kill`` returns, and the measurement must not overlap a task still
    running. Gives up after ``timeout`` (a task stopped under a tracer, say), measuring anyway."""
    deadline = time.monotonic() + timeout
    waiting = list(tasks)
    while waiting and time.monotonic() < deadline:
        waiting = [p for p in waiting if _still_running(p)]
        if waiting:
            time.sleep(0.001)


def _still_running(proc: psutil.Process) -> bool:
    try:
        return proc.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP, psutil.STATUS_ZOMBIE,
                                     psutil.STATUS_DEAD)
    except psutil.Error:
        return False
