"""pruneflow.artifacts against a real S3-compatible server (SeaweedFS on loopback, tests/s3_server.py):
uploads with checksums, downloads of only the named files into a verified content-addressed cache,
credentials from the environment only, anonymous access refused, an unreachable store retried with
backoff and then failed with the URL named."""

from __future__ import annotations

import os
import time

import pytest
from airflow_servers import free_port
from s3_server import s3_store  # noqa: F401

from pruneflow.artifacts import MANIFEST, ArtifactError, ArtifactStore, is_url, sha256_file


@pytest.fixture
def trial_files(tmp_path):
    d = tmp_path / "trial"
    (d / "sub").mkdir(parents=True)
    (d / "model.xml").write_text("<net/>" * 100)
    (d / "model.bin").write_bytes(os.urandom(300_000))
    (d / "reference.npz").write_bytes(os.urandom(5_000))
    (d / "sub" / "plan.json").write_text('{"groups": []}')
    return d


def _store(s3, prefix: str, **opts) -> ArtifactStore:
    return ArtifactStore(f"s3://{s3.bucket}/{prefix}", storage_options=s3.options(**opts), backoff=0.05)


def test_is_url():
    assert is_url("s3://bucket/prefix") and is_url("gcs://b/p")
    assert not is_url("/srv/trials") and not is_url("out/trials") and not is_url("file:///srv/trials")


def test_upload_then_fetch_only_what_is_needed_verified_and_cached(s3_store, trial_files, tmp_path):  # noqa: F811
    store = _store(s3_store, f"rt-{time.time_ns()}")
    manifest = store.upload("t1", trial_files)
    assert set(manifest) == {"model.xml", "model.bin", "reference.npz", "sub/plan.json"}
    assert manifest["model.bin"] == {"sha256": sha256_file(trial_files / "model.bin"), "size": 300_000}
    assert store.manifest("t1") == manifest
    assert store.fs.exists(f"{store.root}/t1/{MANIFEST}")

    cache, work = tmp_path / "cache", tmp_path / "work"
    got = store.fetch("t1", ["model.xml", "model.bin"], cache, into=work)
    assert sorted(p.name for p in work.iterdir()) == ["model.bin", "model.xml"]  # nothing else came
    assert got["model.bin"].read_bytes() == (trial_files / "model.bin").read_bytes()
    cached = sorted(p.name for p in (cache / "sha256").rglob("*") if p.is_file())
    assert cached == sorted([manifest["model.xml"]["sha256"], manifest["model.bin"]["sha256"]])

    # A second fetch (another trial, same bytes) comes from the cache: the store is not read again.
    store.fs.rm(f"{store.root}/t1/model.bin")
    again = store.fetch("t1", ["model.bin"], cache)
    assert again["model.bin"].read_bytes() == (trial_files / "model.bin").read_bytes()


def test_unchanged_files_are_not_sent_again_and_changed_ones_are(s3_store, trial_files):  # noqa: F811
    store = _store(s3_store, f"re-{time.time_ns()}")
    store.upload("t2", trial_files)
    key = f"{store.root}/t2/model.xml"
    before = store.fs.info(key)["ETag"]
    store.fs.rm(f"{store.root}/t2/reference.npz")  # a file the manifest has: an unchanged re-upload skips it
    store.upload("t2", trial_files)
    assert not store.fs.exists(f"{store.root}/t2/reference.npz")
    (trial_files / "model.xml").write_text("<net changed/>")
    manifest = store.upload("t2", trial_files, names=["model.xml"])
    assert manifest["model.xml"]["sha256"] == sha256_file(trial_files / "model.xml")
    store.fs.invalidate_cache()
    assert store.fs.info(key)["ETag"] != before


def test_a_corrupted_object_is_refused_and_never_cached(s3_store, trial_files, tmp_path):  # noqa: F811
    store = _store(s3_store, f"bad-{time.time_ns()}")
    store.upload("t3", trial_files)
    store.fs.pipe_file(f"{store.root}/t3/reference.npz", b"not what was uploaded")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        store.fetch("t3", ["reference.npz"], tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    with pytest.raises(ArtifactError, match="not in the trial's manifest"):
        store.fetch("t3", ["model.onnx"], tmp_path / "cache")


def test_credentials_come_from_the_environment_never_the_url(s3_store, trial_files, monkeypatch):  # noqa: F811
    for key, value in s3_store.env().items():
        monkeypatch.setenv(key, value)
    store = ArtifactStore(f"s3://{s3_store.bucket}/env-{time.time_ns()}", storage_options={"skip_instance_cache": True})
    assert "model.xml" in store.upload("t4", trial_files, names=["model.xml"])
    with pytest.raises(ArtifactError, match="credentials do not belong in the URL"):
        ArtifactStore(f"s3://{s3_store.access_key}:{s3_store.secret_key}@{s3_store.bucket}/x")
    with pytest.raises(ArtifactError, match="relative path inside the trial folder"):
        store.upload("t4", trial_files, names=["../escape"])


def test_anonymous_access_is_refused_without_retries(s3_store, trial_files):  # noqa: F811
    store = _store(s3_store, f"anon-{time.time_ns()}")
    store.upload("t5", trial_files)
    sleeps: list[float] = []
    anon = ArtifactStore(store.url, storage_options={"anon": True, "skip_instance_cache": True,
                                                     "client_kwargs": {"endpoint_url": s3_store.endpoint,
                                                                       "region_name": "us-east-1"}},
                         sleep=sleeps.append)
    with pytest.raises(ArtifactError, match=store.url):
        anon.manifest("t5")
    with pytest.raises(ArtifactError):
        anon.upload("t6", trial_files, names=["model.xml"])
    assert sleeps == []  # a refusal is not a transient failure


def test_an_unreachable_store_is_retried_with_backoff_then_named(trial_files):
    closed = free_port()  # nothing listens there
    sleeps: list[float] = []
    store = ArtifactStore("s3://bucket/p", attempts=3, backoff=0.25, sleep=sleeps.append, storage_options={
        "key": "k", "secret": "s", "skip_instance_cache": True,
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{closed}", "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}})
    t0 = time.monotonic()
    with pytest.raises(ArtifactError, match=r"s3://bucket/p/t7/manifest.json failed after 3 attempts"):
        store.upload("t7", trial_files)
    assert sleeps == [0.25, 0.5]
    assert time.monotonic() - t0 < 120
