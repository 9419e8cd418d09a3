"""Throwaway servers for the cloud store's shared back end, on loopback: PostgreSQL (``initdb`` + ``pg_ctl`` in a
temporary directory, a free port, as the ``postgres`` OS user when run as root, since PostgreSQL refuses root) and
an S3-compatible object store (moto's server mode, which stands in for S3 here). Used by ``bench load --store
postgres`` and by the tests (tests/store_servers.py wraps them in fixtures)."""

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class ServerUnavailable(RuntimeError):
    """A binary or package the server needs is missing (say what to install)."""


def free_port() -> int:
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


@contextmanager
def postgres_server(max_connections: int = 200) -> Iterator[PostgresServer]:
    """A PostgreSQL cluster for as long as the block runs: trust auth on 127.0.0.1 only, fsync off (throwaway
    data). Raises ServerUnavailable when psycopg or the server binaries are missing, RuntimeError when it does not
    start."""
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise ServerUnavailable("psycopg 3 is not installed (pip install 'psycopg[binary]')") from exc
    pg_bin = find_pg_bin()
    if pg_bin is None:
        raise ServerUnavailable("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="edgeadapt-pg-"))
    try:
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise ServerUnavailable("running as root and there is no 'postgres' user to run PostgreSQL "
                                        "as") from exc
            as_user = ["runuser", "-u", "postgres", "--"]
            os.chown(root, pw.pw_uid, pw.pw_gid)
        data = root / "data"
        init = subprocess.run([*as_user, str(pg_bin / "initdb"), "-D", str(data), "-U", "postgres",
                               "--auth=trust", "-E", "UTF8", "--no-sync"], capture_output=True, text=True,
                              timeout=180)
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr[-2000:]}")
        port = free_port()
        server = PostgresServer(port=port, data_dir=data, pg_bin=pg_bin, as_user=as_user,
                                options=f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
                                        "-c synchronous_commit=off -c full_page_writes=off "
                                        f"-c max_connections={int(max_connections)}")
        start = server.start(check=False)
        if start.returncode != 0:
            log = (root / "log").read_text() if (root / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {start.stderr[-1000:]} {log[-2000:]}")
        try:
            yield server
        finally:
            server.pg_ctl("-m", "immediate", "stop", check=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class S3Server:
    endpoint_url: str
    port: int = 0
    _server: object = None

    def bucket_url(self) -> str:
        """A fresh bucket (created by the store on first use) with a prefix, as ``s3://bucket/prefix``."""
        return f"s3://t-{uuid.uuid4().hex[:12]}/edgeadapt"

    def stop(self) -> None:
        """Take the endpoint down (an object store outage); moto keeps its objects in this process meanwhile."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def start(self) -> None:
        """Serve again on the same port, with the objects it had."""
        from moto.server import ThreadedMotoServer

        if self._server is None:
            import logging

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per object otherwise
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()


#: moto accepts any credentials; boto3 needs some (the cloud processes inherit them)
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """moto's S3 in server mode on 127.0.0.1 (a real HTTP endpoint boto3 talks to, standing in for S3). Sets
    test credentials in this process's environment when none are set."""
    try:
        import boto3  # noqa: F401
        from moto.server import ThreadedMotoServer  # noqa: F401
    except ImportError as exc:
        raise ServerUnavailable("boto3 and moto[server] are not installed (pip install boto3 'moto[server]')") \
            from exc
    for k, v in S3_TEST_ENV.items():
        os.environ.setdefault(k, v)
    port = free_port()
    server = S3Server(endpoint_url=f"http://127.0.0.1:{port}", port=port)
    server.start()
    try:
        yield server
    finally:
        server.stop()
