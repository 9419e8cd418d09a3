"""Private files: state directories 0700, databases and queues 0600, whatever the umask (torch-free).

A device's queue holds its users' input images, the cloud's database its devices, token hashes and
statuses; under the usual umask 022 both were world-readable (issue 22). SQLite creates a database's
``-wal``, ``-shm`` and ``-journal`` files with the database file's own mode, so creating the database 0600
before SQLite opens it covers them. What an older version left readable to others loses those bits on open;
nothing is ever made more permissive (a directory its owner made read-only stays read-only).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def _chmod(path: Path, mode: int) -> None:
    """Take away what ``mode`` does not grant (group and others); never add a permission: a directory its owner
    made read-only stays read-only."""
    try:
        have = path.stat().st_mode & 0o777
        if have & ~mode:
            os.chmod(path, have & mode)
    except FileNotFoundError:
        pass
    except OSError as exc:  # a file owned by someone else: say so, do not fail
        log.warning("cannot make %s private (mode %o): %s", path, mode, exc)


def private_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) if needed, 0700; an existing one loses its group and other permissions."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    _chmod(path, DIR_MODE)
    return path


def private_sqlite(path: str | Path) -> Path:
    """Make a SQLite database (created empty, 0600, if missing) and its side files private (group and other
    permissions removed), before it is opened."""
    path = Path(path)
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, FILE_MODE)
        os.close(fd)
    for suffix in SQLITE_SUFFIXES:
        _chmod(path.with_name(path.name + suffix), FILE_MODE)
    return path
