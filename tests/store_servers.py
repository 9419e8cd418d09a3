"""Real servers for the store's second back end as session fixtures: PostgreSQL and an S3-compatible object store
(moto's server mode, which stands in for S3), both from ``edgeadapt.bench.store_servers``.

A test module uses them with ``pytest_plugins = ["tests.store_servers"]``. Both are session-scoped: one
PostgreSQL cluster (a fresh database per test) and one moto server (a fresh bucket per test). Without the
binaries or packages the tests that need them are skipped with the reason; under ``CI=true`` they fail
instead (``scripts/setup`` installs Debian's ``postgresql``, the dev extra moto).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from edgeadapt.bench import store_servers as servers
from edgeadapt.bench.store_servers import PostgresServer, S3Server, ServerUnavailable, free_port

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_free_port = free_port  # for tests that need a port nobody listens on

__all__ = ["PostgresServer", "S3Server", "postgres_server", "s3_server", "unavailable", "_free_port"]


def unavailable(why: str) -> None:
    """Skip, or under CI fail: CI installs everything, so a missing server there is a broken setup."""
    if IN_CI:
        pytest.fail(f"{why} (CI=true: scripts/setup installs it)")
    pytest.skip(why)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the session (trust auth on 127.0.0.1 only, fsync off: test data)."""
    try:
        with servers.postgres_server() as server:
            yield server
    except ServerUnavailable as exc:
        unavailable(str(exc))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 in server mode on 127.0.0.1 (a real HTTP endpoint boto3 talks to, standing in for S3)."""
    try:
        with servers.s3_server() as server:
            yield server
    except ServerUnavailable as exc:
        unavailable(str(exc))
