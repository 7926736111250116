"""The results DB: upserts never duplicate nor fail, on SQLite and on a real PostgreSQL server."""

import threading
import time

import pytest
from pg_server import pg_database, pg_server, postgres_url  # noqa: F401

from pruneflow.store import ResultsStore


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """An empty results DB: a SQLite file, or a fresh database on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'r.db'}"
    return request.getfixturevalue("pg_database")()


@pytest.fixture
def store(db_url):
    s = ResultsStore(db_url)
    yield s
    s.close()


LATENCY = {"settings": {"backend": "openvino", "device": "CPU", "precision": "f32", "threads": 1},
           "latency_ms": {"median": 1.0, "p90": 1.2, "p99": 1.5, "mean": 1.05, "min": 0.9, "max": 2.0},
           "round_median_cv": 0.01, "throughput_fps": 950.0}


def _measured(median: float, **settings) -> dict:
    """A result shaped like pruneflow.bench.measure's: the full BenchmarkOptions under "settings"."""
    st = {"backend": "openvino", "device": "CPU", "precision": "f32", "threads": 1, "hint": "latency",
          "warmup": 20, "rounds": 5, "iterations": 100, "seed": 0, **settings}
    return {**LATENCY, "backend": st["backend"], "device": st["device"], "settings": st,
            "latency_ms": {**LATENCY["latency_ms"], "median": median}}


def test_recording_twice_updates_never_duplicates(store):
    store.upsert_trial("t1", name="t", status="running", spec_json={"a": 1})
    store.upsert_trial("t1", status="succeeded", top1_final=90.5, macs_after=3_000_000_000)
    store.replace_epochs("t1", [{"epoch": 1, "val_top1": 50.0}, {"epoch": 2, "val_top1": 60.0}])
    store.replace_epochs("t1", [{"epoch": 1, "val_top1": 55.0}])
    store.upsert_benchmark("t1", LATENCY)
    store.upsert_benchmark("t1", {**LATENCY, "latency_ms": {**LATENCY["latency_ms"], "median": 0.8}})
    rows = store.list_trials()
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "succeeded" and row["top1_final"] == 90.5 and row["spec_json"] == {"a": 1}
    assert row["macs_after"] == 3_000_000_000  # beyond 32-bit integers
    assert [e["val_top1"] for e in store.epochs("t1")] == [55.0]
    bench = store.benchmarks("t1")
    assert len(bench) == 1 and bench[0]["median_ms"] == 0.8


def test_status_and_filters(store):
    store.upsert_trial("a", study="s1", status="succeeded")
    store.upsert_trial("b", study="s1", status="failed", reason="export: parity")
    store.upsert_trial("c", study="s2", status="abandoned", reason="chance")
    assert {r["trial_id"] for r in store.list_trials(study="s1")} == {"a", "b"}
    assert [r["reason"] for r in store.list_trials(status="failed")] == ["export: parity"]
    with pytest.raises(ValueError, match="status"):
        store.upsert_trial("d", status="done")
    with pytest.raises(ValueError, match="unknown trial fields"):
        store.upsert_trial("d", colour="red")
    assert store.get_trial("zzz") is None


def test_benchmarks_keyed_by_threads_and_hint(store):
    store.upsert_trial("t1")
    store.upsert_benchmark("t1", _measured(2.0, threads=1))
    store.upsert_benchmark("t1", _measured(0.7, threads=4))  # used to overwrite the 1-thread row
    store.upsert_benchmark("t1", _measured(0.9, threads=4, hint="throughput"))
    store.upsert_benchmark("t1", _measured(1.9, threads=1))  # the same key again: an update
    store.upsert_benchmark("t1", LATENCY)  # no hint in its settings: the benchmark default, latency
    got = {(b["threads"], b["hint"]): b["median_ms"] for b in store.benchmarks("t1")}
    assert got == {(1, "latency"): 1.0, (4, "latency"): 0.7, (4, "throughput"): 0.9}
    row = next(b for b in store.benchmarks("t1") if b["threads"] == 4 and b["hint"] == "throughput")
    assert row["result_json"]["settings"]["hint"] == "throughput"


def test_update_keeps_created_at_and_other_fields(store):
    store.upsert_trial("t1", name="first", host="h1")
    before = store.get_trial("t1")
    assert before["status"] == "running" and before["name"] == "first"  # defaults of a new row
    time.sleep(0.02)
    store.upsert_trial("t1", status="succeeded", top1_final=1.0)
    after = store.get_trial("t1")
    assert after["created_at"] == before["created_at"]
    assert after["updated_at"] > before["updated_at"]
    assert (after["name"], after["host"], after["status"], after["top1_final"]) == ("first", "h1", "succeeded", 1.0)


def _at_once(n: int, fn) -> list[BaseException]:
    """Run fn(i) in n threads released together; the errors they raised."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(i):
        barrier.wait()
        try:
            fn(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_first_writes_upsert(db_url):
    """Writers of one new trial at once (a retried task racing its first try): no error, one row each."""
    n, rounds = 6, 8
    stores = [ResultsStore(db_url) for _ in range(n)]  # one engine (own connections) per writer
    try:
        for r in range(rounds):
            tid = f"race-{r}"
            errors = _at_once(n, lambda i, tid=tid: stores[i].upsert_trial(
                tid, status="running", host=f"h{i}", top1_final=float(i)))
            errors += _at_once(n, lambda i, tid=tid: stores[i].upsert_benchmark(tid, _measured(float(i))))
            errors += _at_once(n, lambda i, tid=tid: stores[i].replace_epochs(
                tid, [{"epoch": e, "val_top1": float(i)} for e in range(1, 2 + i % 3)]))
            assert not errors, errors
            trials = [t for t in stores[0].list_trials() if t["trial_id"] == tid]
            assert len(trials) == 1
            t = trials[0]
            assert t["host"] == f"h{int(t['top1_final'])}"  # one writer's values, whole
            assert len(stores[0].benchmarks(tid)) == 1
            epochs = stores[0].epochs(tid)
            writer = int(epochs[0]["val_top1"])  # exactly one writer's epochs: the last replacement
            assert [(e["epoch"], e["val_top1"]) for e in epochs] == [(e, float(writer)) for e in range(1, 2 + writer % 3)]
        # and the last write wins
        stores[1].upsert_trial("race-0", host="last", top1_final=-1.0)
        stores[2].upsert_benchmark("race-0", _measured(-1.0))
        assert stores[0].get_trial("race-0")["host"] == "last"
        assert [b["median_ms"] for b in stores[0].benchmarks("race-0")] == [-1.0]
        assert len(stores[0].list_trials()) == rounds
    finally:
        for s in stores:
            s.close()


def test_other_dialects_look_then_write(tmp_path, monkeypatch):
    """The portable path (no ON CONFLICT clause): the same upsert semantics."""
    import pruneflow.store as store_mod

    monkeypatch.setattr(store_mod, "_ON_CONFLICT_DIALECTS", ())
    s = ResultsStore(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        s.upsert_trial("t1", name="a")
        s.upsert_trial("t1", status="succeeded")
        s.upsert_benchmark("t1", _measured(1.0))
        s.upsert_benchmark("t1", _measured(2.0))
        s.upsert_benchmark("t1", _measured(3.0, threads=2))
        s.replace_epochs("t1", [{"epoch": 1}, {"epoch": 1, "val_top1": 5.0}])
        t = s.get_trial("t1")
        assert (t["name"], t["status"]) == ("a", "succeeded")
        assert sorted((b["threads"], b["median_ms"]) for b in s.benchmarks("t1")) == [(1, 2.0), (2, 3.0)]
        assert [e["val_top1"] for e in s.epochs("t1")] == [5.0]
    finally:
        s.close()
