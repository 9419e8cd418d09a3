"""`edgeadapt demo`: the whole loop on the embedded default, one command.

Prepares data, trains source and teacher models, exports the bundle (all cached), starts the cloud service
and the device daemon as separate processes, streams FMNIST-C through the device over HTTP (asynchronous
mode: the device uploads and polls for updates in the background, the cloud trains on its own trigger),
and shows a live table per corruption: source vs device-only vs the full loop. Writes a PNG of accuracy
along the stream and a JSON summary.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table


def _table(names, stats, version, status) -> Table:
    t = Table(title=f"FMNIST-C stream — full loop runs parameter version {version}")
    for col in ("corruption", "n", "source", "device-only", "full loop"):
        t.add_column(col, justify="right" if col != "corruption" else "left")
    tot = np.zeros(4)
    for i, name in enumerate(names):
        s = stats.get(i)
        if s is None:
            continue
        n = s[0]
        t.add_row(name, str(int(n)), f"{s[1] / n:.1%}", f"{s[2] / n:.1%}", f"{s[3] / n:.1%}")
        tot += s
    if tot[0]:
        t.add_row("[bold]all", str(int(tot[0])), f"[bold]{tot[1] / tot[0]:.1%}", f"[bold]{tot[2] / tot[0]:.1%}",
                  f"[bold]{tot[3] / tot[0]:.1%}")
    q, up = status.get("queue", {}), status.get("uploader", {})
    upd = status.get("updater", {}).get("counters", {})
    t.caption = (f"uploads sent {q.get('sent', 0)}  bytes up {up.get('bytes_up', 0):,}  bytes down "
                 f"{upd.get('bytes_down', 0):,}  updates applied {upd.get('applied', 0)}  rolled back "
                 f"{upd.get('rolled_back', 0)}")
    return t


# The pacing (docs/BENCHMARKS.md, "The demo"; chosen by time, not by the stream's labels): the warm demo must fit
# 3 minutes, so the stream lasts 150 s: 1,000 images of each of the 15 corruptions at 100 fps, 10 s per domain.
# The cloud's round budget is the trainer's default (at least 30 steps), started every 128 new uploads (~4.5 s of
# camera at the measured ~28% upload rate) on at most the 256 newest, so a round never grows when the cloud falls
# behind: on 2 shared cores a round then takes ~12 s and a domain sees about one new version.
DEFAULT_FPS = 100.0
DEFAULT_PER_CORRUPTION = 1000
DEFAULT_TRAIN_EVERY = 128
DEFAULT_ROUND_STEPS = 30  # the trainer's min_steps_per_round
DEFAULT_ROUND_UPLOADS = 256  # the trainer's max_samples_per_round (its default 1024 lets a late round grow)
PLAIN_EVERY_S = 5.0


def _plain_line(done: int, total: int, stats: dict, version: int, status: dict, behind: float) -> str:
    tot = sum(stats.values()) if stats else np.zeros(4)
    acc = (f"source {tot[1] / tot[0]:.1%} · device-only {tot[2] / tot[0]:.1%} · full loop {tot[3] / tot[0]:.1%}"
           if tot[0] else "no images scored yet")
    upd = status.get("updater", {}).get("counters", {})
    return (f"[demo] {done:,}/{total:,} images ({done / max(total, 1):.0%}) · {acc} · uploads "
            f"{status.get('queue', {}).get('sent', 0):,} · updates applied {upd.get('applied', 0)} (running v{version})"
            + (f" · {behind:.1f} s behind the camera" if behind > 1 else ""))


@contextmanager
def _heartbeat(what: str, every_s: float | None) -> Iterator[threading.Event]:
    """A plain line every ``every_s`` (None: nothing) until the event it yields is set, or the block ends: the
    cloud and the device take ~15 s to start, and a log must not go quiet for that long."""
    done, t0 = threading.Event(), time.monotonic()

    def beat() -> None:
        while not done.wait(every_s):
            print(f"[demo] {what}... {time.monotonic() - t0:.0f}s", flush=True)

    thread = threading.Thread(target=beat, daemon=True) if every_s else None
    if thread is not None:
        thread.start()
    try:
        yield done
    finally:
        done.set()


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in the environment the cloud and device processes inherit, restored after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _ReferenceRows:
    """The table's source and device-only rows, scored on a worker thread: the paced loop only sends frames to
    the device and never waits for them (their cost would put the camera behind; with the device's method
    doubling it the stream fell 41 s behind). Each scores the same batches the device got, in order, on one
    ONNX Runtime thread that sleeps between runs, so the device and the cloud keep the cores."""

    def __init__(self, bundle, method: str) -> None:
        import queue

        from edgeadapt.device.engine import AdaptiveEngine, EngineConfig

        quiet = {"threads": 1, "ort_spinning": False}
        self.source = AdaptiveEngine(bundle, EngineConfig(method="none", **quiet))
        self.device_only = AdaptiveEngine(bundle, EngineConfig(method=method, **quiet))
        self.stats: dict[int, np.ndarray] = {}  # per corruption: images, source / device-only / loop hits
        self.curve: list[tuple] = []  # per batch: images streamed, the three accuracies, the loop's version
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="demo-reference-rows", daemon=True)
        self._thread.start()

    def put(self, xb: np.ndarray, yb: np.ndarray, db: np.ndarray, loop_pred: np.ndarray, version: int,
            start: int) -> None:
        if self._error is not None:
            raise RuntimeError("scoring the source and device-only rows failed") from self._error
        self._queue.put((xb, yb, db, loop_pred, version, start))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            xb, yb, db, loop_pred, version, start = item
            try:
                src_pred = self.source.process(xb).pred
                dev_pred = self.device_only.process(xb).pred
            except BaseException as e:  # noqa: BLE001 - reported to the paced loop by put() and finish()
                self._error = e
                return
            with self._lock:
                for d in np.unique(db):  # a batch can straddle two corruptions
                    m = db == d
                    row = self.stats.setdefault(int(d), np.zeros(4))
                    row += [m.sum(), (src_pred == yb)[m].sum(), (dev_pred == yb)[m].sum(),
                            (loop_pred == yb)[m].sum()]
                self.curve.append((start + len(xb), (src_pred == yb).mean(), (dev_pred == yb).mean(),
                                   (loop_pred == yb).mean(), version))

    def snapshot(self) -> dict[int, np.ndarray]:
        with self._lock:
            return {k: v.copy() for k, v in self.stats.items()}

    def finish(self) -> None:
        """Wait for the batches still queued (the stream has ended)."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise RuntimeError("scoring the source and device-only rows failed") from self._error


def _note_round(rounds: dict[int, dict], c: httpx.Client, p: dict, t: float, images: int) -> None:
    """Remember the cloud's newest training round (when it ended, on the stream's clock, and what it did)."""
    try:
        r = c.get(f"{p['cloud']}/v1/admin/status", headers={"Authorization": f"Bearer {p['admin']}"}, timeout=10)
        last = (r.json().get("trainer") or {}).get("last_result") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return
    if last and last.get("candidate_id") is not None and last["candidate_id"] not in rounds:
        rounds[last["candidate_id"]] = {"candidate": last["candidate_id"], "status": last.get("status"),
                                        "version": last.get("version"), "seconds": round(last.get("seconds", 0), 1),
                                        "uploads": last.get("samples"), "steps": last.get("steps"),
                                        "seen_at_s": round(t, 1), "seen_at_image": images}


def _rounds_line(rounds: list[dict], stream_s: float) -> str:
    """What the cloud managed, in words: rounds, how long one took, how often a version was published."""
    if not rounds:
        return "the cloud finished no training round during the stream"
    pub = [r for r in rounds if r["status"] == "published"]
    mean_s = sum(r["seconds"] for r in rounds) / len(rounds)
    return (f"the cloud ran {len(rounds)} training rounds ({len(pub)} published), {mean_s:.0f} s each on average: "
            f"a new version every {stream_s / max(len(pub), 1):.0f} s of stream")


def _verdict(summary: dict, names: list[str]) -> list[str]:
    """The end screen in words a new user understands."""
    a = summary["acc"]
    gain = (a["full_loop"] - a["device_only"]) * 100
    per = summary["per_corruption"]
    deltas = sorted(((v["full_loop"] - v["device_only"]) * 100, k) for k, v in per.items())
    best = [f"{k.replace('_', ' ')} ({d:+.1f})" for d, k in reversed(deltas[-3:]) if d > 0]
    worse = [k.replace("_", " ") for d, k in deltas if d < -0.5]
    up = summary["updates"]
    lines = [
        f"The full loop (device + cloud) scored {a['full_loop']:.1%} against {a['device_only']:.1%} for the device "
        f"adapting alone ({gain:+.1f} points) and {a['source']:.1%} for the unadapted model.",
        ("It helped most on " + ", ".join(best) + " points." if best else "No corruption gained from the cloud.")
        + (f" Worse than the device alone on: {', '.join(worse)}." if worse else ""),
        f"The device uploaded {summary['uploads_sent']:,} of {summary['images']:,} images "
        f"({summary['uploads_sent'] / max(summary['images'], 1):.0%}, {summary['bytes_up'] / 1e6:.1f} MB up) and "
        f"applied {int(up.get('applied', 0))} signed updates ({summary['bytes_down'] / 1e3:.0f} kB down; "
        f"{int(up.get('rolled_back', 0))} rolled back by its own watch).",
        f"Pacing: {summary['pacing']}; {_rounds_line(summary['cloud_rounds'], summary['stream_seconds'])}.",
    ]
    return lines


def run_demo(out: Path, per_corruption: int = DEFAULT_PER_CORRUPTION, batch: int = 64,
             train_every: int = DEFAULT_TRAIN_EVERY, fps: float = DEFAULT_FPS, round_steps: int = DEFAULT_ROUND_STEPS,
             round_uploads: int = DEFAULT_ROUND_UPLOADS, console: Console | None = None,
             assets: tuple[Path, str, Path, Path] | None = None, method: str | None = None) -> dict:
    """``fps``: the camera the stream stands for (frames per second, sent to the device in batches of ``batch``);
    0 streams as fast as the device answers. ``round_steps`` / ``round_uploads``: the cloud's budget per round
    (at least this many SGD steps; at most this many newest uploads, older ones go to replay). ``assets``:
    (stream, teacher arch, teacher weights, bundle) instead of the embedded default's, e.g. the dev holdout's on
    which the pacing is chosen (scripts/dev_holdout.py demo). ``method``: the device's adaptation method, in the
    loop and in the device-only row (default: ``DEFAULT_METHOD``, what a daemon runs)."""
    from edgeadapt.assets import cloud_home, default_bundle, default_stream, default_teacher
    from edgeadapt.bench.loop import loop_processes
    from edgeadapt.core.bundle import Bundle
    from edgeadapt.datasets.fmnist import load_stream
    from edgeadapt.device.config import DEFAULT_METHOD

    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    if assets is None:
        stream_path = default_stream(console)
        teacher, teacher_w = default_teacher(console)
        bundle_dir = default_bundle(console)
    else:
        stream_path, teacher, teacher_w, bundle_dir = assets
    home = cloud_home(console)
    data = load_stream(stream_path)
    x, y, dom = data["x"], data["y"], data["corruption"]
    names = [str(s) for s in data["corruption_names"]]
    keep = np.concatenate([np.flatnonzero(dom == d)[:per_corruption] for d in np.unique(dom)])
    x, y, dom = x[keep], y[keep], dom[keep]
    bundle = Bundle(bundle_dir)
    method = method or DEFAULT_METHOD
    reference = _ReferenceRows(bundle, method)
    pacing = (f"a camera at {fps:g} fps, its frames sent in batches of {batch} (one every {batch / fps:.2f} s); "
              f"the cloud trains a round (>= {round_steps} steps, <= {round_uploads} newest uploads) after every "
              f"{train_every} new uploads" if fps > 0 else
              f"as fast as the device answers, in batches of {batch}; the cloud trains after every {train_every} "
              "new uploads")
    console.print(f"[cyan]•[/] starting cloud and device; streaming {len(x):,} images: {pacing}")
    stats, curve = reference.stats, reference.curve
    work = out / "run"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    version, status = 0, {}
    rounds: dict[int, dict] = {}  # the cloud's training rounds, by candidate id, as its admin status reports them
    interactive = console.is_terminal
    behind = 0.0
    budget = {"EDGEADAPT_CLOUD_TRAINER__MIN_STEPS_PER_ROUND": str(round_steps),
              "EDGEADAPT_CLOUD_TRAINER__MAX_SAMPLES_PER_ROUND": str(round_uploads)}
    starting = _heartbeat("starting the cloud and the device", None if interactive else PLAIN_EVERY_S)
    live = Live(_table(names, stats, version, status), console=console, refresh_per_second=4) \
        if interactive else None
    try:
        with _environment(budget), starting as started, \
                loop_processes(bundle_dir, teacher, teacher_w, home, work, trainer_auto=True, poll_s=1.0,
                               log_dir=out, train_every=train_every, long_poll_s=20.0, method=method) as p, \
                httpx.Client(timeout=120) as c:
            started.set()
            if live is not None:
                live.start()
            t0, last_line = time.monotonic(), 0.0
            for bi, i in enumerate(range(0, len(x), batch)):
                xb, yb, db = x[i : i + batch], y[i : i + batch], dom[i : i + batch]
                if fps > 0:  # the batch is complete when its last frame has arrived
                    due = t0 + (i + len(xb)) / fps
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    behind = max(0.0, -wait)
                buf = io.BytesIO()
                np.save(buf, xb)
                r = c.post(f"{p['device']}/v1/predict", content=buf.getvalue(),
                           headers={"content-type": "application/x-npy"})
                r.raise_for_status()
                body = r.json()
                version = body["param_version"]
                reference.put(xb, yb, db, np.array([q["class"] for q in body["predictions"]]), version, i)
                if bi % 5 == 0:
                    status = c.get(f"{p['device']}/v1/status").json()
                    _note_round(rounds, c, p, time.monotonic() - t0, i + len(xb))
                    if live is not None:
                        live.update(_table(names, reference.snapshot(), version, status))
                if live is None and time.monotonic() - last_line >= PLAIN_EVERY_S:
                    last_line = time.monotonic()
                    print(_plain_line(i + len(xb), len(x), reference.snapshot(), version, status, behind),
                          flush=True)
            stream_s = time.monotonic() - t0
            status = c.get(f"{p['device']}/v1/status").json()
            _note_round(rounds, c, p, stream_s, len(x))
        # the cloud and the device are stopped: the cores are the reference rows' for their last queued batches
        with _heartbeat("scoring the last batches on the source and device-only models",
                        None if interactive else PLAIN_EVERY_S):
            reference.finish()
        if live is not None:
            live.update(_table(names, stats, version, status))
    finally:
        if live is not None:
            live.stop()
    if live is None:
        console.print(_table(names, stats, version, status))
    tot = sum(stats.values())
    summary = {
        "images": int(tot[0]), "seconds": round(time.time() - t_start, 1), "stream_seconds": round(stream_s, 1),
        "fps": fps, "batch": batch, "train_every": train_every, "round_steps": round_steps,
        "round_uploads": round_uploads, "per_corruption_images": per_corruption, "pacing": pacing,
        "method": method,
        "acc": {"source": tot[1] / tot[0], "device_only": tot[2] / tot[0], "full_loop": tot[3] / tot[0]},
        "per_corruption": {names[k]: {"source": v[1] / v[0], "device_only": v[2] / v[0], "full_loop": v[3] / v[0]}
                           for k, v in sorted(stats.items())},
        "uploads_sent": status.get("queue", {}).get("sent", 0),
        "bytes_up": status.get("uploader", {}).get("bytes_up", 0),
        "bytes_down": status.get("updater", {}).get("counters", {}).get("bytes_down", 0),
        "final_version": version,
        "updates": status.get("updater", {}).get("counters", {}),
        "cloud_rounds": sorted(rounds.values(), key=lambda r: r["candidate"]),
        "update_at_images": [int(n) for (n, *_r, v), prev in zip(curve[1:], curve[:-1], strict=True) if v != prev[4]],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    _plot(np.array(curve), names, per_corruption, out / "accuracy.png")
    console.print()
    for line in _verdict(summary, names):
        console.print(line, highlight=False, markup=False)
    console.print(f"[green]done[/] in {summary['seconds']}s (stream {summary['stream_seconds']}s). Plot: "
                  f"{out / 'accuracy.png'}; summary: {out / 'summary.json'}; logs: {out}/cloud.log, {out}/device.log")
    return summary


def _plot(curve: np.ndarray, names: list[str], per: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.5))
    k = 8
    kernel = np.ones(k) / k
    for col, label in ((1, "source"), (2, "device-only"), (3, "full loop")):
        ax.plot(curve[:, 0], np.convolve(curve[:, col], kernel, mode="same"), label=label)
    versions = curve[:, 4]
    for n in curve[1:, 0][np.diff(versions) != 0]:
        ax.axvline(n, color="tab:green", lw=0.6, ls=":", alpha=0.7)
    if (np.diff(versions) != 0).any():
        ax.plot([], [], color="tab:green", lw=0.6, ls=":", label="update applied")
    for j, name in enumerate(names):
        ax.axvline(j * per, color="0.85", lw=0.8)
        ax.text(j * per + per * 0.05, 0.02, name.replace("_", " "), rotation=90, fontsize=7, color="0.4")
    ax.set_xlabel("images streamed")
    ax.set_ylabel(f"online accuracy (moving avg of {k} batches)")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right")
    ax.set_title("edgeadapt demo: FMNIST-C continual stream")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
