"""The report, from a fixture DB with known values, checked against independent computations."""

import csv
import json

import numpy as np
import pytest
import yaml
from scipy import stats

from pruneflow.report import write_report
from pruneflow.store import ResultsStore
from pruneflow.sweep import open_study, parse_sweep

# trial id, status, sparsity a, sparsity b, latency ms, Top-1 before, Top-1 after, MACs, epochs (val Top-1)
FIXTURE = [
    ("f-0000", "succeeded", 0.0, 0.0, 1.00, 90.0, 90.0, 1000, []),
    ("f-0001", "succeeded", 0.2, 0.1, 0.90, 70.0, 88.0, 800, [80.0, 88.0]),
    ("f-0002", "succeeded", 0.4, 0.5, 0.70, 40.0, 84.0, 500, [70.0, 84.0]),
    ("f-0003", "succeeded", 0.6, 0.3, 0.75, 30.0, 80.0, 450, [60.0, 80.0]),
    ("f-0004", "succeeded", 0.8, 0.9, 0.40, 10.0, 60.0, 150, [30.0, 60.0]),
    ("f-0005", "abandoned", 0.9, 0.9, None, 10.0, 10.0, 100, [10.0]),
    ("f-0006", "failed", 0.5, 0.5, None, None, None, None, []),
    ("f-0007", "succeeded", 0.1, 0.8, 0.50, 20.0, 79.0, 300, [50.0, 79.0]),
]


@pytest.fixture
def fixture_db(tmp_path):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    sweep = parse_sweep({"study": "f", "objective": "top1_under_latency",
                         "latency_budget": {"value": 0.72, "unit": "fraction"},
                         "base": {"baseline": {"checkpoint": "x.pt"}, "db": db, "finetune": {"epochs": 2}},
                         "space": [{"name": "a", "patterns": ["layer1.*"], "high": 0.9},
                                   {"name": "b", "patterns": ["layer3.*"], "high": 0.9}]})
    open_study(sweep)
    store = ResultsStore(db)
    for tid, status, a, b, lat, t0, t1, macs, epochs in FIXTURE:
        spec = sweep.trial_spec().model_dump(mode="json")
        spec["pruning"]["groups"] = [{"name": "a", "patterns": ["layer1.*"], "sparsity": a},
                                     {"name": "b", "patterns": ["layer3.*"], "sparsity": b}]
        store.upsert_trial(tid, study="f", status=status, latency_median_ms=lat, top1_masked=t0, top1_final=t1,
                           macs_after=macs, epochs_run=len(epochs), spec_json=spec,
                           reason="median rule" if status == "abandoned" else None,
                           sparsities_json={"a": {"target": a, "achieved": a}, "b": {"target": b, "achieved": b}})
        store.replace_epochs(tid, [{"epoch": i + 1, "val_top1": v, "seconds": 2.0} for i, v in enumerate(epochs)])
    store.close()
    return db


def test_report_matches_independent_values(fixture_db, tmp_path):
    out = tmp_path / "report"
    summary = write_report(fixture_db, "f", out)
    measured = [f for f in FIXTURE if f[1] == "succeeded"]
    for group, col in (("a", 2), ("b", 3)):
        s = [f[col] for f in measured]
        expect = {"latency": stats.pearsonr(s, [f[4] for f in measured])[0],
                  "top1_before": stats.pearsonr(s, [f[5] for f in measured])[0],
                  "top1_after": stats.pearsonr(s, [f[6] for f in measured])[0]}
        got = next(c for c in summary["correlations"] if c["group"] == group)
        for k, v in expect.items():
            assert got[k] == pytest.approx(v, abs=1e-9), (group, k)
    # best: the highest Top-1 among trials at most 0.72 x the dense latency (1.00 ms) — never an infeasible one
    feasible = [f for f in measured if f[4] <= 0.72 * 1.00]
    best = max(feasible, key=lambda f: f[6])
    assert best[0] == "f-0002"
    assert [b["trial_id"] for b in summary["best"]] == [best[0]]
    assert summary["by_status"] == {"succeeded": 6, "failed": 1, "abandoned": 1, "running": 0, "skipped": 0}
    assert summary["compute_saved"]["epochs_saved"] == 1 and summary["compute_saved"]["seconds_saved"] == 2.0
    # files: self-contained HTML with the linked Pareto plot, PNGs, CSV, the best spec ready to re-run
    page = (out / "report.html").read_text()
    assert "<svg" in page and 'href="#trial-f-0002"' in page.replace("xlink:href", "href")
    assert "id='trial-f-0002' class=best" in page
    assert page.count("data:image/png;base64,") >= 4
    for png in ("pareto", "latency_by_sparsity", "best_so_far", "macs_vs_latency", "recovery"):
        assert (out / f"{png}.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert [r["trial_id"] for r in rows] == [f[0] for f in FIXTURE]
    assert float(rows[2]["sparsity_a"]) == 0.4
    spec = yaml.safe_load((out / "best_spec.yaml").read_text())
    assert {g["name"]: g["sparsity"] for g in spec["pruning"]["groups"]} == {"a": 0.4, "b": 0.5}
    assert "trial_id" not in spec
    assert json.loads((out / "summary.json").read_text())["best"][0]["trial_id"] == "f-0002"


def test_report_binned_means_and_hypervolume(fixture_db):
    from pruneflow import analysis

    rows = analysis.study_rows(fixture_db, "f")
    bins = dict((round(x, 2), (m, n)) for x, m, n in analysis.binned_latency(rows, "b"))
    assert bins[0.51] == (0.70, 1) and bins[0.01] == (1.0, 1)
    front = analysis.pareto_front(rows)
    assert [r["trial_id"] for r in front] == ["f-0004", "f-0007", "f-0002", "f-0001", "f-0000"]
    ref = (1.1, 0.0)
    lat = [0.40, 0.50, 0.70, 0.90, 1.00, 1.1]
    top = [60.0, 79.0, 84.0, 88.0, 90.0]
    assert analysis.hypervolume(rows, ref) == pytest.approx(sum((lat[i + 1] - lat[i]) * top[i] for i in range(5)))
    assert np.isfinite(analysis.hypervolume(rows, analysis.reference(rows)))


def test_unknown_study_is_a_clear_error(fixture_db, tmp_path):
    with pytest.raises(ValueError, match="study 'nope' not found.*studies: f"):
        write_report(fixture_db, "nope", tmp_path)
