"""`edgeadapt data ...` commands."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from edgeadapt.cli.common import fail, print_json

app = typer.Typer(help="Build benchmark data (FMNIST-C stream).", no_args_is_help=True)


@app.command("fmnist-c")
def fmnist_c(
    out: Path | None = typer.Option(
        None, "--out", help="Output folder (default: <cache>/data; cache = $EDGEADAPT_CACHE or ~/.cache/edgeadapt)."
    ),
    severity: int = typer.Option(5, "--severity", min=1, max=5, help="Corruption severity, 1..5."),
    per_corruption: int = typer.Option(
        2000, "--per-corruption", min=1, max=10000, help="First N test images per corruption."
    ),
    corruptions: str | None = typer.Option(
        None, "--corruptions", help="Comma-separated subset, in stream order (default: all 15 in ImageNet-C order)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives a bit-identical stream."),
    workers: int | None = typer.Option(
        None, "--workers", min=1, help="Worker processes (default: CPU count; the result does not depend on it)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print {path, n, seconds, cached} as JSON."),
) -> None:
    """Build the FMNIST-C continual stream (DESIGN.md §10): Fashion-MNIST test images, padded to 32x32, each
    of the common corruptions of imagecorruptions-imaug at one severity, concatenated into one stream.

    Writes <out>/fmnist_c_s{sev}_n{n}_seed{seed}_{hash}.npz (x uint8 [M,1,32,32], y, corruption,
    corruption_names) plus clean fmnist_train.npz / fmnist_test.npz. A build that exists is reused.
    """
    from edgeadapt.datasets import fmnist

    names = list(fmnist.CORRUPTIONS)
    if corruptions is not None:
        names = [c.strip() for c in corruptions.split(",") if c.strip()]
        try:
            fmnist.validate_corruptions(names)
        except ValueError as exc:
            fail(str(exc))
    out_dir = out if out is not None else fmnist.default_cache_dir() / "data"
    cached = (out_dir / fmnist.stream_filename(severity, per_corruption, names, seed)).exists()
    t0 = time.perf_counter()
    try:
        path = fmnist.build_fmnist_c(
            out_dir,
            severity=severity,
            per_corruption=per_corruption,
            corruptions=names,
            seed=seed,
            progress=not json_out,
            workers=workers,
        )
    except fmnist.FMNISTMissingError as exc:
        fail(str(exc))
    except (ValueError, OSError) as exc:
        fail(f"building FMNIST-C failed: {exc}")
    seconds = time.perf_counter() - t0
    n = len(names) * per_corruption
    if json_out:
        print_json({"path": str(path), "n": n, "seconds": round(seconds, 3), "cached": cached})
    else:
        how = "cached, reused" if cached else f"built in {seconds:.1f} s"
        typer.echo(f"FMNIST-C stream: {n} images ({len(names)} corruptions x {per_corruption}), {how}: {path}")
