"""Parameter versions on the device's disk: the last K kept, the one in use recorded atomically.

Layout under ``<state_dir>/versions``: ``v<N>.safetensors`` (full adaptable parameter set, metadata holds its
hash and where it came from) and ``current.json`` ({"version": N, "history": [...]}) written by rename, so
a crash never leaves a half-written pointer. Version 0 is the bundle's own parameters and is never pruned.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from edgeadapt.core.tensorfile import ParamSet, load_params, params_hash, save_params


class VersionStoreError(Exception):
    pass


class VersionStore:
    def __init__(self, state_dir: str | Path, base_params: ParamSet, keep: int = 5):
        self.dir = Path(state_dir) / "versions"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._base = base_params
        self._pointer = self.dir / "current.json"

    def _path(self, version: int) -> Path:
        return self.dir / f"v{int(version)}.safetensors"

    def save(self, version: int, params: ParamSet, source: str = "cloud") -> None:
        tmp = self._path(version).with_suffix(".tmp")
        save_params(params, tmp, metadata={"version": str(version), "hash": params_hash(params), "source": source,
                                           "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self._path(version))

    def load(self, version: int) -> ParamSet:
        if version == 0:
            return dict(self._base)
        path = self._path(version)
        if not path.is_file():
            raise VersionStoreError(f"version {version} is not on disk")
        try:
            from safetensors import safe_open

            with safe_open(str(path), "np") as f:
                expected = (f.metadata() or {}).get("hash")
            params = load_params(path)
        except Exception as exc:
            raise VersionStoreError(f"version {version} on disk is corrupt: {exc}") from exc
        if expected and params_hash(params) != expected:
            raise VersionStoreError(f"version {version} on disk is corrupt: hash mismatch")
        return params

    def versions(self) -> list[int]:
        vs = [0]
        for p in self.dir.glob("v*.safetensors"):
            try:
                vs.append(int(p.stem[1:]))
            except ValueError:
                continue
        return sorted(set(vs))

    def read_pointer(self) -> dict:
        if not self._pointer.is_file():
            return {"version": 0, "history": []}
        try:
            return json.loads(self._pointer.read_text())
        except (OSError, ValueError):
            return {"version": 0, "history": [], "error": "current.json unreadable; fell back to version 0"}

    def current(self) -> int:
        return int(self.read_pointer().get("version", 0))

    def set_current(self, version: int, reason: str) -> None:
        ptr = self.read_pointer()
        history = (ptr.get("history", []) + [{"version": version, "reason": reason, "at": time.time()}])[-50:]
        tmp = self._pointer.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": int(version), "history": history}))
        os.replace(tmp, self._pointer)
        self.prune(protect={version})

    def prune(self, protect: set[int]) -> None:
        vs = [v for v in self.versions() if v != 0]
        for v in vs[: max(0, len(vs) - self.keep)]:
            if v not in protect:
                self._path(v).unlink(missing_ok=True)
