"""`edgeadapt demo`, the README's first command, run as a user runs it: a real process with its output going
to a file (no terminal), on the embedded default (built into the cache on first use: slow the first time)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_demo_runs_the_loop_and_says_what_happened(tmp_path):
    out, log = tmp_path / "demo-out", tmp_path / "demo.log"
    with open(log, "wb") as f:  # a file, not a terminal: the plain progress lines, not the live table
        r = subprocess.run([sys.executable, "-m", "edgeadapt", "demo", "--out", str(out), "--per-corruption", "128",
                            "--fps", "600", "--train-every", "64", "--round-steps", "4"],
                           stdout=f, stderr=subprocess.STDOUT, timeout=1700)
    text = log.read_text()
    assert r.returncode == 0, text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 15 * 128 and summary["fps"] == 600
    assert set(summary["acc"]) == {"source", "device_only", "full_loop"}
    assert all(0.0 <= v <= 1.0 for v in summary["acc"].values())
    assert summary["uploads_sent"] > 0 and summary["bytes_up"] > 0
    assert summary["cloud_rounds"], "the cloud ran no round: the loop never trained"
    assert summary["round_steps"] == 4 and all(r["steps"] >= 4 for r in summary["cloud_rounds"])
    assert (out / "accuracy.png").stat().st_size > 10_000
    progress = [line for line in text.splitlines() if line.startswith("[demo] ")]
    assert progress and "images" in progress[-1] and "full loop" in progress[-1]
    for words in ("The full loop (device + cloud) scored", "Pacing: a camera at 600 fps", "training rounds",
                  "signed updates"):
        assert words in " ".join(text.split()), words  # rich wraps long lines: compare with spaces normalized
