"""A sweep through real Airflow servers: prune_sweep's lanes trigger prune_trial runs without round
barriers, the search is told, a killed sweep resumes without a trial left RUNNING, a dense trial that keeps
failing fails the sweep with the reason, the nightly schedule continues its studies, the report is written,
and the plugin page serves it only to a logged-in user."""

import itertools
import os
import shutil
import time
from datetime import datetime

import httpx
import optuna
import yaml
from airflow_servers import NIGHTLY_SCHEDULE, REPO, airflow_servers  # noqa: F401  (the shared fixture)
from test_ui_browser import browser_context  # noqa: F401

from pruneflow import analysis

SPACE = [{"name": "layer1", "patterns": ["layer1.*.conv1"], "low": 0.0, "high": 0.8, "step": 0.2},
         {"name": "layer3", "patterns": ["layer3.*.conv1"], "low": 0.0, "high": 0.8, "step": 0.2}]
TRIAL = {"image_size": 16, "baseline_epochs": 3, "rounds": 2, "iterations": 20, "warmup": 5}


def _sweep_runs(client) -> list[dict]:
    r = client.get("/api/v2/dags/prune_sweep/dagRuns", params={"limit": 100})
    r.raise_for_status()
    return r.json()["dag_runs"]


def _wait_sweep(client, expected_runs: int, timeout: float = 600, study: str | None = None) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [r for r in _sweep_runs(client) if study is None or (r.get("conf") or {}).get("study") == study]
        states = [r["state"] for r in runs]
        if "failed" in states and study is None:
            raise AssertionError(f"a prune_sweep run failed: {runs}")
        if len(runs) >= expected_runs and all(s in ("success", "failed") for s in states):
            return runs
        time.sleep(3)
    raise AssertionError(f"sweep did not finish: {_sweep_runs(client)}")


def _trial_runs(client, study: str) -> list[dict]:
    runs = client.get("/api/v2/dags/prune_trial/dagRuns", params={"limit": 100}).json()["dag_runs"]
    return [t for t in runs if (t.get("conf") or {}).get("study") == study]


def _t(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _study(s, name: str):
    return optuna.load_study(study_name=name, storage=s.results_db)


def _assert_no_round_barrier(trial_runs: list[dict], trials: list, parallel: int) -> None:
    """From the run records: at most `parallel` prune_trial runs at once, every lane in use, and each lane
    asks its next trial only after telling the last one. (Whether another lane's tell falls in a lane's
    hand-over is timing, so it is not asserted: the full suite once saw one there.)"""
    events = sorted([(_t(r["start_date"]), 1) for r in trial_runs] + [(_t(r["end_date"]), -1) for r in trial_runs])
    in_flight = peak = 0
    for _, step in events:
        in_flight += step
        peak = max(peak, in_flight)
    assert 1 <= peak <= parallel, (peak, parallel)
    lanes: dict[int, list] = {}
    for t in trials:
        index = t.user_attrs["slot"].rsplit("/", 1)[1]
        lanes.setdefault(int(index) % parallel, []).append(t)
    assert len(lanes) == parallel
    for lane in lanes.values():
        lane.sort(key=lambda t: t.datetime_start)
        for before, after in itertools.pairwise(lane):
            assert before.datetime_complete <= after.datetime_start  # told, then the next asked


def test_sweep_rounds_resume_report_and_plugin(airflow_servers):  # noqa: F811
    s = airflow_servers
    client = s.client(s.token())
    for dag_id in ("prune_trial", "prune_sweep"):
        s.wait_for_dag(client, dag_id)
        s.set_paused(client, dag_id, False)

    bad = client.post("/api/v2/dags/prune_sweep/dagRuns", json={
        "logical_date": None, "conf": {"study": "x", "objective": "top1_under_latency", "latency_budget": {"value": 2}}})
    assert bad.status_code == 400 and "latency_budget" in bad.text

    conf = {"study": "airflow-sweep", "n_trials": 3, "parallel": 2, "sampler": "random", "space": SPACE,
            "trial": TRIAL}
    r = client.post("/api/v2/dags/prune_sweep/dagRuns", json={"logical_date": None, "conf": conf})
    assert r.status_code == 200, r.text
    _wait_sweep(client, expected_runs=1)  # the 3 trials in 2 lanes: one prune_sweep run, no rounds
    rows = analysis.study_rows(s.results_db, "airflow-sweep")
    assert len(rows) == 3 and rows[0]["dense"]
    assert all(r["status"] in ("succeeded", "failed", "abandoned") for r in rows)
    assert sum(r["status"] == "succeeded" for r in rows) >= 2
    trial_runs = _trial_runs(client, "airflow-sweep")
    assert len(trial_runs) == 3
    trials = _study(s, "airflow-sweep").trials
    assert all(t.state.is_finished() for t in trials)
    _assert_no_round_barrier(trial_runs, trials, parallel=2)
    report = s.out / "reports" / "airflow-sweep" / "report.html"
    assert report.is_file() and "Pareto front" in report.read_text()

    # a second run of the same study continues it
    r = client.post("/api/v2/dags/prune_sweep/dagRuns", json={"logical_date": None, "conf": {**conf, "n_trials": 1}})
    assert r.status_code == 200
    _wait_sweep(client, expected_runs=2)
    rows = analysis.study_rows(s.results_db, "airflow-sweep")
    assert [r["trial_id"] for r in rows] == [f"airflow-sweep-{i:04d}" for i in range(4)]

    # the plugin page: refused without credentials, served with the UI's token
    anonymous = httpx.get(f"{s.url}/pruneflow/studies/airflow-sweep", timeout=60)
    assert anonymous.status_code == 401
    page = client.get("/pruneflow/studies/airflow-sweep", timeout=120)
    assert page.status_code == 200 and "<svg" in page.text and "airflow-sweep-0000" in page.text
    index = client.get("/pruneflow/")
    assert index.status_code == 200 and "airflow-sweep" in index.text


def _unpause(s, client, *dag_ids: str) -> None:
    for dag_id in dag_ids:
        s.set_paused(client, dag_id, False)


def _post_sweep(client, conf: dict) -> str:
    r = client.post("/api/v2/dags/prune_sweep/dagRuns", json={"logical_date": None, "conf": conf})
    assert r.status_code == 200, r.text
    return r.json()["dag_run_id"]


def _task_log(s, dag_id: str, run_id: str, task_id: str) -> str:
    folder = s.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
    return "\n".join(p.read_text(errors="replace") for p in sorted(folder.rglob("*.log")))


def test_a_dense_trial_that_keeps_failing_fails_the_sweep_with_the_reason(airflow_servers):  # noqa: F811
    """A fraction latency budget needs the dense latency: the dense trial is run again once, then the sweep
    run fails, its finish task naming both failures, and no trial is left RUNNING."""
    s = airflow_servers
    client = s.client(s.token())
    s.wait_for_dag(client, "prune_sweep")
    _unpause(s, client, "prune_trial", "prune_sweep")
    missing = s.out / "trials" / "no-such-baseline" / "model.pt"  # every trial fails in ensure_baseline (in prune_to_export)
    run_id = _post_sweep(client, {
        "study": "dense-fails", "n_trials": 2, "parallel": 2, "sampler": "random", "space": SPACE,
        "objective": "top1_under_latency", "latency_budget": {"value": 0.8, "unit": "fraction"},
        "trial": {**TRIAL, "baseline": str(missing)}})
    run = s.wait_for_run(client, run_id, dag_id="prune_sweep", timeout=600)
    assert run["state"] == "failed", run
    assert s.task_states(client, run_id, dag_id="prune_sweep")["finish"] == "failed"
    log = _task_log(s, "prune_sweep", run_id, "finish")
    assert "the dense trial failed 2 times" in log and "checkpoint not found" in log, log[-3000:]
    trials = _study(s, "dense-fails").trials
    assert [t.state.name for t in trials if t.user_attrs.get("dense")] == ["FAIL", "FAIL"]
    assert all(t.state.is_finished() for t in trials)


def _nights(client) -> list[dict]:
    runs = client.get("/api/v2/dags/prune_sweep_nightly/dagRuns", params={"limit": 100}).json()["dag_runs"]
    return [n for n in runs if n["run_type"] == "scheduled"]


def _continued(client, night_id: str) -> int:
    """How many studies a night continued: its mapped continue_study tasks (none when the list was empty)."""
    r = client.get(f"/api/v2/dags/prune_sweep_nightly/dagRuns/{night_id}/taskInstances", params={"limit": 100})
    r.raise_for_status()
    return sum(t["task_id"] == "continue_study" and t["map_index"] >= 0 and t["state"] == "success"
               for t in r.json()["task_instances"])


def test_the_nightly_schedule_continues_its_studies_and_a_killed_sweep_resumes(airflow_servers):  # noqa: F811
    """A sweep is killed while its trial runs (its run marked failed, as from the UI). Then the nightly DAG,
    run by the scheduler on its configured schedule, runs both listed studies by their per-night budget: the
    killed study is continued, its stale trial told (no trial stays RUNNING), and a new study is started."""
    s = airflow_servers
    client = s.client(s.token())
    s.wait_for_dag(client, "prune_sweep")
    _unpause(s, client, "prune_trial", "prune_sweep")
    killed = {"study": "killed-sweep", "n_trials": 2, "parallel": 1, "sampler": "random", "space": SPACE,
              "trial": TRIAL, "report": False}
    run_id = _post_sweep(client, killed)
    deadline = time.monotonic() + 300
    while not _trial_runs(client, "killed-sweep"):
        assert time.monotonic() < deadline, "the sweep never started a trial"
        time.sleep(1)
    # killed while its lane waits for the trial (deferred), as a user sees it in the UI
    while s.task_states(client, run_id, dag_id="prune_sweep").get("run_trials") != "deferred":
        assert time.monotonic() < deadline, "the sweep's lane never waited for its trial"
        time.sleep(0.2)
    assert s.patch(client, f"/api/v2/dags/prune_sweep/dagRuns/{run_id}", {"state": "failed"}).status_code == 200
    assert [t.state.name for t in _study(s, "killed-sweep").trials] == ["RUNNING"]  # asked, never told

    (s.out / "nightly.yaml").write_text(yaml.safe_dump([
        {**killed, "n_trials": 1},
        {"study": "nightly-new", "n_trials": 1, "parallel": 2, "sampler": "random", "space": SPACE, "trial": TRIAL,
         "report": False}]))
    details = s.wait_for_dag(client, "prune_sweep_nightly")
    assert NIGHTLY_SCHEDULE in str(details.get("timetable_summary")), details.get("timetable_summary")
    # The DAG's next run date was computed when it was last parsed, minutes ago with a re-parse interval of
    # 600 s: unpaused as it is, the scheduler runs that stale minute, then at once the latest one. A touched
    # file is re-parsed within seconds, which brings the date up to now.
    touched = time.time()
    os.utime(REPO / "dags" / "prune_sweep_nightly.py")
    deadline = time.monotonic() + 120
    while _t(client.get("/api/v2/dags/prune_sweep_nightly/details").json()["last_parsed_time"]) < touched:
        assert time.monotonic() < deadline, "prune_sweep_nightly.py was not re-parsed after it was touched"
        time.sleep(0.5)
    _unpause(s, client, "prune_sweep_nightly")  # catchup off: the scheduler's next tick on the schedule runs it
    deadline = time.monotonic() + 300
    while not (nights := _nights(client)):
        assert time.monotonic() < deadline, "the scheduler did not run prune_sweep_nightly on its schedule"
        time.sleep(1)
    assert s.wait_for_run(client, nights[0]["dag_run_id"], dag_id="prune_sweep_nightly")["state"] == "success"
    (s.out / "nightly.yaml").write_text("[]\n")  # later ticks (every minute) continue nothing
    s.set_paused(client, "prune_sweep_nightly", True)
    # The schedule ticks every minute, so the next tick can come before the list is emptied: count the nights
    # that read it (each continued both studies by one trial) rather than assume there was one.
    nights = _nights(client)
    continued = [_continued(client, n["dag_run_id"]) for n in nights
                 if s.wait_for_run(client, n["dag_run_id"], dag_id="prune_sweep_nightly")["state"] == "success"]
    assert len(continued) == len(nights) and 2 in continued and set(continued) <= {0, 2}, continued
    read = continued.count(2)
    for study, before in (("killed-sweep", 1), ("nightly-new", 0)):  # the killed run; the nights'
        runs = _wait_sweep(client, expected_runs=before + read, study=study)
        nightly = [r for r in runs if r["run_type"] == "operator_triggered"]  # the killed run is "manual"
        assert len(runs) == before + read and [r["state"] for r in nightly] == ["success"] * read, runs
        trials = _study(s, study).trials
        assert len(trials) == before + read and all(t.state.is_finished() for t in trials)
    stale = _study(s, "killed-sweep").trials[0]
    assert stale.state.name != "FAIL" or "stale: asked by sweep run" in stale.user_attrs["reason"]
    orphan = _trial_runs(client, "killed-sweep")[0]["dag_run_id"]  # the killed sweep's trial run ends on its own
    assert s.wait_for_run(client, orphan, timeout=300)["state"] in ("success", "failed")


def test_plugin_page_in_a_real_browser(airflow_servers, browser_context, tmp_path):  # noqa: F811
    """Chromium logs in to the Airflow UI and opens pruneflow's page: the Pareto plot is on it."""
    s = airflow_servers
    page = browser_context.new_page()
    refused = page.goto(f"{s.url}/pruneflow/")  # no cookie yet: refused, and nothing of the results shown
    assert refused.status == 401 and "Not authenticated" in page.content(), (refused.status, page.content()[:500])
    assert "airflow-sweep" not in page.content()
    page.goto(f"{s.url}/dags/prune_sweep")
    page.locator("input[name=username]").fill("admin")
    page.locator("input[name=password]").fill(s.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/dags/prune_sweep**")
    # the plugin and its navigation link are registered with the API server
    with s.client(s.token()) as client:
        plugins = client.get("/api/v2/plugins").json()["plugins"]
    mine = next(p for p in plugins if p["name"] == "pruneflow")
    assert [v["name"] for v in mine["external_views"]] == ["Pruning results"]
    served = page.goto(f"{s.url}/pruneflow/")  # logged in: the studies and the trials tables
    assert served.status == 200
    studies = page.locator("table").first
    assert studies.locator("a[href='studies/airflow-sweep']").count() == 1
    trials = page.locator("table").nth(1).inner_text()
    assert all(f"airflow-sweep-{i:04d}" in trials for i in range(4)), trials  # the 3 + 1 trials run above
    page.get_by_text("airflow-sweep").first.click()
    page.wait_for_url("**/pruneflow/studies/airflow-sweep")
    plot = page.locator(".pareto-plot svg")
    plot.wait_for()
    assert plot.count() == 1 and page.locator(".pareto-plot svg a").count() >= 3  # points link to trials
    shot = tmp_path / "plugin_pareto.png"
    page.screenshot(path=str(shot), full_page=True)
    artifact = REPO / "out" / "test-artifacts" / "plugin_pareto.png"
    artifact.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, artifact)
    assert shot.stat().st_size > 10_000
