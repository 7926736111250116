"""A sweep through real Airflow servers: prune_sweep rounds trigger prune_trial runs, the search is
told, the study resumes, the report is written, and the plugin page serves it only to a logged-in user."""

import shutil
import time

import httpx
from airflow_servers import REPO, airflow_servers  # noqa: F401  (the shared fixture)
from test_ui_browser import browser_context  # noqa: F401

from pruneflow import analysis

SPACE = [{"name": "layer1", "patterns": ["layer1.*.conv1"], "low": 0.0, "high": 0.8, "step": 0.2},
         {"name": "layer3", "patterns": ["layer3.*.conv1"], "low": 0.0, "high": 0.8, "step": 0.2}]
TRIAL = {"image_size": 16, "baseline_epochs": 3, "rounds": 2, "iterations": 20, "warmup": 5}


def _sweep_runs(client) -> list[dict]:
    r = client.get("/api/v2/dags/prune_sweep/dagRuns", params={"limit": 100})
    r.raise_for_status()
    return r.json()["dag_runs"]


def _wait_sweep(client, expected_runs: int, timeout: float = 600) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _sweep_runs(client)
        states = [r["state"] for r in runs]
        if "failed" in states:
            raise AssertionError(f"a prune_sweep round failed: {runs}")
        if len(runs) >= expected_runs and all(s == "success" for s in states):
            return runs
        time.sleep(3)
    raise AssertionError(f"sweep did not finish: {_sweep_runs(client)}")


def test_sweep_rounds_resume_report_and_plugin(airflow_servers):  # noqa: F811
    s = airflow_servers
    client = s.client(s.token())
    for dag_id in ("prune_trial", "prune_sweep"):
        s.wait_for_dag(client, dag_id)
        assert client.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}).status_code == 200

    bad = client.post("/api/v2/dags/prune_sweep/dagRuns", json={
        "logical_date": None, "conf": {"study": "x", "objective": "top1_under_latency", "latency_budget": {"value": 2}}})
    assert bad.status_code == 400 and "latency_budget" in bad.text

    conf = {"study": "airflow-sweep", "n_trials": 3, "parallel": 2, "sampler": "random", "space": SPACE,
            "trial": TRIAL}
    r = client.post("/api/v2/dags/prune_sweep/dagRuns", json={"logical_date": None, "conf": conf})
    assert r.status_code == 200, r.text
    _wait_sweep(client, expected_runs=2)  # 3 trials in rounds of 2: two prune_sweep runs
    rows = analysis.study_rows(s.results_db, "airflow-sweep")
    assert len(rows) == 3 and rows[0]["dense"]
    assert all(r["status"] in ("succeeded", "failed", "abandoned") for r in rows)
    assert sum(r["status"] == "succeeded" for r in rows) >= 2
    trial_runs = client.get("/api/v2/dags/prune_trial/dagRuns", params={"limit": 100}).json()["dag_runs"]
    assert sum(1 for t in trial_runs if (t.get("conf") or {}).get("study") == "airflow-sweep") == 3
    report = s.out / "reports" / "airflow-sweep" / "report.html"
    assert report.is_file() and "Pareto front" in report.read_text()

    # a second run of the same study continues it
    r = client.post("/api/v2/dags/prune_sweep/dagRuns", json={"logical_date": None, "conf": {**conf, "n_trials": 1}})
    assert r.status_code == 200
    _wait_sweep(client, expected_runs=3)
    rows = analysis.study_rows(s.results_db, "airflow-sweep")
    assert [r["trial_id"] for r in rows] == [f"airflow-sweep-{i:04d}" for i in range(4)]

    # the plugin page: refused without credentials, served with the UI's token
    anonymous = httpx.get(f"{s.url}/pruneflow/studies/airflow-sweep", timeout=60)
    assert anonymous.status_code == 401
    page = client.get("/pruneflow/studies/airflow-sweep", timeout=120)
    assert page.status_code == 200 and "<svg" in page.text and "airflow-sweep-0000" in page.text
    index = client.get("/pruneflow/")
    assert index.status_code == 200 and "airflow-sweep" in index.text


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
