"""`edgeadapt bundle inspect` shows what export found weak: the manifest's warnings, and a thin parity margin (the
export's worst |Δlogit| against its tolerance, relative to the reference logits' scale)."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from edgeadapt.cli.bundle_cmd import PARITY_MARGIN_WARN, app


def _inspect(path) -> str:
    r = CliRunner().invoke(app, ["inspect", str(path)], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    return r.output


def test_inspect_prints_export_warnings_and_a_thin_parity_margin(tiny_bundle, tmp_path):
    out = _inspect(tiny_bundle)
    assert "parity margin" not in out  # a fresh export: far inside its tolerance
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    import numpy as np
    from safetensors.numpy import load_file

    scale = max(1.0, float(np.abs(load_file(str(b / "calib.safetensors"))["parity.logits"]).max()))
    limit = m["profile"]["parity_tolerance"] * scale
    m["parity_max_abs_logit_diff"] = 0.9 * limit
    m["warnings"] = ["calibrated on few samples"]
    (b / "manifest.json").write_text(json.dumps(m))
    out = _inspect(b)
    assert "calibrated on few samples" in out
    assert "parity margin is thin" in out and "90%" in out
    m["parity_max_abs_logit_diff"] = 0.9 * PARITY_MARGIN_WARN * limit
    (b / "manifest.json").write_text(json.dumps(m))
    assert "parity margin" not in _inspect(b)
