"""A real S3 API on 127.0.0.1 for the object-storage tests: moto's server, in this process.

``s3_server`` starts it once per session (on a free port, stopped at the end); ``s3`` gives
each test a bucket of its own, and the environment a client finds its credentials in, so
that ``s3://`` URIs work as they do against AWS. Nothing leaves 127.0.0.1: the credentials
are given, the region too, and the instance metadata service is never asked.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import pyarrow.fs as pafs
import pytest

REGION = "us-east-1"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass(frozen=True)
class Bucket:
    """A bucket on the local server: its name, a filesystem and URIs that reach it."""

    name: str
    endpoint: str  # host:port

    @cached_property
    def filesystem(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(
            access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region=REGION,
            endpoint_override=self.endpoint,
            scheme="http",
            allow_bucket_creation=True,
        )

    def path(self, key: str) -> str:
        """``key``'s path in :attr:`filesystem` (``bucket/key``)."""
        return f"{self.name}/{key}"

    def uri(self, key: str) -> str:
        """``s3://bucket/key``, with the options that point pyarrow at the local server."""
        return (
            f"s3://{self.name}/{key}?endpoint_override={self.endpoint}&scheme=http&region={REGION}"
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every object's key under ``prefix``, sorted (directory markers left out)."""
        selector = pafs.FileSelector(self.path(prefix), recursive=True, allow_not_found=True)
        infos = self.filesystem.get_file_info(selector)
        return sorted(info.path.removeprefix(f"{self.name}/") for info in infos if info.is_file)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint (``127.0.0.1:port``) of a moto S3 server, up for the whole session."""
    import moto.server as moto_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """A new, empty bucket; the environment holds the server's credentials."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    bucket = Bucket(f"arrowflow-{uuid.uuid4().hex[:12]}", s3_server)
    bucket.filesystem.create_dir(bucket.name)
    return bucket
