"""``edgeadapt doctor cloud``: what would fail for this cloud home and bundle, found before (or while) it serves.

Checks the home (config, signing key and its public half, admin token), the bundle (files against their hashes,
the cloud's key in it, one sample's upload against ``max_body_bytes``), the store (opens, answers, free disk),
the teacher and TLS files, and whether a server answers at the configured address. No torch is imported.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from edgeadapt.core.findings import Finding, export_hint


def cloud_findings(home: Path | None, bundle: Path | None = None, url: str | None = None) -> list[Finding]:
    from edgeadapt.cloud.admin import read_admin_token, store_dir
    from edgeadapt.cloud.config import ConfigError, load_config, resolve_home
    from edgeadapt.core import signing

    out: list[Finding] = []
    h = resolve_home(home)
    if not h.is_dir():
        return [Finding("fatal", "home", f"{h} does not exist", f"create it: `edgeadapt cloud init {h}`")]
    try:
        cfg = load_config(h, {"bundle": str(bundle) if bundle else None})
    except ConfigError as exc:
        return [Finding("fatal", "config", str(exc), f"fix {h / 'config.toml'} or the EDGEADAPT_CLOUD_* variables")]
    out.append(Finding("ok", "config", f"{h / 'config.toml'} valid (listen {cfg.listen}, updates {cfg.update_mode})"))
    key_b64 = None
    key_path = h / signing.PRIVATE_KEY_FILE
    try:
        key = signing.load_private_key(h)
        key_b64 = signing.public_key_b64(key)
        mode = key_path.stat().st_mode & 0o777
        if mode & 0o077:
            out.append(Finding("warn", "signing key", f"{key_path} is readable by others (mode {mode:o})",
                               f"chmod 600 {key_path}"))
        else:
            out.append(Finding("ok", "signing key", f"{key_path} (fingerprint {signing.key_fingerprint(key)})"))
        pub = h / signing.PUBLIC_KEY_FILE
        if pub.is_file() and signing.load_public_key_b64(pub) != key_b64:
            out.append(Finding("fatal", "public key", f"{pub} is not the public half of {key_path}: bundles exported "
                               "with it reject every update", f"rewrite it: `edgeadapt cloud init {h} --force` makes "
                               "a new pair (re-export every bundle then)"))
    except Exception as exc:  # SigningKeyError, OSError
        out.append(Finding("fatal", "signing key", str(exc), f"`edgeadapt cloud init {h}` creates one"))
    try:
        read_admin_token(h)
        out.append(Finding("ok", "admin token", "present"))
    except Exception as exc:
        out.append(Finding("fatal", "admin token", str(exc), f"`edgeadapt cloud init {h}`"))
    out += _bundle(cfg, key_b64, h)
    if cfg.database_url or (cfg.blob_url or "").startswith("s3://"):
        out += _shared_store(cfg)
    if not cfg.database_url:
        out += _store(store_dir(h, cfg), cfg.min_free_disk_mb)
    if cfg.teacher:
        w = cfg.teacher_weights
        if w and not Path(w).expanduser().is_file():
            out.append(Finding("fatal", "teacher", f"teacher weights {w} do not exist", "give --teacher-weights FILE"))
        else:
            out.append(Finding("ok", "teacher", f"{cfg.teacher}" + (f" with {w}" if w else "")))
    else:
        out.append(Finding("warn", "teacher", "no teacher configured: uploads are stored, nothing is trained",
                           "`edgeadapt cloud serve --teacher NAME --teacher-weights FILE`"))
    if cfg.trainer.executor == "ray":
        out += _ray(cfg)
    out += _server(url or f"{cfg.scheme}://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::', '') else cfg.host}:"
                          f"{cfg.port}")
    return out


def _ray(cfg) -> list[Finding]:
    """``trainer.executor = "ray"``: the package is there (not imported: doctor stays light), and a cluster's
    workers on other machines can reach the store."""
    from importlib.metadata import PackageNotFoundError, version

    t = cfg.trainer
    try:
        have = version("ray")
    except PackageNotFoundError:
        return [Finding("fatal", "ray", "trainer.executor = \"ray\" but the ray package is not installed",
                        "pip install 'edgeadapt[ray]' (or set trainer.executor = \"inprocess\")")]
    out = [Finding("ok", "ray", f"ray {have}; rounds run as Ray tasks on {t.ray_address or 'a local Ray'}"
                   + (f", {t.ray_num_gpus:g} GPU per task when the cluster has GPUs" if t.ray_num_gpus else ""))]
    if t.ray_address and t.ray_address != "auto" and not cfg.database_url:
        out.append(Finding("warn", "ray", f"Ray cluster {t.ray_address} with the embedded SQLite store: workers on "
                           "other machines need its directory on shared storage",
                           "use database_url (PostgreSQL) and blob_url (s3://) for a cluster"))
    return out


def _bundle(cfg, key_b64: str | None, home: Path) -> list[Finding]:
    from edgeadapt.core.bundle import Bundle, BundleError
    from edgeadapt.core.wire import upload_body_bytes

    if not cfg.bundle:
        return [Finding("fatal", "bundle", "no bundle configured", "`edgeadapt cloud serve --bundle BUNDLE` (or "
                        "`bundle` in config.toml)")]
    try:
        b = Bundle(Path(cfg.bundle).expanduser())
    except (BundleError, OSError, ValueError) as exc:
        return [Finding("fatal", "bundle", str(exc), "export the bundle again")]
    out = [Finding("ok", "bundle", f"{cfg.bundle}: model {b.manifest.model_name!r}, files match their sha256")]
    pub = home / "signing_key.pub"
    if b.manifest.cloud_public_key is None:
        out.append(Finding("fatal", "bundle key", "the bundle carries no cloud public key: devices cannot verify any "
                           "update from this cloud", f"re-export it: `{export_hint(str(pub))}`"))
    elif key_b64 is not None and b.manifest.cloud_public_key != key_b64:
        out.append(Finding("fatal", "bundle key", "the bundle was exported for another cloud key: devices would "
                           "reject every update", f"re-export it: `{export_hint(str(pub))}`"))
    elif key_b64 is not None:
        out.append(Finding("ok", "bundle key", "the bundle trusts this cloud's signing key"))
    codec = b.codec()
    body = upload_body_bytes(b.manifest.model_name, codec.to_upload(np.full(codec.shape, codec.low, np.float32)),
                             b.manifest.num_classes)
    if body > cfg.max_body_bytes:
        out.append(Finding("fatal", "upload size", f"one sample of this bundle uploads as {body} bytes; "
                           f"max_body_bytes is {cfg.max_body_bytes}: every upload would be refused (413)",
                           f"set max_body_bytes = {max(body * 64, 1 << 20)} in config.toml"))
    else:
        out.append(Finding("ok", "upload size", f"one sample uploads as {body} bytes; max_body_bytes "
                           f"{cfg.max_body_bytes} holds {cfg.max_body_bytes // body}"))
    return out


def _store(path: Path, min_free_mb: float) -> list[Finding]:
    import sqlite3

    db = path / "cloud.db"
    out = []
    if not db.exists():
        out.append(Finding("ok", "store", f"{db} not created yet (the first `cloud serve` creates it)"))
    else:
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
            try:
                n = con.execute("SELECT COUNT(*) FROM devices").fetchone()[0]
            finally:
                con.close()
            out.append(Finding("ok", "store", f"{db} answers ({n} devices)"))
        except sqlite3.Error as exc:
            out.append(Finding("fatal", "store", f"{db}: {exc}", "restore the store from a backup, or start a fresh "
                               "store_dir"))
    blobs = path / "blobs"
    if blobs.exists() and not blobs.is_dir():
        out.append(Finding("fatal", "store", f"{blobs} is not a directory: no upload can be stored",
                           f"move it away and recreate the directory (mkdir -m 700 {blobs})"))
    where = path if path.exists() else path.parent
    try:
        free = shutil.disk_usage(where).free
        writable = os.access(where, os.W_OK)
    except OSError as exc:
        return out + [Finding("fatal", "disk", f"{where}: {exc}")]
    if not writable:
        out.append(Finding("fatal", "disk", f"{where} is not writable", "fix its owner or mode"))
    level = "fatal" if free < 64 * 2**20 else "warn" if free < min_free_mb * 2**20 else "ok"
    out.append(Finding(level, "disk", f"{free / 2**20:.0f} MiB free under {where}",
                       "" if level == "ok" else "free space: uploads and versions are stored here"))
    return out


def _shared_store(cfg) -> list[Finding]:
    """PostgreSQL and the S3-compatible object store of a replicated cloud: reachable, nothing created."""
    from edgeadapt.cloud.store import open_blob_store, redact_url

    out = []
    if cfg.database_url:
        where = redact_url(cfg.database_url)
        try:
            import psycopg

            with psycopg.connect(cfg.database_url, connect_timeout=10) as conn:
                exists = conn.execute("SELECT to_regclass('devices') IS NOT NULL").fetchone()[0]
                n = conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0] if exists else None
            out.append(Finding("ok", "store", f"{where} answers " + (f"({n} devices)" if exists else
                                                                     "(tables not created yet: the first `cloud "
                                                                     "serve` creates them)")))
        except Exception as exc:  # ImportError, psycopg.Error
            out.append(Finding("fatal", "store", f"{where}: {type(exc).__name__}: {str(exc)[:300]}",
                               "start the database, or fix database_url (and `pip install 'psycopg[binary]'`)"))
    if (cfg.blob_url or "").startswith("s3://"):
        try:
            blobs = open_blob_store(cfg.blob_url, cfg.blob_endpoint_url, create_bucket=False)
            blobs.exists("doctor-probe")
            blobs.close()
            out.append(Finding("ok", "blobs", f"{cfg.blob_url} answers"))
        except Exception as exc:  # StoreUnavailable, ImportError
            out.append(Finding("fatal", "blobs", f"{cfg.blob_url}: {type(exc).__name__}: {str(exc)[:300]}",
                               "start the object store, or fix blob_url / blob_endpoint_url and the AWS_* "
                               "credentials"))
    return out


def _server(url: str) -> list[Finding]:
    import httpx

    try:
        r = httpx.get(f"{url.rstrip('/')}/healthz", timeout=5, verify=False)  # reachability only: nothing is sent
    except httpx.HTTPError:
        return [Finding("ok", "server", f"nothing answers at {url} (not running, or elsewhere: --url)")]
    try:
        h = r.json()
    except ValueError:
        return [Finding("warn", "server", f"{url}/healthz answered HTTP {r.status_code}, not JSON")]
    if h.get("status") in (None, "ok"):
        return [Finding("ok", "server", f"{url} serves model {h.get('model')!r}, healthy")]
    reasons = "; ".join(f"{k}: {v}" for k, v in (h.get("reasons") or {}).items())
    return [Finding("warn", "server", f"{url} is {h.get('status')}: {reasons[:500]}")]
