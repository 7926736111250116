"""pruneflow.cpu_pause with real processes: a benchmark stops the host's registered torch tasks while it
measures, resumes them after, and a benchmark killed meanwhile leaves none stopped."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from test_bench import make_cnn

from pruneflow.bench import BenchmarkOptions, measure
from pruneflow.cpu_pause import paused, registered, registered_tasks

# A torch task's stand-in: registers, says so, then keeps a core busy until killed.
TASK = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pruneflow.cpu_pause import registered
    with registered(Path(sys.argv[1]), "busy"):
        print("registered", flush=True)
        while True:
            pass
""")


@pytest.fixture
def tasks(tmp_path):
    folder = tmp_path / "cpu-tasks"
    procs: list[subprocess.Popen] = []

    def start(n: int = 1) -> list[psutil.Process]:
        for _ in range(n):
            p = subprocess.Popen([sys.executable, "-c", TASK, str(folder)], stdout=subprocess.PIPE, text=True)
            assert p.stdout.readline().strip() == "registered"
            procs.append(p)
        return [psutil.Process(p.pid) for p in procs[-n:]]

    yield folder, start
    for p in procs:
        p.kill()
        p.wait()


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def _advances(proc: psutil.Process, wait: float = 0.3) -> bool:
    before = _cpu(proc)
    time.sleep(wait)
    return _cpu(proc) > before


def test_paused_stops_registered_tasks_and_resumes_them(tasks):
    folder, start = tasks
    procs = start(2)
    assert sorted(p.pid for p in registered_tasks(folder)) == sorted(p.pid for p in procs)
    said: list[str] = []
    with paused(folder, said.append) as stopped:
        assert sorted(stopped) == sorted(p.pid for p in procs)
        for p in procs:
            assert p.status() == psutil.STATUS_STOPPED
            assert not _advances(p)
    assert said and "paused 2 CPU task(s)" in said[0]
    for p in procs:
        assert p.status() != psutil.STATUS_STOPPED
        assert _advances(p)


def test_a_task_starting_while_a_benchmark_measures_waits_for_it(tmp_path):
    folder = tmp_path / "cpu-tasks"
    with paused(folder) as stopped:
        assert stopped == []
        late = subprocess.Popen([sys.executable, "-c", TASK, str(folder)], stdout=subprocess.PIPE, text=True)
        try:
            ready, _, _ = select.select([late.stdout], [], [], 3.0)
            assert not ready, "a task registered (and ran) while a benchmark measured"
        except BaseException:
            late.kill()
            raise
    try:
        assert late.stdout.readline().strip() == "registered"
        assert [p.pid for p in registered_tasks(folder)] == [late.pid]
    finally:
        late.kill()
        late.wait()


def test_nothing_registered_stops_nothing(tmp_path):
    with paused(tmp_path / "none") as stopped:
        assert stopped == []


def test_own_process_and_stale_files_are_skipped_and_removed(tmp_path):
    folder = tmp_path / "cpu-tasks"
    with registered(folder, "me") as mine:
        assert json.loads(mine.read_text())["pid"] == os.getpid()
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        (folder / f"{gone.pid}.json").write_text(json.dumps({"pid": gone.pid, "create_time": 1.0}))
        # a live process whose pid file was written for an earlier process of that pid
        (folder / f"{os.getppid()}.json").write_text(json.dumps({"pid": os.getppid(), "create_time": 1.0}))
        (folder / "123.json").write_text("{not json")
        assert registered_tasks(folder) == []
        assert sorted(p.name for p in folder.glob("*.json")) == [mine.name]
        with paused(folder) as stopped:
            assert stopped == []
    assert list(folder.glob("*.json")) == []


def test_a_benchmark_killed_while_measuring_leaves_nothing_stopped(tasks):
    folder, start = tasks
    (proc,) = start()
    bench = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from pruneflow.cpu_pause import paused
        with paused(Path({str(folder)!r})) as stopped:
            print(len(stopped), flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert bench.stdout.readline().strip() == "1"
        assert proc.status() == psutil.STATUS_STOPPED
        bench.send_signal(signal.SIGKILL)  # no finally block runs: the watchdog resumes the task
        bench.wait()
        deadline = time.monotonic() + 10
        while proc.status() == psutil.STATUS_STOPPED and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.status() != psutil.STATUS_STOPPED
        assert _advances(proc)
    finally:
        bench.kill()
        bench.wait()


def test_measure_stops_the_tasks_for_its_timed_rounds_only(tasks, tmp_path):
    folder, start = tasks
    (proc,) = start()
    model = make_cnn(tmp_path / "m.onnx")
    states: dict[str, str] = {}

    def progress(message: str) -> None:
        if message.startswith(("compiled", "warm-up", "round")):
            states.setdefault(message.split()[0], proc.status())

    r = measure(model, BenchmarkOptions(warmup=3, rounds=2, iterations=5), progress=progress,
                isolation=lambda: paused(folder))
    assert r["paused_cpu_tasks"] == 1
    assert states == {"compiled": psutil.STATUS_RUNNING, "warm-up:": psutil.STATUS_STOPPED,
                      "round": psutil.STATUS_STOPPED}
    assert proc.status() != psutil.STATUS_STOPPED
    assert measure(model, BenchmarkOptions(warmup=0, rounds=1, iterations=2))["paused_cpu_tasks"] == 0


def test_a_folder_of_another_user_is_refused_with_the_variable_named(tmp_path):
    if os.getuid() != 0:
        pytest.skip("needs root to give the folder to another user")
    folder = tmp_path / "theirs"
    folder.mkdir()
    os.chown(folder, 12345, 12345)
    for enter in (lambda: registered(folder), lambda: paused(folder)):
        with pytest.raises(PermissionError, match="PRUNEFLOW_CPU_TASKS"), enter():
            pass


def test_a_new_folder_is_private(tmp_path):
    folder = tmp_path / "new" / "cpu-tasks"
    with registered(folder):
        assert folder.stat().st_mode & 0o777 == 0o700


def test_the_default_folder_is_the_deployments(tasks, monkeypatch):
    folder, start = tasks
    monkeypatch.setenv("PRUNEFLOW_CPU_TASKS", str(folder))
    (proc,) = start()
    with paused() as stopped:
        assert stopped == [proc.pid] and proc.status() == psutil.STATUS_STOPPED
    with registered(label="me") as mine:
        assert mine.parent == folder
