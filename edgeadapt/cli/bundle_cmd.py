"""`edgeadapt bundle inspect|verify`."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeadapt.cli.common import console, fail, print_json

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
    console.print(f"[bold]{m.model_name}[/] v{m.model_version}  arch={m.arch}  input={m.input.shape} "
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


@app.command()
def verify(path: Path = typer.Argument(..., help="bundle directory"),
           no_parity: bool = typer.Option(False, "--no-parity", help="only check file hashes"),
           json_out: bool = typer.Option(False, "--json")) -> None:
    """Verify every file's sha256 and both graphs' parity against the logits recorded at export.

    Exits non-zero, naming the file or graph, when anything differs.
    """
    from edgeadapt.export.verify import verify_bundle

    res = verify_bundle(path, check_parity=not no_parity)
    if json_out:
        print_json(res)
    elif res["ok"]:
        console.print(f"[green]ok[/] {path}  parity: {res['parity']}")
    else:
        for p in res["problems"]:
            console.print(f"[red]FAIL[/] {p}")
    if not res["ok"]:
        raise typer.Exit(1)
