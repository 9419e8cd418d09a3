"""`edgeadapt data ...` commands."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from edgeadapt.cli.common import fail, print_json

app = typer.Typer(help="Build benchmark data (the FMNIST-C stream, or a stream from your own image folders).",
                  no_args_is_help=True)


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


@app.command("folder")
def folder(
    root: Path = typer.Argument(..., help="image-folder tree: one subfolder of images per class (names sorted = labels)"),
    out: Path = typer.Option(..., "--out", help="the stream .npz to write (labels one per line beside it: "
                                                "F.labels.txt)"),
    size: str | None = typer.Option(None, "--size", help="H,W every image is resized to (default: the first image's)"),
    gray: bool | None = typer.Option(None, "--gray/--rgb", help="colour mode (default: grey when every image is "
                                                                "grey, else RGB)"),
    corrupt: str | None = typer.Option(None, "--corrupt", help="domains: comma-separated corruption:severity of the "
                                                               "benchmark's (e.g. gaussian_noise:3,fog:5); default: "
                                                               "one clean domain"),
    seed: int = typer.Option(0, "--seed", help="seed of the shuffle and the corruptions"),
    json_out: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Build a benchmark stream from your own images (for `bench accuracy|runtime|update --data`; docs/BYO.md)."""
    from edgeadapt.datasets.folder import build_folder_stream, parse_corruptions

    try:
        hw = None
        if size is not None:
            parts = [p.strip() for p in size.split(",")]
            if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(f"--size {size!r}: give H,W, e.g. 224,224")
            hw = (int(parts[0]), int(parts[1]))
        res = build_folder_stream(root, out, size=hw, mode=None if gray is None else ("L" if gray else "RGB"),
                                  corruptions=parse_corruptions(corrupt), seed=seed)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    if json_out:
        print_json(res)
    else:
        typer.echo(f"stream of {res['n']} images ({res['images']} x {len(res['domains'])} domains, "
                   f"{res['shape']}, {len(res['classes'])} classes): {res['path']}; labels: {res['labels_file']}")
