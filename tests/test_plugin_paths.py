"""The plugin page's FastAPI app in-process (TestClient, no servers): it serves and writes nothing outside the
reports root, whatever the study or file name (encoded '..', absolute names, symbolic links), it refuses the
anonymous, and it rebuilds a study's report only when the study's trials changed."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import airflow_env
import pytest

REPO = Path(__file__).resolve().parents[1]
SECRET = "not for the web"


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in (*airflow_env.RESTORE, "PRUNEFLOW_REPORTS")}
    airflow_env.configure(tmp_path_factory.mktemp("af"))
    spec = importlib.util.spec_from_file_location("pruneflow_plugin_under_test", REPO / "plugins" / "pruneflow_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def site(plugin, tmp_path, monkeypatch):
    """A results DB with one study of two trials, the reports root under tmp, and secrets beside it."""
    from pruneflow.store import ResultsStore
    from pruneflow.sweep import open_study, parse_sweep

    db = f"sqlite:///{tmp_path / 'results.db'}"
    root = tmp_path / "site" / "reports"
    root.mkdir(parents=True)
    monkeypatch.setenv("PRUNEFLOW_DB", db)
    monkeypatch.setenv("PRUNEFLOW_REPORTS", str(root))
    (tmp_path / "site" / "secret.txt").write_text(SECRET)  # <root>/../secret.txt
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "report.html").write_text(SECRET)
    (outside / "secret.txt").write_text(SECRET)

    sweep = parse_sweep({"study": "s1", "objective": "latency", "base": {"baseline": {"checkpoint": "x.pt"}, "db": db},
                         "space": [{"name": "a", "patterns": ["layer1.*"], "high": 0.9}]})
    open_study(sweep)
    store = ResultsStore(db)
    for i, (sparsity, latency, top1) in enumerate([(0.0, 1.0, 90.0), (0.5, 0.6, 85.0)]):
        add_trial(store, sweep, f"s1-{i:04d}", sparsity, latency, top1)
    store.close()
    return {"db": db, "root": root, "outside": outside, "sweep": sweep, "tmp": tmp_path}


def add_trial(store, sweep, trial_id, sparsity, latency, top1):
    spec = sweep.trial_spec().model_dump(mode="json")
    spec["pruning"]["groups"] = [{"name": "a", "patterns": ["layer1.*"], "sparsity": sparsity}]
    store.upsert_trial(trial_id, study="s1", status="succeeded", latency_median_ms=latency, top1_masked=top1,
                       top1_final=top1, macs_after=1000, epochs_run=0, spec_json=spec,
                       sparsities_json={"a": {"target": sparsity, "achieved": sparsity}})


@pytest.fixture
def client(plugin, site):
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi.testclient import TestClient

    app = plugin.create_app()
    app.dependency_overrides[get_user] = lambda: {"username": "tester"}
    with TestClient(app) as c:
        yield c


def test_anonymous_is_refused(plugin, site):
    from fastapi.testclient import TestClient

    with TestClient(plugin.create_app()) as anonymous:
        for url in ("/", "/studies/s1", "/studies/s1/report/report.html", "/api/trials"):
            r = anonymous.get(url)
            assert r.status_code == 401, (url, r.status_code)
    assert not (site["root"] / "s1").exists()


@pytest.mark.parametrize("url", [
    "/studies/%2e%2e/report/secret.txt",
    "/studies/%2E%2E/report/secret.txt",
    "/studies/..%2Foutside/report/secret.txt",
    "/studies/%2e%2e%2Foutside/report/report.html",
    "/studies/%2Ftmp/report/secret.txt",
    "/studies/s1/report/%2e%2e",
    "/studies/s1/report/..%2F..%2Fsecret.txt",
    "/studies/s1/report/%2Fetc%2Fpasswd",
    "/studies/./report/secret.txt",
    "/studies/%2e/report/..",
    "/studies/.hidden/report/secret.txt",
    "/studies/s1%0A/report/report.html",
    "/studies/s1%00/report/report.html",
])
def test_no_file_outside_the_reports_root_is_served(client, site, url):
    client.get("/studies/s1")  # the study's report exists
    r = client.get(url)
    assert r.status_code == 404, (url, r.status_code, r.text[:200])
    assert SECRET not in r.text


def _alias_study(site, name: str) -> None:
    """An Optuna study called `name` (which no sweep would accept) holding s1's sweep: a page for it would
    build a report."""
    import optuna

    study = optuna.create_study(study_name=name, storage=site["db"])
    study.set_user_attr("sweep_spec", site["sweep"].model_dump(mode="json"))


def test_traversing_study_names_write_nothing_outside_the_root(client, site):
    _alias_study(site, "..")
    before = sorted(p.relative_to(site["tmp"]) for p in site["tmp"].rglob("*"))
    for url in ("/studies/%2e%2e", "/studies/..%2Foutside", "/studies/%2e", "/studies/%2Ftmp%2Fx",
                "/studies/s1..%2F..", "/studies/" + "x" * 101):
        assert client.get(url).status_code == 404, url
    after = sorted(p.relative_to(site["tmp"]) for p in site["tmp"].rglob("*"))
    assert [p for p in after if p not in before and not str(p).startswith("site/reports/.build.lock")] == []
    assert not (site["tmp"] / "site" / "report.html").exists()


def test_symbolic_links_out_of_the_root_are_not_followed(client, site):
    root, outside = site["root"], site["outside"]
    _alias_study(site, "evil")
    (root / "evil").symlink_to(outside, target_is_directory=True)
    assert client.get("/studies/evil/report/report.html").status_code == 404
    assert client.get("/studies/evil/report/secret.txt").status_code == 404
    assert client.get("/studies/evil").status_code == 404
    assert sorted(p.name for p in outside.iterdir()) == ["report.html", "secret.txt"]  # nothing written there

    page = client.get("/studies/s1")
    assert page.status_code == 200
    (root / "s1" / "leak.txt").symlink_to(outside / "secret.txt")
    (root / "s1" / "up.html").symlink_to(root / "s1" / ".." / ".." / "secret.txt")
    for name in ("leak.txt", "up.html"):
        r = client.get(f"/studies/s1/report/{name}")
        assert r.status_code == 404 and SECRET not in r.text, name
    # and the real files are still served
    r = client.get("/studies/s1/report/trials.csv")
    assert r.status_code == 200 and "s1-0001" in r.text


def test_the_report_is_rebuilt_only_when_the_study_changes(client, site, monkeypatch):
    from pruneflow import report
    from pruneflow.store import ResultsStore

    builds = []
    real = report.write_report

    def counting(*args, **kwargs):
        builds.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(report, "write_report", counting)
    html = site["root"] / "s1" / "report.html"

    first = client.get("/studies/s1")
    assert first.status_code == 200 and "s1-0001" in first.text and "2 trials" in first.text
    assert builds == ["s1"]
    stamp = html.stat().st_mtime_ns, html.stat().st_ino

    second = client.get("/studies/s1")
    assert second.status_code == 200 and "2 trials" in second.text
    assert builds == ["s1"], "an unchanged study must be served from its last report"
    assert (html.stat().st_mtime_ns, html.stat().st_ino) == stamp

    store = ResultsStore(site["db"])
    add_trial(store, site["sweep"], "s1-0002", 0.8, 0.3, 80.0)  # a new trial
    third = client.get("/studies/s1")
    assert third.status_code == 200 and "3 trials" in third.text and "s1-0002" in third.text
    assert builds == ["s1", "s1"]
    assert "s1-0002" in client.get("/studies/s1/report/trials.csv").text
    assert client.get("/studies/s1").status_code == 200 and builds == ["s1", "s1"]

    store.set_status("s1-0002", "failed", reason="changed")  # a changed trial
    fourth = client.get("/studies/s1")
    assert fourth.status_code == 200 and builds == ["s1", "s1", "s1"]
    store.close()


def test_unknown_study_is_404_and_leaves_no_folder(client, site):
    r = client.get("/studies/nope")
    assert r.status_code == 404 and "not found" in r.text
    assert not (site["root"] / "nope").exists()
