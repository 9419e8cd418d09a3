"""Real servers for the store's second back end: PostgreSQL (``initdb`` + ``pg_ctl`` in a temporary directory,
loopback, a free port) and an S3-compatible object store (moto's server mode, which stands in for S3).

A test module uses them with ``pytest_plugins = ["tests.store_servers"]``. Both are session-scoped: one
PostgreSQL cluster (a fresh database per test) and one moto server (a fresh bucket per test). Without the
binaries or packages the tests that need them are skipped with the reason; under ``CI=true`` they fail
instead (``scripts/setup`` installs Debian's ``postgresql``, the dev extra moto).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(why: str) -> None:
    """Skip, or under CI fail: CI installs everything, so a missing server there is a broken setup."""
    if IN_CI:
        pytest.fail(f"{why} (CI=true: scripts/setup installs it)")
    pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_pg_bin() -> Path | None:
    """The directory holding initdb and pg_ctl: PATH first, then Debian's /usr/lib/postgresql/<major>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if os.access(Path(d) / "initdb", os.X_OK) and os.access(Path(d) / "pg_ctl", os.X_OK):
            return Path(d)
    return None


@dataclass
class PostgresServer:
    port: int
    data_dir: Path
    pg_bin: Path
    as_user: list[str]
    options: str = ""  # the server's command-line settings (port, socket directory, ...)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A fresh, empty database -> its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def start(self, check: bool = True) -> subprocess.CompletedProcess:
        return self.pg_ctl("-w", "-t", "60", "-l", str(self.data_dir.parent / "log"), "-o", self.options, "start",
                           check=check)

    def stop(self) -> subprocess.CompletedProcess:
        """Fast shutdown: open connections are cut, as when the database restarts under the cloud."""
        return self.pg_ctl("-w", "-m", "fast", "stop")

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_user, str(self.pg_bin / "pg_ctl"), "-D", str(self.data_dir), *args],
                              capture_output=True, text=True, timeout=120, check=check)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the session, as the ``postgres`` OS user when run as root (postgres refuses
    root), trust auth on 127.0.0.1 only, fsync off (test data)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("psycopg 3 is not installed (pip install 'psycopg[binary]')")
    pg_bin = find_pg_bin()
    if pg_bin is None:
        unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="edgeadapt-pg-"))
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no 'postgres' user to run PostgreSQL as")
        as_user = ["runuser", "-u", "postgres", "--"]
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data = root / "data"
    init = subprocess.run([*as_user, str(pg_bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                           "-E", "UTF8", "--no-sync"], capture_output=True, text=True, timeout=180)
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb failed: {init.stderr[-2000:]}")
    port = _free_port()
    server = PostgresServer(port=port, data_dir=data, pg_bin=pg_bin, as_user=as_user,
                            options=f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
                                    "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
    start = server.start(check=False)
    if start.returncode != 0:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"pg_ctl start failed: {start.stderr[-1000:]} {log[-2000:]}")
    try:
        yield server
    finally:
        server.pg_ctl("-m", "immediate", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class S3Server:
    endpoint_url: str

    def bucket_url(self) -> str:
        """A fresh bucket (created by the store on first use) with a prefix, as ``s3://bucket/prefix``."""
        return f"s3://t-{uuid.uuid4().hex[:12]}/edgeadapt"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 in server mode on 127.0.0.1 (a real HTTP endpoint boto3 talks to, standing in for S3)."""
    try:
        import boto3  # noqa: F401
        from moto.server import ThreadedMotoServer
    except ImportError:
        unavailable("boto3 and moto[server] are not installed (pip install boto3 'moto[server]')")
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    finally:
        server.stop()
