"""What the demo and the long cold-start steps print when no terminal is attached (a log file, CI, a pipe):
plain progress lines, and an end screen in words."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np

from edgeadapt.demo import _plain_line, _verdict
from edgeadapt.progress import PlainProgress


def test_plain_progress_prints_lines_as_it_goes():
    out = io.StringIO()
    with PlainProgress("train x", fmt="loss {loss:.2f}", every_s=0.0, stream=out) as bar:
        tid = bar.add_task("train", total=4, loss=1.0)
        for i in range(4):
            bar.update(tid, advance=1, loss=1.0 - i / 4)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[train x] 0/4 (0%)")
    assert "[train x] 4/4 (100%)" in lines[-1] and lines[-1].endswith("done") and "loss 0.25" in lines[-1]
    assert len(lines) == 6


def test_progress_without_a_terminal_is_plain(tmp_path):
    code = ("from edgeadapt.progress import progress, PlainProgress\n"
            "p = progress('x')\nprint(type(p).__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "PlainProgress", r.stderr


def test_demo_lines_and_verdict_say_what_happened():
    stats = {0: np.array([100, 30, 50, 60]), 1: np.array([100, 20, 40, 38])}
    line = _plain_line(200, 1000, stats, 3, {"queue": {"sent": 42}, "updater": {"counters": {"applied": 3}}}, 2.5)
    assert line.startswith("[demo] 200/1,000 images (20%)")
    assert "device-only 45.0%" in line and "full loop 49.0%" in line and "updates applied 3" in line
    assert "2.5 s behind" in line
    summary = {"acc": {"source": 0.25, "device_only": 0.45, "full_loop": 0.49}, "images": 200,
               "per_corruption": {"fog": {"source": 0.3, "device_only": 0.5, "full_loop": 0.6},
                                  "snow": {"source": 0.2, "device_only": 0.4, "full_loop": 0.38}},
               "uploads_sent": 42, "bytes_up": 2_000_000, "bytes_down": 30_000,
               "updates": {"applied": 3, "rolled_back": 1}, "pacing": "a camera at 150 fps", "stream_seconds": 60.0,
               "cloud_rounds": [{"candidate": 1, "status": "published", "seconds": 10.0},
                                {"candidate": 2, "status": "rejected", "seconds": 14.0},
                                {"candidate": 3, "status": "published", "seconds": 12.0}]}
    text = "\n".join(_verdict(summary, ["fog", "snow"]))
    flat = " ".join(text.split())
    assert "the cloud ran 3 training rounds (2 published), 12 s each on average" in flat
    assert "a new version every 30 s of stream" in flat
    assert "finished no training round" in " ".join(_verdict({**summary, "cloud_rounds": []}, ["fog", "snow"]))
    assert "+4.0 points" in text and "fog (+10.0)" in text and "Worse than the device alone on: snow" in text
    assert "42 of 200 images (21%" in text and "applied 3 signed updates" in text and "1 rolled back" in text
    assert "a camera at 150 fps" in text


def test_heartbeat_prints_until_started_then_stops(capsys):
    import time

    from edgeadapt.demo import _heartbeat

    with _heartbeat("starting", 0.05) as started:
        time.sleep(0.3)
        started.set()
        seen = capsys.readouterr().out.count("[demo] starting...")
        time.sleep(0.3)
    assert seen >= 2 and capsys.readouterr().out.count("[demo] starting...") == 0
    with _heartbeat("quiet", None) as started:  # a terminal: the live table shows progress, no lines
        time.sleep(0.1)
    assert "quiet" not in capsys.readouterr().out
