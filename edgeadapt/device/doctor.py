"""``edgeadapt doctor device``: what would fail for this device, found before it runs (torch-free).

``startup_findings`` is the cheap part (no network, no model load) that ``device run`` runs first and refuses
to start on: a configuration that can never work (``--cloud`` without a token; ``--cloud`` with a bundle that has
no cloud public key, so every update would be rejected, unless updates are turned off). ``device_findings``
adds the rest: the bundle's files against their hashes, the graphs loading in ONNX Runtime, the state
directory, and with a cloud: its reachability and health, the token (``/v1/whoami``), that the cloud serves
this bundle's model and signs with its key, and that one sample of this bundle fits the cloud's upload limit.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import numpy as np

from edgeadapt.core.findings import Finding, export_hint

NEW_TOKEN = "make one on the cloud (`edgeadapt cloud devices add NAME`) and give it with --token-file FILE"


def startup_findings(bundle: Path, cloud_url: str | None, token: str | None, updates: bool = True) -> list[Finding]:
    """What can never work, from the configuration and the manifest alone."""
    from edgeadapt.core import signing
    from edgeadapt.core.bundle import BundleError, read_manifest

    out: list[Finding] = []
    try:
        manifest = read_manifest(bundle)
    except BundleError as exc:
        return [Finding("fatal", "bundle", str(exc), "give the directory `edgeadapt export` wrote (--bundle)")]
    out.append(Finding("ok", "manifest", f"model {manifest.model_name!r}, input {manifest.input.shape}, "
                                         f"{manifest.num_classes} classes"))
    if not cloud_url:
        out.append(Finding("ok", "cloud", "standalone: no uploads are queued, no updates taken"))
        if token:
            out.append(Finding("warn", "token", "a token is set but no cloud: it is not used", "add --cloud URL"))
        return out
    if not token:
        out.append(Finding("fatal", "token", "--cloud is set but no device token: nothing would be uploaded",
                           NEW_TOKEN.replace("make one", "get this device's token")))
    key = manifest.cloud_public_key
    if not updates:
        out.append(Finding("ok", "updates", "off (--no-updates): uploads and heartbeats only"))
    elif key is None:
        out.append(Finding("fatal", "cloud key", "the bundle carries no cloud public key: every update from the "
                           "cloud would be rejected",
                           f"re-export it (`{export_hint()}`), or run with --no-updates"))
    else:
        try:
            signing.public_key_from_b64(key)
            out.append(Finding("ok", "cloud key", f"updates verified with key {key[:12]}…"))
        except Exception as exc:
            out.append(Finding("fatal", "cloud key", f"the bundle's cloud public key is invalid: {exc}",
                               f"re-export the bundle: `{export_hint()}`"))
    return out


def bundle_findings(bundle: Path) -> list[Finding]:
    """Every file against its recorded sha256, the input contract, both graphs loading in ONNX Runtime."""
    from edgeadapt.core.bundle import Bundle, BundleError

    try:
        b = Bundle(bundle)
    except (BundleError, OSError, ValueError) as exc:
        return [Finding("fatal", "bundle", str(exc), "export the bundle again (or copy it again intact)")]
    out = [Finding("ok", "bundle", f"{len(b.manifest.files)} files match their sha256")]
    try:
        codec = b.codec()
        out.append(Finding("ok", "input contract", f"shape {list(codec.shape)}, values {codec.low:g}..{codec.high:g}, "
                                                   f"{codec.sample_bytes()} bytes per uint8 sample"))
    except ValueError as exc:
        out.append(Finding("fatal", "input contract", str(exc), "export again with a valid --mean/--std/--value-range"))
    try:
        import onnxruntime as ort

        from edgeadapt.device.backend import session_options

        for graph in (b.adaptive_graph, b.static_graph):  # as the daemon makes its sessions (the shared pool)
            ort.InferenceSession(str(graph), session_options(), providers=["CPUExecutionProvider"])
        out.append(Finding("ok", "graphs", "adaptive and static graphs load in ONNX Runtime"))
    except Exception as exc:
        out.append(Finding("fatal", "graphs", f"a graph does not load: {type(exc).__name__}: {str(exc)[:200]}",
                           "export the bundle again"))
    for w in b.manifest.warnings:
        out.append(Finding("warn", "export", w))
    return out


def state_findings(state_dir: Path) -> list[Finding]:
    probe = Path(state_dir) / ".doctor-probe"
    try:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return [Finding("warn", "state dir", f"{state_dir} is not writable ({exc.strerror or exc}): the daemon would "
                        "run without persistence (no uploads, no saved state)", "give a writable --state-dir")]
    import shutil

    free = shutil.disk_usage(state_dir).free
    level = "warn" if free < 64 * 2**20 else "ok"
    return [Finding(level, "state dir", f"{state_dir} writable, {free / 2**20:.0f} MiB free",
                    "free some space: the upload queue and versions live here" if level == "warn" else "")]


def cloud_findings(bundle: Path, cloud_url: str, token: str | None, verify: ssl.SSLContext | bool = True,
                   updates: bool = True, timeout: float = 10.0) -> list[Finding]:
    """The cloud as this device would meet it."""
    import httpx

    from edgeadapt.core.bundle import read_manifest
    from edgeadapt.core.input_codec import InputCodec
    from edgeadapt.core.wire import upload_body_bytes

    manifest = read_manifest(bundle)
    url = cloud_url.rstrip("/")
    out: list[Finding] = []
    try:
        r = httpx.get(f"{url}/healthz", timeout=timeout, verify=verify)
    except httpx.HTTPError as exc:
        hint = "give the CA that signed its certificate with --ca-file" if "CERTIFICATE" in str(exc) else \
            "check --cloud (scheme, host, port), that `edgeadapt cloud serve` runs there, and the network"
        return [Finding("fatal", "cloud", f"cannot reach {url}: {type(exc).__name__}: {str(exc)[:200]}", hint)]
    if r.status_code != 200:
        return [Finding("fatal", "cloud", f"{url}/healthz answered HTTP {r.status_code}",
                        "is this an edgeadapt cloud?")]
    try:
        health = r.json()
    except ValueError:
        return [Finding("fatal", "cloud", f"{url}/healthz is not JSON", "is this an edgeadapt cloud?")]
    out.append(Finding("ok", "cloud", f"{url} answers (model {health.get('model')!r})"))
    if health.get("status") not in (None, "ok"):
        reasons = "; ".join(f"{k}: {v}" for k, v in (health.get("reasons") or {}).items())
        out.append(Finding("warn", "cloud health", f"the cloud is {health.get('status')}: {reasons[:500]}",
                           "see `edgeadapt doctor cloud` on the cloud's host"))
    limits = health.get("limits") or {}  # the cloud's default model's
    models = health.get("models")
    own = models.get(manifest.model_name) if isinstance(models, dict) else None  # a cloud of several models
    if isinstance(own, dict) and own.get("limits"):
        limits = own["limits"]
    if token:
        try:
            w = httpx.get(f"{url}/v1/whoami", headers={"Authorization": f"Bearer {token}"}, timeout=timeout,
                          verify=verify)
        except httpx.HTTPError as exc:
            w = None
            out.append(Finding("fatal", "token", f"could not check the token: {exc}", "retry; check the network"))
        if w is not None:
            if w.status_code == 200:
                limits = {**limits, **w.json()}
                out.append(Finding("ok", "token", f"valid: this is device {limits.get('device')!r}"))
            elif w.status_code == 401:
                out.append(Finding("fatal", "token", "the cloud refuses the token (401): revoked, expired or wrong",
                                   NEW_TOKEN))
            elif w.status_code == 403:
                out.append(Finding("fatal", "token", "that is the admin token, not a device token", NEW_TOKEN))
            elif w.status_code == 404:
                out.append(Finding("warn", "token", "the cloud has no /v1/whoami (an older version): token not "
                                   "checked"))
            else:
                out.append(Finding("fatal", "token", f"/v1/whoami answered HTTP {w.status_code}: {w.text[:200]}"))
    if not limits:
        out.append(Finding("warn", "limits", "the cloud does not state its model and limits: not checked"))
        return out
    model = limits.get("model")
    if model != manifest.model_name:
        if "device" in limits:  # the token's device: its registered model
            what = f"the cloud serves model {model!r} to device {limits['device']!r}"
        elif isinstance(models, dict) and len(models) > 1:
            what = f"the cloud serves models {', '.join(map(repr, sorted(models)))}"
        else:
            what = f"the cloud serves model {model!r}"
        out.append(Finding("fatal", "model", f"{what}; this bundle is {manifest.model_name!r}: every upload and "
                           "update check would be refused",
                           "run the device with that cloud's bundle, or the cloud with this one "
                           "(`edgeadapt cloud serve --bundle`)"))
    else:
        out.append(Finding("ok", "model", f"the cloud serves {model!r}"))
    key = limits.get("public_key")
    if updates and key and manifest.cloud_public_key and key != manifest.cloud_public_key:
        out.append(Finding("fatal", "cloud key", f"the cloud signs with key {key[:12]}…, the bundle trusts "
                           f"{manifest.cloud_public_key[:12]}…: every update would be rejected (bad signature)",
                           f"re-export the bundle with that cloud's key: `{export_hint()}`"))
    elif updates and key and manifest.cloud_public_key:
        out.append(Finding("ok", "cloud key", "the cloud signs with the key this bundle trusts"))
    shape = limits.get("input_shape")
    codec = InputCodec(manifest.input)
    if shape is not None and list(shape) != list(codec.shape):
        out.append(Finding("fatal", "input", f"the cloud's model takes {shape}, this bundle {list(codec.shape)}: "
                           "every upload would be refused", "run both with the same bundle"))
    body = upload_body_bytes(manifest.model_name, codec.to_upload(np.full(codec.shape, codec.low, np.float32)),
                             manifest.num_classes)
    cap = limits.get("max_body_bytes")
    if cap is not None and body > int(cap):
        out.append(Finding("fatal", "upload size", f"one sample of this bundle uploads as {body} bytes; the cloud "
                           f"accepts at most {cap} bytes per request: every upload would be refused (413)",
                           f"raise max_body_bytes in the cloud's config.toml to at least {body} (64 samples per "
                           f"request: {64 * body})"))
    elif cap is not None:
        out.append(Finding("ok", "upload size", f"one sample uploads as {body} bytes (the cloud takes up to {cap} "
                           f"per request: {max(1, int(cap) // body)} samples)"))
    return out


def device_findings(bundle: Path, cloud_url: str | None = None, token: str | None = None,
                    verify: ssl.SSLContext | bool = True, updates: bool = True,
                    state_dir: Path | None = None) -> list[Finding]:
    """The whole device doctor: startup checks, the bundle, the state directory, the cloud."""
    out = startup_findings(bundle, cloud_url, token, updates)
    if any(f.check == "bundle" and f.level == "fatal" for f in out):
        return out
    out += bundle_findings(bundle)
    if state_dir is not None:
        out += state_findings(state_dir)
    if cloud_url:
        for url in cloud_url.split(","):  # every replica a device may move to must answer it
            out += cloud_findings(bundle, url.strip(), token, verify, updates)
    return out
