"""A local S3 endpoint for the object-storage tests: moto's server on 127.0.0.1.

`s3_server` starts it once per session; `s3` gives each test a fresh bucket on it, with the
AWS_* variables (credentials, region, `AWS_ENDPOINT_URL`) pointing there, so bricks and any
`bricks-dj` subprocess the test starts reach it the way they reach a real S3-compatible
store. Importing this module's fixtures into conftest registers them.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest

_buckets = itertools.count()


@dataclass
class S3:
    """One test's bucket on the local S3 endpoint."""

    endpoint: str
    bucket: str

    @cached_property
    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, use_listings_cache=False, skip_instance_cache=True)

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    def upload(self, local: Path, key: str) -> str:
        """A local file or folder (its files, recursively) put under `key`; its URI."""
        local = Path(local)
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for path in files:
            name = key if local.is_file() else f"{key.rstrip('/')}/{path.relative_to(local).as_posix()}"
            self.fs.pipe_file(f"{self.bucket}/{name}", path.read_bytes())
        return self.uri(key)

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under `prefix`, relative to it, sorted."""
        root = f"{self.bucket}/{prefix}".rstrip("/")
        return sorted(p[len(root) + 1:] for p in self.fs.find(root))

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(f"{self.bucket}/{key}")


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of a moto S3 server on a free port of 127.0.0.1 (skips without moto)."""
    server_module = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path) -> S3:
    """A new, empty bucket on the local endpoint, and the environment that reaches it."""
    import s3fs

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # Nothing from this machine's own AWS setup.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    s3fs.S3FileSystem.clear_instance_cache()
    store = S3(s3_server, f"bricks-test-{next(_buckets)}")
    store.fs.mkdir(store.bucket)
    yield store
    s3fs.S3FileSystem.clear_instance_cache()
