"""`edgeadapt device run|status|rollback` — the edge side. No torch is imported here."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import typer
from rich.markup import escape

from edgeadapt.cli.common import console, fail, plain, print_json

app = typer.Typer(help="Run and manage the edge adaptation daemon (torch-free).", no_args_is_help=True)


def _stream_npz(daemon, path: Path, batch: int, stop: threading.Event) -> None:
    import numpy as np

    log = logging.getLogger("edgeadapt.device")
    try:
        with np.load(path, allow_pickle=False) as z:
            x = z["x"]
    except Exception as exc:
        log.error("cannot read source %s: %s", path, exc)
        return
    correct = 0
    y = None
    try:
        with np.load(path, allow_pickle=False) as z:
            y = z["y"] if "y" in z else None
    except Exception:
        pass
    for i in range(0, len(x), batch):
        if stop.is_set():
            break
        res = daemon.predict(x[i : i + batch])
        if y is not None:
            correct += sum(int(r["class"] == t) for r, t in zip(res, y[i : i + batch], strict=True))
    n = min(len(x), i + batch) if len(x) else 0
    log.info("source %s done: %d samples%s", path, n, f", online accuracy {correct / max(n, 1):.4f}" if y is not None
             else "")


@app.command()
def run(
    bundle: Path = typer.Option(None, help="bundle directory from `edgeadapt export`"),
    state_dir: Path = typer.Option(None, help="where the daemon keeps its queue, versions and adaptation state"),
    cloud: str = typer.Option(None, "--cloud", help="cloud base URL (omit to run standalone)"),
    token: str = typer.Option(None, help="this device's token from `edgeadapt cloud devices add` (visible to "
                              "every local user in /proc/PID/cmdline: prefer --token-file or EDGEADAPT_TOKEN)"),
    token_file: Path = typer.Option(None, "--token-file", help="file holding the device token (keep it 0600)"),
    ca_file: Path = typer.Option(None, "--ca-file", help="PEM CA bundle that verifies an https:// cloud's "
                                 "certificate (default: the system trust store)"),
    listen: str = typer.Option(None, help="HOST:PORT for the HTTP API (default 127.0.0.1:8470)"),
    source: str = typer.Option(None, help="npz:PATH — also stream this file's x through the device"),
    method: str = typer.Option(None, help="adaptation method spec, e.g. ema_stats+lame_guard, norm_stats, none"),
    ood_detector: str = typer.Option(None, help="OOD detector from the bundle (energy, msp, rmds, vim, ...)"),
    threads: int = typer.Option(None, help="inference threads"),
    http: str = typer.Option(None, help="HTTP/1.1 implementation: auto (httptools when installed), httptools, h11"),
    no_updates: bool = typer.Option(False, "--no-updates", help="with --cloud: upload and heartbeat, take no "
                                    "updates (what a bundle without the cloud's public key needs)"),
    config: Path = typer.Option(None, help="TOML config ([device] table); flags > EDGEADAPT_* env > file"),
    log_level: str = typer.Option("info", help="debug, info, warning, error"),
) -> None:
    """Run the daemon: HTTP predict API, forward-only adaptation, OOD flags, selective upload, updates.

    SIGTERM/Ctrl-C saves the adaptation state and exits cleanly; a restart resumes it.
    """
    import uvicorn

    from edgeadapt.core.bundle import BundleError
    from edgeadapt.core.netguard import uvicorn_options
    from edgeadapt.core.serving import GracefulServer
    from edgeadapt.device.config import ConfigError, load_config
    from edgeadapt.device.daemon import DeviceDaemon
    from edgeadapt.device.server import create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))  # a line per poll hides errors
    flags = dict(bundle=bundle, state_dir=state_dir, cloud_url=cloud, token=token, token_file=token_file,
                 ca_file=ca_file, listen=listen, source=source, method=method, ood_detector=ood_detector,
                 threads=threads, http=http, updates=False if no_updates else None)
    try:
        cfg = load_config(flags, config)
    except ConfigError as exc:
        fail(str(exc))
    if token:
        logging.getLogger("edgeadapt.device").warning(
            "--token is visible to every local user in /proc/%d/cmdline; use --token-file or EDGEADAPT_TOKEN",
            os.getpid())
    if not Path(cfg.bundle).is_dir():
        fail(f"bundle {cfg.bundle} does not exist (export one: `edgeadapt export --arch NAME --out {cfg.bundle}`)")
    from edgeadapt.core.findings import fatal
    from edgeadapt.device.doctor import startup_findings

    refused = fatal(startup_findings(Path(cfg.bundle), cfg.cloud_url, cfg.token, cfg.updates))
    if refused:  # what can never work is refused now, not discovered in the logs later
        fail("will not start: " + "; ".join(f.message + (f" ({f.fix})" if f.fix else "") for f in refused))
    if cfg.source and not Path(cfg.source[4:]).is_file():
        fail(f"source file {cfg.source[4:]} does not exist")
    from edgeadapt.device.backend import single_threaded_blas

    single_threaded_blas()  # numpy's matrices here are small; the model has ONNX Runtime's pool (backend.py)
    try:
        daemon = DeviceDaemon(cfg)
    except (BundleError, ValueError) as exc:
        fail(str(exc))
    daemon.start()
    host, _, port = cfg.listen.rpartition(":")
    # serving (issue 16): uvloop when installed (uvicorn's "auto"); no proxy-header rewriting (the device is
    # not behind a proxy, and the client address its admin routes check stays the socket's) and no Server header
    server = GracefulServer(uvicorn.Config(create_app(daemon), host=host, port=int(port), log_level="warning",
                                           access_log=False, loop="auto", proxy_headers=False, server_header=False,
                                           **uvicorn_options(cfg.net_limits(), http=cfg.http)))
    stop = threading.Event()
    if cfg.source:
        threading.Thread(target=_stream_npz, args=(daemon, Path(cfg.source[4:]), cfg.source_batch, stop),
                         daemon=True, name="npz-source").start()
    console.print(f"[green]edgeadapt device[/] {escape(daemon.manifest.model_name)} v{daemon.engine.param_version} "
                  f"listening on http://{cfg.listen}  (cloud: {cfg.cloud_url or 'standalone'})")
    try:
        server.run()
    finally:
        stop.set()
        daemon.stop()
        console.print("[green]stopped[/]; adaptation state saved")


@app.command()
def status(
    url: str = typer.Option("http://127.0.0.1:8470", help="the running daemon's base URL"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Show a running daemon's status (version in use, queue, uploads, errors)."""
    import httpx

    try:
        st = httpx.get(f"{url.rstrip('/')}/v1/status", timeout=5).json()
    except httpx.HTTPError as exc:
        fail(f"cannot reach the daemon at {url}: {exc}")
    if json_out:
        print_json(st)
        return
    # the daemon's answer quotes its clients' and the cloud's messages: printed as text, never as markup
    console.print(plain(f"model {st['model']}  version {st['param_version']}  samples {st['samples']}  "
                        f"ood {st['ood_samples']}  uptime {st['uptime_s']}s", 1000))
    console.print("queue:", plain(st["queue"], 2000))
    console.print("uploads:", plain(st.get("uploads", "?")))
    if st.get("errors"):
        console.print("[red]errors:[/]", plain(st["errors"], 4000))
    import time

    for key, d in (st.get("degraded") or {}).items():  # what makes /healthz say degraded, with since and count
        since = d.get("since")
        age = f"{time.time() - since:.0f} s" if isinstance(since, (int, float)) else "?"
        console.print("[yellow]degraded:[/]", plain(f"{key}: {d.get('reason')} (for {age}, {d.get('count')} times)",
                                                    1000))


@app.command()
def rollback(
    state_dir: Path = typer.Option(..., help="the daemon's state directory"),
    to: int = typer.Option(None, "--to", help="version to go back to (default: the one before the current)"),
    bundle: Path = typer.Option(..., help="the bundle (version 0)"),
    url: str = typer.Option(None, help="a running daemon's URL: roll back live instead of on disk"),
) -> None:
    """Roll back to an earlier parameter version (by hand); the daemon picks it up live or at restart."""
    if url:
        import httpx

        r = httpx.post(f"{url.rstrip('/')}/v1/admin/rollback", json={"to": to}, timeout=10)
        if r.status_code != 200:
            fail(f"rollback refused: {r.text}")
        console.print(r.json())
        return
    from edgeadapt.core.bundle import Bundle
    from edgeadapt.device.version_manager import RollbackRefused, VersionManager
    from edgeadapt.device.versions import VersionStore

    # no engine: the switch, the pin and the block list are recorded on disk, and the daemon runs them at start
    manager = VersionManager(VersionStore(state_dir, Bundle(bundle).params))
    try:
        out = manager.switch_by_hand(to, "manual rollback (offline)")
    except RollbackRefused as exc:
        fail(str(exc))
    cur, to, through = out["from"], out["to"], out["pinned_through"]
    console.print(f"rolled back {cur} -> {to}" + (f"; versions {to + 1}..{through} are not taken again until "
                                                   "the cloud assigns a newer one" if through is not None else ""))
