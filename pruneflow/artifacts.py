"""Trial artifacts in an object store (any fsspec URL: ``s3://bucket/prefix``, ``file:///...``).

A stage works in a local folder and hands its files to the store; a stage on another host takes only the
files it needs. Every upload records the file's SHA-256 and size in the trial's ``manifest.json``; a
download goes into a content-addressed cache (``<cache>/sha256/ab/abcd...``), is verified against the
manifest and is reused by every later trial that needs the same bytes.

Credentials never travel with a trial: fsspec and s3fs read them from the environment of the process
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for an S3-compatible server), so
no DAG conf, XCom value or results-DB row holds one; URLs carry none (refused below).

Transient failures (a refused connection, a timeout, a server error) are retried with exponential
backoff; after the last attempt :class:`ArtifactError` names the URL, and nothing is half-written: a
file is uploaded before the manifest names it, and a download is renamed into the cache only once
verified. This module imports neither torch nor Airflow (the benchmark worker uses it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["MANIFEST", "ArtifactError", "ArtifactStore", "is_url", "sha256_file"]

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class ArtifactError(RuntimeError):
    """An artifact could not be stored or fetched; the message names the URL and the cause."""


def is_url(root: str | os.PathLike) -> bool:
    """True for a URL artifact root (``s3://...``); a plain path (or ``file://``) is a local folder."""
    scheme = urlsplit(str(root)).scheme
    return len(scheme) > 1 and scheme != "file"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _transient(exc: BaseException) -> bool:
    """Worth another attempt: the network or the server, not a missing object or a refused credential."""
    if isinstance(exc, FileNotFoundError | PermissionError | ArtifactError):
        return False
    return isinstance(exc, OSError | TimeoutError | ConnectionError) or type(exc).__name__ in (
        "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError",
        "ServerDisconnectedError", "ClientOSError")


class ArtifactStore:
    """The artifact root ``url``; ``attempts`` tries per operation with ``backoff`` s doubling between them."""

    def __init__(self, url: str, attempts: int = 4, backoff: float = 0.5,
                 storage_options: dict[str, Any] | None = None, sleep: Callable[[float], None] = time.sleep):
        import fsspec

        parts = urlsplit(url)
        if parts.username or parts.password:
            raise ArtifactError(f"artifact root {parts.scheme}://{parts.hostname}{parts.path}: credentials "
                                "do not belong in the URL; set them in the environment (AWS_ACCESS_KEY_ID, ...)")
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.url = url.rstrip("/")
        self.attempts, self.backoff, self._sleep = attempts, backoff, sleep
        # A fresh filesystem object: fsspec's instance cache would keep the endpoint and credentials of
        # the first one this process made, whatever the environment says now.
        self.fs, self.root = fsspec.url_to_fs(self.url, **{"skip_instance_cache": True, **(storage_options or {})})

    # ------------------------------------------------------------------ paths
    def trial_url(self, trial_id: str) -> str:
        return f"{self.url}/{trial_id}"

    def _key(self, trial_id: str, name: str) -> str:
        if not name or name.startswith("/") or ".." in Path(name).parts:
            raise ArtifactError(f"artifact name {name!r}: a relative path inside the trial folder is required")
        return f"{self.root.rstrip('/')}/{trial_id}/{name}"

    def _retry(self, what: str, url: str, fn: Callable[[], Any]) -> Any:
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as exc:
                if not _transient(exc):
                    if isinstance(exc, ArtifactError):
                        raise
                    raise ArtifactError(f"{what} {url}: {type(exc).__name__}: {exc}") from exc
                if attempt == self.attempts:
                    raise ArtifactError(f"{what} {url} failed after {attempt} attempts: "
                                        f"{type(exc).__name__}: {exc}") from exc
                self._sleep(delay)
                delay *= 2
                self.fs.invalidate_cache()
        raise AssertionError("unreachable")

    # --------------------------------------------------------------- manifest
    def manifest(self, trial_id: str) -> dict[str, dict]:
        """``{name: {"sha256": ..., "size": ...}}`` of what the trial has stored ({} before its first upload)."""
        key = self._key(trial_id, MANIFEST)
        url = f"{self.trial_url(trial_id)}/{MANIFEST}"

        def read() -> dict:
            try:
                with self.fs.open(key, "rb") as fh:
                    return json.loads(fh.read())
            except FileNotFoundError:
                return {}
        return self._retry("reading", url, read)

    # ----------------------------------------------------------------- upload
    def upload(self, trial_id: str, local_dir: Path, names: Iterable[str] | None = None,
               forget: Iterable[str] = ()) -> dict[str, dict]:
        """Store the files ``names`` of ``local_dir`` (default: every file in it, recursively) under the
        trial; files whose checksum the manifest already has are not sent again; ``forget``: names the
        manifest drops (an earlier attempt's files). Returns the manifest."""
        local_dir = Path(local_dir)
        if names is None:
            names = sorted(str(p.relative_to(local_dir)) for p in local_dir.rglob("*")
                           if p.is_file() and p.name != MANIFEST)
        manifest = self.manifest(trial_id)
        changed = False
        for name in forget:
            changed |= manifest.pop(name, None) is not None
        for name in names:
            key = self._key(trial_id, name)
            path = local_dir / name
            digest, size = sha256_file(path), path.stat().st_size
            if manifest.get(name) == {"sha256": digest, "size": size}:
                continue
            self._retry("uploading to", f"{self.trial_url(trial_id)}/{name}", lambda p=path, k=key: self.fs.put_file(str(p), k))
            manifest[name] = {"sha256": digest, "size": size}
            changed = True
        if changed:  # the manifest last: it never names a file that is not stored
            body = json.dumps(manifest, indent=1, sort_keys=True).encode()
            key = self._key(trial_id, MANIFEST)
            self._retry("uploading to", f"{self.trial_url(trial_id)}/{MANIFEST}", lambda: self.fs.pipe_file(key, body))
        return manifest

    # ---------------------------------------------------------------- download
    def fetch(self, trial_id: str, names: Iterable[str], cache_dir: Path, into: Path | None = None,
              manifest: dict[str, dict] | None = None) -> dict[str, Path]:
        """The files ``names`` of the trial, verified, from the content-addressed cache under ``cache_dir``
        (downloaded once). With ``into``, each is also copied there under its own name (skipped when the
        file there already has the stored checksum). ``manifest``: the trial's, if the caller has just read it."""
        manifest = self.manifest(trial_id) if manifest is None else manifest
        out: dict[str, Path] = {}
        for name in names:
            entry = manifest.get(name)
            if entry is None:
                raise ArtifactError(f"{self.trial_url(trial_id)}/{name}: not in the trial's manifest "
                                    f"(stored: {', '.join(sorted(manifest)) or 'nothing'})")
            if into is None:
                out[name] = self._cached(trial_id, name, entry, Path(cache_dir))
                continue
            target = Path(into) / name
            if target.is_file() and target.stat().st_size == entry["size"] and sha256_file(target) == entry["sha256"]:
                out[name] = target  # this host wrote it (or fetched it) already
                continue
            cached = self._cached(trial_id, name, entry, Path(cache_dir))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            tmp.unlink(missing_ok=True)
            shutil.copyfile(cached, tmp)  # a copy, not a link: a stage rewriting its file never touches the cache
            os.replace(tmp, target)
            out[name] = target
        return out

    def _cached(self, trial_id: str, name: str, entry: dict, cache_dir: Path) -> Path:
        digest = entry["sha256"]
        path = cache_dir / "sha256" / digest[:2] / digest
        if path.is_file() and path.stat().st_size == entry["size"]:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"{self.trial_url(trial_id)}/{name}"
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            self._retry("downloading", url, lambda: self.fs.get_file(self._key(trial_id, name), str(tmp)))
            got = sha256_file(tmp)
            if got != digest:
                raise ArtifactError(f"{url}: checksum mismatch (manifest sha256 {digest}, downloaded {got})")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path
