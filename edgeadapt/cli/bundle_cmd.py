"""`edgeadapt bundle inspect|verify`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from edgeadapt.cli.common import console, fail, plain, print_json

app = typer.Typer(help="Inspect and verify exported bundles.", no_args_is_help=True)


@app.command()
def inspect(path: Path = typer.Argument(..., help="bundle directory"),
            json_out: bool = typer.Option(False, "--json", help="print the manifest as JSON")) -> None:
    """Show a bundle's manifest: model, input, outputs, adaptable tensors, files."""
    from rich.table import Table

    from edgeadapt.core.bundle import BundleError, read_manifest

    try:
        m = read_manifest(path)
    except BundleError as exc:
        fail(str(exc))
    if json_out:
        print_json(m.model_dump())
        return
    # a bundle is data: its strings are printed as text, never as markup
    console.print(f"[bold]{escape(m.model_name)}[/] v{escape(str(m.model_version))}  arch={escape(m.arch)}  "
                  f"input={m.input.shape} "
                  f"classes={m.num_classes} features={m.feature_dim}")
    kinds: dict[str, int] = {}
    for t in m.adaptable:
        kinds[t.kind] = kinds.get(t.kind, 0) + 1
    console.print(f"adaptable tensors: {kinds}; BatchNorm layers: {len(m.norm_layers)}; adapters: {m.adapters or 'none'}")
    table = Table("file", "sha256")
    for f, h in m.files.items():
        table.add_row(f, h[:16] + "…")
    console.print(table)
    console.print(f"cloud key: {'set' if m.cloud_public_key else 'none'}; profile: {m.profile.get('name')}")
    for w in [*m.warnings, *_parity_warnings(path, m)]:
        console.print("[yellow]warning[/]", plain(w, 2000))


#: a recorded parity difference above this share of its tolerance is worth a warning: little margin is left for
#: another CPU's or runtime version's rounding
PARITY_MARGIN_WARN = 0.5


def _parity_warnings(path: Path, m) -> list[str]:
    """The export's worst |Δlogit| against the tolerance it was checked with (relative to the reference logits'
    scale, export/verify.py), as a warning when the margin is thin; nothing when the bundle has no reference."""
    import numpy as np
    from safetensors import safe_open

    from edgeadapt.export.verify import relative_tolerance

    tol = m.profile.get("parity_tolerance")
    calib = Path(path) / "calib.safetensors"
    if not tol or not calib.is_file():
        return []
    with safe_open(str(calib), "np") as f:
        if "parity.logits" not in f.keys():
            return []
        ref = f.get_tensor("parity.logits")
    limit = relative_tolerance(float(tol), np.asarray(ref))
    d = float(m.parity_max_abs_logit_diff)
    if d <= PARITY_MARGIN_WARN * limit:
        return []
    return [f"parity margin is thin: max |Δlogit| {d:.3g} at export is {d / limit:.0%} of the tolerance {limit:.3g} "
            f"({float(tol):g} x max(1, max|logit|)); run `edgeadapt bundle verify` on the device's runtime"]


@app.command()
def verify(path: Path = typer.Argument(..., help="bundle directory"),
           no_parity: bool = typer.Option(False, "--no-parity", help="only check file hashes"),
           student_model: str = typer.Option(None, "--student-model", help="the module:factory the cloud will be "
                                             "given for a bundle whose arch is not registered"),
           json_out: bool = typer.Option(False, "--json")) -> None:
    """Verify every file's sha256, that the cloud would build the architecture the manifest names (registered,
    or --student-model given), and both graphs' parity against the logits recorded at export.

    Exits non-zero, naming the file, graph or architecture, when anything is wrong.
    """
    from edgeadapt.export.verify import verify_bundle

    res = verify_bundle(path, check_parity=not no_parity, student_model=student_model)
    if json_out:
        print_json(res)
    elif res["ok"]:
        console.print("[green]ok[/]", plain(f"{path}  parity: {res['parity']}", 2000))
    else:
        for p in res["problems"]:
            console.print("[red]FAIL[/]", plain(p, 2000))
    if not res["ok"]:
        raise typer.Exit(1)
