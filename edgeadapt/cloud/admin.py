"""Cloud home directory and admin operations (shared by the CLI, which opens the store directly, and the
server's admin endpoints).

A cloud home holds::

    config.toml            layered config (see edgeadapt.cloud.config)
    signing_key.pem        ed25519 private key (0600) that signs update packages
    signing_key.pub    its public key (PEM); `edgeadapt export ... --cloud-key <home>/signing_key.pub` reads it
    admin_token            the admin bearer token (0600); EDGEADAPT_CLOUD_ADMIN_TOKEN overrides it
    store/                 SQLite (WAL) + blobs (unless store_dir, database_url or blob_url say otherwise)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from edgeadapt.cloud.config import ADMIN_TOKEN_FILE, CONFIG_FILE, DEFAULT_TOML, ENV_PREFIX, CloudConfig, resolve_home
from edgeadapt.cloud.store import NotFound, Store, StoreError, new_token
from edgeadapt.cloud.store import open_store as open_store_at
from edgeadapt.core import signing
from edgeadapt.core.fileperm import private_dir


class HomeError(ValueError):
    pass


def init_home(home: str | Path, force: bool = False) -> dict:
    """Create a cloud home: signing key pair, admin token, default config. Refuses to overwrite a key
    unless ``force``."""
    home = private_dir(Path(home).expanduser())  # 0700: signing key, admin token, store
    key_path = home / signing.PRIVATE_KEY_FILE
    if key_path.exists() and not force:
        raise HomeError(f"{key_path} already exists (use --force to replace the signing key; devices exported with "
                        "the old public key would then reject every update)")
    key = signing.generate_private_key()
    signing.save_private_key(key, key_path)
    signing.save_public_key(key, home / signing.PUBLIC_KEY_FILE)
    token = new_token()
    signing._atomic_write(home / ADMIN_TOKEN_FILE, (token + "\n").encode(), 0o600)
    cfg = home / CONFIG_FILE
    if not cfg.exists():
        cfg.write_text(DEFAULT_TOML)
    private_dir(home / "store")
    return {"home": str(home), "public_key": signing.public_key_b64(key), "fingerprint": signing.key_fingerprint(key),
            "private_key": str(key_path), "public_key_file": str(home / signing.PUBLIC_KEY_FILE),
            "admin_token_file": str(home / ADMIN_TOKEN_FILE), "config": str(cfg)}


def read_admin_token(home: str | Path | None) -> str:
    env = os.environ.get(ENV_PREFIX + "ADMIN_TOKEN")
    if env:
        return env.strip()
    path = resolve_home(home) / ADMIN_TOKEN_FILE
    if not path.is_file():
        raise HomeError(f"no admin token: {path} does not exist (run `edgeadapt cloud init {resolve_home(home)}`) and "
                        f"{ENV_PREFIX}ADMIN_TOKEN is not set")
    return path.read_text().strip()


def store_dir(home: str | Path | None, config: CloudConfig) -> Path:
    return Path(config.store_dir).expanduser() if config.store_dir else resolve_home(home) / "store"


def open_store(home: str | Path | None, config: CloudConfig) -> Store:
    """The store the config names: SQLite + blobs under the store directory, or PostgreSQL + S3 (``database_url``,
    ``blob_url``)."""
    return open_store_at(store_dir(home, config), config.database_url, config.blob_url, config.blob_endpoint_url)


# ------------------------------------------------------------------------------------------------ operations
def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def devices_info(store: Store, stale_after_s: float = 600.0, now: float | None = None) -> list[dict]:
    """Every device with its version, the version and rollout assigned to it, when it was last seen and what is
    wrong (``trouble``: the degraded reasons of its last heartbeat, a stale heartbeat, a revoked or expired
    token). Device-provided strings are as cleaned at ingest (core/safetext.py); printing them is the caller's."""
    from edgeadapt.cloud.health import age_words

    now = time.time() if now is None else now
    rollouts = sorted(store.list_rollouts(), key=lambda r: r.id, reverse=True)
    default = store.get_meta("model_name") or ""
    out = []
    for d in store.list_devices():
        model = d.model or default  # added before any model was registered: runs the first one registered
        rollout = next((r for r in rollouts if r.model == model and r.covers(d.name, d.group_id)), None)
        expired = d.expires is not None and d.expires <= now
        hb_age = None if d.heartbeat_at is None else max(0.0, now - d.heartbeat_at)
        stale = hb_age is not None and hb_age > stale_after_s
        trouble = []
        if d.revoked is not None:
            trouble.append("token revoked")
        if expired:
            trouble.append("token expired")
        if stale:
            trouble.append(f"stale heartbeat {age_words(hb_age)}")
        elif hb_age is None and d.last_seen is not None:
            trouble.append("no heartbeat yet")
        trouble += [str(v) for v in d.problems.values()]
        out.append({"name": d.name, "model": model, "version": d.version,
                    "target_version": rollout.version if rollout else None,
                    "rollout": None if rollout is None else {"id": rollout.id, "version": rollout.version,
                                                             "scope": rollout.scope},
                    "last_seen": _iso(d.last_seen), "heartbeat_at": _iso(d.heartbeat_at),
                    "heartbeat_age_s": None if hb_age is None else round(hb_age, 1), "stale": stale,
                    "status": d.status, "problems": d.problems, "trouble": trouble, "revoked": d.revoked is not None,
                    "created": _iso(d.created), "expires": _iso(d.expires), "expired": expired,
                    "counters": d.counters})
    return out


def versions_info(store: Store) -> dict:
    return {
        "versions": [{"model": v.model, "version": v.version, "parent": v.parent, "params_hash": v.params_hash,
                      "created": _iso(v.created), "note": v.note, "metrics": v.metrics} for v in store.list_versions()],
        "candidates": [{"id": c.id, "model": c.model, "status": c.status, "base_version": c.base_version, "version": c.version,
                        "created": _iso(c.created), "reason": c.reason, "params_hash": c.params_hash,
                        "metrics": c.metrics} for c in store.list_candidates()],
    }


def rollouts_info(store: Store) -> list[dict]:
    return [{"id": r.id, "model": r.model, "version": r.version, "scope": r.scope, "devices": r.devices, "fraction": r.fraction,
             "created": _iso(r.created), "note": r.note} for r in store.list_rollouts()]


def push(store: Store, version: int | None = None, devices: list[str] | None = None,
         fraction: float | None = None, revert: bool = False, group: int | None = None) -> dict:
    """Assign a version (default: latest) to some devices, a fraction of them, one group's members, or all, of the
    store view's model (``Store.scoped``; the whole store: the default model).

    Devices never downgrade through a delta package, so to roll the fleet back to an older version use
    ``revert=True``: its parameters are republished as a new version number and that one is rolled out."""
    latest = store.latest_version()
    if latest is None:
        raise StoreError("no versions yet: start `edgeadapt cloud serve --bundle BUNDLE` first")
    version = latest if version is None else int(version)
    try:
        store.get_version(version)
    except NotFound:
        raise StoreError(f"no version {version} (latest is {latest})") from None
    if devices:
        model = store.scope.key()
        known = {d.name: d.model for d in store.list_devices()}
        unknown = sorted(set(devices) - set(known))
        if unknown:
            raise StoreError(f"unknown devices: {', '.join(unknown)}")
        others = sorted(n for n in devices if known[n] not in ("", model))
        if others:
            raise StoreError(f"devices of another model than {model!r}: {', '.join(others)} (name their model "
                             "with --model)")
    note = "push"
    if revert:
        params = store.get_params(version)
        new = store.add_version(params, parent=version, note=f"revert to v{version}", group_id=group)
        note = f"revert to v{version}"
        version = new
    rid = store.add_rollout(version, devices=list(devices) if devices else None, fraction=fraction, note=note,
                            group_id=group)
    return {"rollout": rid, "model": store.scope.key(), "version": version, "devices": devices, "fraction": fraction,
            "group": group, "note": note}


def groups_info(store: Store, config=None) -> list[dict]:
    """Every active group of similar devices, per model (one model's with a scoped store): members, the version its
    lineage is at, the version its rollouts assign, and its accuracy proxy (cloud/grouping.py)."""
    from edgeadapt.cloud.config import GroupsConfig
    from edgeadapt.cloud.grouping import Grouper

    models = [store.model] if store.model is not None else [m.model for m in store.models.list()] or [""]
    return [{"model": m, **g} for m in models
            for g in Grouper(store.scoped(m), config or GroupsConfig()).describe()]
