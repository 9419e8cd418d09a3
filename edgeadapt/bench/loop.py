"""The full loop benchmark: the real cloud service and the real device daemon as separate processes talking
HTTP on loopback, the FMNIST-C stream sent to the device's /v1/predict.

Lockstep mode (``sync_every`` K): every K batches the stream pauses; the device uploads what it queued, the
cloud trains on everything that arrived and publishes (or its gate rejects the candidate), and the device
fetches and applies the result. The numbers are then reproducible; the asynchronous mode (sync_every=0)
lets the device's background uploader/updater and the cloud's trainer thread run on their own.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from edgeadapt.core.serving import wait_healthy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_out(proc: subprocess.Popen) -> str:
    return proc.stdout.read().decode(errors="replace")[-2000:] if proc.stdout else ""


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def cloud_process(bundle: Path, teacher: str, teacher_weights: Path, signing_home: Path, work: Path,
                  trainer_auto: bool = False, log_dir: Path | None = None, train_every: int = 256,
                  env: dict[str, str] | None = None):
    """Start a real ``cloud serve`` process in a fresh home under ``work`` (signing with ``signing_home``'s key);
    yields a dict with its URL, admin token, home and process handle; stops it on exit."""
    from edgeadapt.cloud.admin import init_home, read_admin_token
    from edgeadapt.core import signing

    home = work / "cloud-home"
    init_home(home)
    for name in (signing.PRIVATE_KEY_FILE, signing.PUBLIC_KEY_FILE):  # the key the bundle trusts
        shutil.copy2(signing_home / name, home / name)
    admin = read_admin_token(home)
    cport = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    clog = open((log_dir or work) / "cloud.log", "wb")
    cloud_cmd = [sys.executable, "-m", "edgeadapt", "cloud", "serve", "--home", str(home), "--bundle", str(bundle),
                 "--teacher", teacher, "--teacher-weights", str(teacher_weights), "--listen", f"127.0.0.1:{cport}",
                 "--seed", "0"]
    if not trainer_auto:
        cloud_cmd.append("--no-trainer")
    else:
        cloud_cmd += ["--train-every", str(train_every), "--train-interval", "30"]
    cloud = subprocess.Popen(cloud_cmd, stdout=clog, stderr=subprocess.STDOUT, env=env)
    try:
        curl = f"http://127.0.0.1:{cport}"
        wait_healthy(curl, cloud, "cloud", 120, lambda: _read_out(cloud))
        yield {"cloud": curl, "admin": admin, "home": home, "cloud_proc": cloud}
    finally:
        _stop(cloud)
        clog.close()


def add_device(cloud: dict, name: str) -> str:
    """Register a device with a running cloud (``cloud_process``'s dict); -> its token."""
    r = httpx.post(f"{cloud['cloud']}/v1/admin/devices", json={"name": name},
                   headers={"Authorization": f"Bearer {cloud['admin']}"}, timeout=30)
    r.raise_for_status()
    return r.json()["token"]


@contextmanager
def loop_processes(bundle: Path, teacher: str, teacher_weights: Path, signing_home: Path, work: Path,
                   upload_all: bool = False, method: str | None = None, trainer_auto: bool = False,
                   poll_s: float = 3600.0, log_dir: Path | None = None, train_every: int = 256,
                   long_poll_s: float = 0.0):
    """Start cloud + device; yields a dict with URLs, tokens and process handles; stops both on exit.
    ``long_poll_s`` 0 (lockstep): the device takes versions only when the benchmark syncs it."""
    log_dir = log_dir or work
    with cloud_process(bundle, teacher, teacher_weights, signing_home, work, trainer_auto=trainer_auto,
                       log_dir=log_dir, train_every=train_every) as c:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        dlog = open(log_dir / "device.log", "wb")
        device = None
        try:
            token = add_device(c, "bench-device")
            denv = {**env, "EDGEADAPT_UPLOAD_ALL": "true" if upload_all else "false",
                    "EDGEADAPT_UPDATE_POLL_S": str(poll_s), "EDGEADAPT_UPLOAD_INTERVAL_S": str(min(poll_s, 0.5)),
                    "EDGEADAPT_UPDATE_LONG_POLL_S": str(long_poll_s)}
            dport = _free_port()
            dev_cmd = [sys.executable, "-m", "edgeadapt", "device", "run", "--bundle", str(bundle), "--state-dir",
                       str(work / "device-state"), "--cloud", c["cloud"], "--token", token, "--listen",
                       f"127.0.0.1:{dport}"]
            if method:
                dev_cmd += ["--method", method]
            device = subprocess.Popen(dev_cmd, stdout=dlog, stderr=subprocess.STDOUT, env=denv)
            durl = f"http://127.0.0.1:{dport}"
            wait_healthy(durl, device, "device", 120, lambda: _read_out(device))
            yield {**c, "device": durl, "token": token, "device_proc": device}
        finally:
            _stop(device)
            dlog.close()


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _acc_by_rounds(hits: np.ndarray, domains: np.ndarray, window: int) -> list[float]:
    """Accuracy of the images seen after 0, 1, 2, ... sync rounds since their domain began (round 0: the
    device still runs what the cloud made before the shift): how fast the loop catches up with a shift."""
    idx = np.arange(len(domains))
    begins = np.r_[True, domains[1:] != domains[:-1]]
    start = np.maximum.accumulate(np.where(begins, idx, 0))  # index where each image's domain began
    k = idx // window - start // window
    return [round(float(hits[k == j].mean()), 4) for j in range(int(k.max()) + 1)]


def run_loop(bundle: Path, teacher: str, teacher_weights: Path, signing_home: Path, x: np.ndarray, y: np.ndarray,
             batch: int = 64, sync_every: int = 8, upload_all: bool = False, method: str | None = None,
             progress: Callable[[int], None] | None = None, work: Path | None = None,
             domains: np.ndarray | None = None) -> dict:
    """Stream ``x`` through the device with the cloud in the loop; ``domains`` (per image) adds per-domain
    accuracy to the result."""
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="edgeadapt-loop-")) if own else work
    work.mkdir(parents=True, exist_ok=True)
    correct, n = 0, 0
    hits = np.zeros(len(x), bool)
    versions, trains, rejected = [], 0, 0
    t0 = time.perf_counter()
    try:
        with loop_processes(bundle, teacher, teacher_weights, signing_home, work, upload_all=upload_all,
                            method=method, trainer_auto=(sync_every == 0),
                            poll_s=3600.0 if sync_every else 1.0, long_poll_s=0.0 if sync_every else 20.0) as p:
            admin = {"Authorization": f"Bearer {p['admin']}"}
            with httpx.Client(timeout=600) as c:
                for bi, i in enumerate(range(0, len(x), batch)):
                    xb = x[i : i + batch]
                    r = c.post(f"{p['device']}/v1/predict", content=_npy(xb),
                               headers={"content-type": "application/x-npy"})
                    r.raise_for_status()
                    preds = np.array([q["class"] for q in r.json()["predictions"]])
                    hits[i : i + len(xb)] = preds == y[i : i + batch]
                    correct += int(hits[i : i + len(xb)].sum())
                    n += len(xb)
                    versions.append(r.json()["param_version"])
                    if progress:
                        progress(len(xb))
                    if sync_every and (bi + 1) % sync_every == 0:
                        c.post(f"{p['device']}/v1/admin/sync").raise_for_status()
                        tr = c.post(f"{p['cloud']}/v1/admin/train", headers=admin)
                        if tr.status_code == 200:
                            st = tr.json().get("status")
                            trains += st != "idle"
                            rejected += st == "rejected"
                        c.post(f"{p['device']}/v1/admin/sync").raise_for_status()
                status = c.get(f"{p['device']}/v1/status").json()
    except Exception:
        if own:  # keep the logs of a failed run
            raise RuntimeError(f"loop run failed; logs kept in {work}") from None
        raise
    if own:
        shutil.rmtree(work, ignore_errors=True)
    q = status.get("queue", {})
    up = status.get("uploader", {})
    upd = status.get("updater", {}).get("counters", {})
    per_domain = {} if domains is None else {
        str(d): round(float(hits[domains == d].mean()), 4) for d in dict.fromkeys(domains.tolist())}
    return {"acc": correct / max(n, 1), **({"acc_per_domain": per_domain} if per_domain else {}),
            **({"acc_by_rounds_since_shift": _acc_by_rounds(hits, domains, batch * sync_every)}
               if per_domain and sync_every else {}),
            "upload_frac": q.get("sent", 0) / max(n, 1), "bytes_up": up.get("bytes_up", 0),
            "bytes_down": upd.get("bytes_down", 0), "img_s": n / (time.perf_counter() - t0),
            "versions_applied": upd.get("applied", 0), "rolled_back": upd.get("rolled_back", 0),
            "updates_rejected_on_device": upd.get("rejected", 0), "trainings": trains, "gate_rejections": rejected,
            "final_version": status.get("param_version"), "sync_every": sync_every,
            "method": status.get("method"), "upload_all": upload_all,
            # what an upload costs: the JSON bodies' bytes per sample sent, and the device's encoding of the pixels
            "body_bytes_per_upload": round(up.get("bytes_up", 0) / max(q.get("sent", 0), 1), 1),
            "uploads_sent": q.get("sent", 0), "uploads_rejected": up.get("rejected", 0),
            "upload_encoding": status.get("upload_encoding")}
