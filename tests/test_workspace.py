"""A trial whose artifact root is an object store (PRUNEFLOW_ARTIFACTS=s3://..., a real SeaweedFS on
loopback): its stages run as on three hosts that share no disk — training, benchmark, record — each
with its own scratch folder and cache, exchanging files only through the store; the benchmark host
downloads only the model, the reference batch and epochs.json. An unreachable store fails the trial
with the URL named; a store that becomes unreachable in the middle of a stage's upload (the connection cut
by a TCP relay in front of the real server) fails it too, and the manifest names only what was stored."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
from airflow_servers import free_port
from s3_server import s3_store  # noqa: F401

from pruneflow import settings, stages
from pruneflow.artifacts import ArtifactStore, sha256_file
from pruneflow.spec import parse_spec
from pruneflow.store import ResultsStore
from pruneflow.workspace import stage_workspace


@pytest.fixture
def store_env(s3_store, monkeypatch):  # noqa: F811
    for key, value in s3_store.env().items():
        monkeypatch.setenv(key, value)
    url = f"s3://{s3_store.bucket}/ws-{time.time_ns()}"
    monkeypatch.setenv("PRUNEFLOW_ARTIFACTS", url)
    return url


def _on_host(monkeypatch, tmp_path, host: str, spec_dict: dict):
    """This process as another host: its own scratch folder and download cache."""
    monkeypatch.setenv("PRUNEFLOW_SCRATCH", str(tmp_path / host / "scratch"))
    monkeypatch.setenv("PRUNEFLOW_ARTIFACT_CACHE", str(tmp_path / host / "cache"))
    return parse_spec({**spec_dict, "trial_id": "ws-trial", "artifacts": settings.artifacts_root()})


def _files(folder) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_stages_on_three_hosts_share_only_the_store(store_env, spec_dict, tmp_path, monkeypatch, s3_store):  # noqa: F811
    log: list[str] = []
    train = _on_host(monkeypatch, tmp_path, "train", spec_dict)
    for stage in ("prepare", "prune", "thinnify", "retrain", "export"):
        with stage_workspace(train, (stage,), log.append):
            getattr(stages, stage)(train, log.append)

    bench = _on_host(monkeypatch, tmp_path, "bench", spec_dict)
    assert not bench.trial_dir().exists()
    with stage_workspace(bench, ("benchmark",), log.append):
        assert _files(bench.trial_dir()) == {"epochs.json", "reference.npz", "model.xml", "model.bin"}
        stages.benchmark(bench, log.append)
    assert _files(bench.trial_dir()) == {"epochs.json", "reference.npz", "model.xml", "model.bin", "latency.json"}

    rec = _on_host(monkeypatch, tmp_path, "record", spec_dict)
    with stage_workspace(rec, ("record",), log.append):
        stages.record(rec, log.append)
    assert all(n.endswith(".json") for n in _files(rec.trial_dir()))  # no model came to the record host

    row = ResultsStore(spec_dict["db"]).get_trial("ws-trial")
    assert row["status"] == "succeeded" and row["latency_median_ms"] > 0
    assert row["artifact_dir"] == f"{store_env}/ws-trial"
    store = ArtifactStore(store_env)
    manifest = store.manifest("ws-trial")
    assert {"plan.json", "thinned.pt", "model.xml", "model.bin", "reference.npz", "latency.json"} <= set(manifest)
    latency = json.loads(store.fs.cat_file(f"{store.root}/ws-trial/latency.json"))
    assert latency == json.loads((bench.trial_dir() / "latency.json").read_text())
    assert any(m.startswith("artifacts: 4 file(s)") and "from s3://" in m for m in log), log

    # a re-run of export on the training host: the manifest forgets what a later stage wrote before
    with stage_workspace(train, ("export",), log.append):
        stages.export(train, log.append)
    assert "latency.json" not in store.manifest("ws-trial")


def test_an_unreachable_store_fails_the_trial_naming_the_url(store_env, spec_dict, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    spec = _on_host(monkeypatch, tmp_path, "train", spec_dict)
    with pytest.raises(stages.TrialFailed) as info:
        stages.run_trial(spec)
    assert info.value.stage == "prepare"
    row = ResultsStore(spec_dict["db"]).get_trial("ws-trial")
    assert row["status"] == "failed"
    assert f"{store_env}/ws-trial/manifest.json failed after 4 attempts" in row["reason"], row["reason"]


class CuttingRelay:
    """A TCP relay on loopback in front of the object store that, once a request line with ``PUT`` and
    ``marker`` passes, drops every connection and stops listening: the store becomes unreachable in the
    middle of an upload."""

    def __init__(self, target: tuple[str, int], marker: bytes):
        self.target, self.marker = target, marker
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while data := src.recv(65536):
                if requests and b"PUT " in data and self.marker in data:
                    self.close()
                    return
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.cut.set()
        self.listener.close()
        for sock in self.conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_a_store_lost_in_the_middle_of_an_upload_fails_the_trial_and_stores_no_half(
        store_env, spec_dict, tmp_path, monkeypatch, s3_store):  # noqa: F811
    endpoint = urlsplit(s3_store.endpoint)
    relay = CuttingRelay((endpoint.hostname, endpoint.port), b"/ws-trial/model.bin")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{relay.port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    spec = _on_host(monkeypatch, tmp_path, "train", spec_dict)
    try:
        with pytest.raises(stages.TrialFailed) as info:
            stages.run_trial(spec)
    finally:
        relay.close()
    assert relay.cut.is_set() and info.value.stage == "export"
    row = ResultsStore(spec_dict["db"]).get_trial("ws-trial")
    assert row["status"] == "failed"
    assert f"{store_env}/ws-trial/model.bin failed after 4 attempts" in row["reason"], row["reason"]

    # the manifest names the earlier stages' files, each stored whole, and nothing of the failed upload
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_store.endpoint)
    store = ArtifactStore(store_env)
    manifest = store.manifest("ws-trial")
    assert {"plan.json", "thinned.pt"} <= set(manifest) and "model.bin" not in manifest
    assert not {"model.xml", "model.onnx", "reference.npz", "parity.json"} & set(manifest)
    fetched = store.fetch("ws-trial", sorted(manifest), tmp_path / "check-cache")
    assert {n: sha256_file(p) for n, p in fetched.items()} == {n: e["sha256"] for n, e in manifest.items()}

    # with the store back, export runs again and stores everything
    with stage_workspace(spec, ("export",)):
        stages.export(spec)
    assert {"model.bin", "model.xml", "reference.npz"} <= set(store.manifest("ws-trial"))
