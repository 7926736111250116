"""The process handling of `pruneflow airflow up/down/status`, without Airflow: stand-in processes started
the way `up` starts the servers (own session, the home's marker in their environment) are found and
stopped; processes of another home, or unmarked, are left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from pruneflow import airflow_cli, services
from pruneflow.airflow_cli import MARKER, Home

SLEEP = "import time; time.sleep(120)"
# A marked process that starts a child without the marker (like a task process that sets its title and so
# overwrites the environment memory the marker is read from), writes the child's pid, then sleeps.
PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    env = {k: v for k, v in os.environ.items() if k != "PRUNEFLOW_AIRFLOW_SERVER"}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env=env)
    open(sys.argv[1], "w").write(str(child.pid))
    time.sleep(120)
""")
# A marked process that leaves a process in its group which is neither marked nor its descendant (a
# double fork: the grandchild is re-parented), writes that process's pid, then sleeps.
GROUP_LEADER = textwrap.dedent("""
    import os, sys, time
    env = {k: v for k, v in os.environ.items() if k != "PRUNEFLOW_AIRFLOW_SERVER"}
    r, w = os.pipe()
    if os.fork() == 0:
        pid = os.fork()
        if pid == 0:
            os.execve(sys.executable, [sys.executable, "-c", "import time; time.sleep(120)"], env)
        os.write(w, str(pid).encode())
        os._exit(0)
    os.wait()
    open(sys.argv[1], "w").write(os.read(r, 32).decode())
    time.sleep(120)
""")


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []

    def start(args: list[str], marker: str | None = None, **kwargs) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != MARKER}
        if marker is not None:
            env[MARKER] = marker
        p = subprocess.Popen([sys.executable, *args], env=env, stdin=subprocess.DEVNULL, **kwargs)
        started.append(p)
        return p

    yield start
    for p in started:
        try:
            os.killpg(p.pid, signal.SIGKILL) if os.getpgid(p.pid) == p.pid else p.kill()
        except (ProcessLookupError, PermissionError):
            pass
        p.wait(timeout=10)


def _wait_for(path: Path, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written")


def _wait_env(pid: int, timeout: float = 10) -> None:
    """Until the interpreter has exec'd (its environment readable), so the test does not race the start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "python" in " ".join(psutil.Process(pid).cmdline()).lower():
                return
        except psutil.Error:
            pass
        time.sleep(0.05)


def test_marked_processes_and_their_descendants_are_found_and_stopped(procs, tmp_path):
    home = Home(tmp_path / "home")
    other = Home(tmp_path / "other-home")
    marked = procs(["-c", SLEEP], marker=str(home.path), start_new_session=True)
    parent = procs(["-c", PARENT, str(tmp_path / "child.pid")], marker=str(home.path), start_new_session=True)
    child_pid = _wait_for(tmp_path / "child.pid")
    foreign = procs(["-c", SLEEP], marker=str(other.path), start_new_session=True)
    plain = procs(["-c", SLEEP], start_new_session=True)
    for p in (marked, parent, foreign, plain):
        _wait_env(p.pid)

    found = airflow_cli.server_processes(home)
    pids = {p.pid for p in found}
    # the unmarked child is found through its marked parent; nothing of another home, nothing unmarked, not us
    assert pids == {marked.pid, parent.pid, child_pid}, (pids, marked.pid, parent.pid, child_pid)
    assert all(p.alive() for p in found)
    assert {p.pid for p in airflow_cli.server_processes(other)} == {foreign.pid}
    assert airflow_cli.running(home) == {}  # no pid files: no component

    messages = []
    airflow_cli.stop(home, grace=1, say=messages.append)
    assert "stray processes" in messages[-1]
    assert [p for p in found if p.alive()] == []
    assert airflow_cli.server_processes(home) == []
    assert not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE
    # the processes that are not this home's are untouched
    assert foreign.poll() is None and plain.poll() is None
    assert psutil.Process(plain.pid).is_running()


def test_components_come_from_pid_files_and_a_reused_pid_is_not_one(procs, tmp_path, monkeypatch):
    home = Home(tmp_path / "home")
    home.run.mkdir(parents=True)
    # a stand-in component: its own process group leader, "airflow" in its command line, the marker set
    comp = procs(["-c", GROUP_LEADER, str(tmp_path / "member.pid"), "airflow", "scheduler"],
                 marker=str(home.path), start_new_session=True)
    member = _wait_for(tmp_path / "member.pid")
    _wait_env(comp.pid)
    _wait_env(member)
    assert os.getpgid(member) == comp.pid and psutil.Process(member).ppid() != comp.pid
    start = psutil.Process(comp.pid).create_time()
    home.pidfile("scheduler").write_text(f"{comp.pid} {start!r}\n")
    assert airflow_cli.running(home) == {"scheduler": comp.pid}
    assert {p.pid for p in airflow_cli.server_processes(home)} == {comp.pid, member}

    # the same pid with another start time is another process: not a component
    home.pidfile("dag-processor").write_text(f"{comp.pid} {start - 1000!r}\n")
    assert airflow_cli.running(home) == {"scheduler": comp.pid}

    # The wall clock stepped by 15 s (a paused and resumed VM: the full suite once lost every component so,
    # `up` then found its own API server's port taken). Psutil's create_time moves with the boot time it is
    # derived from; a pid file in clock ticks after boot (what `up` writes) still matches, one in epoch
    # seconds no longer does.
    from pruneflow.services import start_ticks

    home.pidfile("triggerer").write_text(f"{comp.pid} {start_ticks(psutil.Process(comp.pid))}\n")
    assert airflow_cli.running(home) == {"scheduler": comp.pid, "triggerer": comp.pid}
    booted = psutil._psplatform.boot_time()
    monkeypatch.setattr(psutil._psplatform, "boot_time", lambda: booted + 15.0)
    assert airflow_cli.running(home) == {"triggerer": comp.pid}
    monkeypatch.undo()
    home.pidfile("triggerer").unlink()

    airflow_cli.stop(home, grace=5, say=lambda *_: None)
    assert airflow_cli.running(home) == {} and airflow_cli.server_processes(home) == []
    assert not list(home.run.glob("*.pid"))
    assert comp.wait(timeout=10) is not None  # reaped (by `stop`, which waits for its own children too)
    assert not psutil.pid_exists(member) or psutil.Process(member).status() == psutil.STATUS_ZOMBIE


def test_an_exited_unreaped_process_is_not_running(procs, tmp_path):
    """A zombie (exited, not yet reaped by its parent: here this test) is gone for `up`, `down` and `status`."""
    home = Home(tmp_path / "home")
    p = procs(["-c", "pass"], marker=str(home.path), start_new_session=True)
    deadline = time.monotonic() + 30
    while psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert psutil.Process(p.pid).status() == psutil.STATUS_ZOMBIE
    proc = airflow_cli.Proc(p.pid, psutil.Process(p.pid).create_time())
    assert not proc.alive()
    assert airflow_cli.server_processes(home) == []


def test_devices_are_rendered_at_init_and_bad_ones_refused(tmp_path):
    """`--devices` (celery, first init): one worker and pool per device, the first the default target;
    refused for the local executor, empty, or with a name that is not a device name."""
    home = Home(tmp_path / "home")
    home.path.mkdir()
    # what `init` has made before it renders (dummy secrets and ports)
    (home.path / services.SECRETS_FILE).write_text(json.dumps({k: f"secret-{k}" for k in services.SECRET_KEYS}))
    (home.path / "services.json").write_text(json.dumps({"redis": 6379, "postgres": 5432}))
    home.cfg.write_text(airflow_cli.render_config(home, 8080, "127.0.0.1", "celery", ("cpu1", "cpu0")))
    assert airflow_cli.devices(home) == ["cpu1", "cpu0"]
    settings = home.settings()
    assert settings.get("pruneflow", "benchmark_queue") == settings.get("pruneflow", "benchmark_pool") == "bench_cpu1"
    assert [(w.queue, w.concurrency) for w in airflow_cli.workers(home)][1:] == [("bench_cpu1", 1), ("bench_cpu0", 1)]
    said: list[str] = []
    airflow_cli._note_kept_devices(home, ("cpu0",), said.append)
    airflow_cli._note_kept_devices(home, ("cpu1", "cpu0"), said.append)
    assert len(said) == 1 and "keeps devices = cpu1, cpu0" in said[0]
    airflow_cli.check_devices("celery", None)
    for executor, devs, message in (("local", ("cpu0",), "only with --executor celery"),
                                    ("celery", (), "name at least one device"),
                                    ("celery", ("cpu0", "cpu 1"), "--devices: 'cpu 1' is not a device name")):
        with pytest.raises(airflow_cli.AirflowCliError, match=message):
            airflow_cli.check_devices(executor, devs)
