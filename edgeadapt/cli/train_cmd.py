"""`edgeadapt train`: train a reference source or teacher model on clean Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeadapt.cli.common import console, fail, print_json

TRAINABLE = ("resnet_edge", "resnet_teacher", "mobilenet_tiny", "vit_tiny")


def train(
    arch: str = typer.Option(
        ..., "--arch", help=f"Reference architecture: {', '.join(TRAINABLE)} (resnet_teacher = the cloud's teacher)."
    ),
    out: Path = typer.Option(..., "--out", help="Output weights file (.safetensors)."),
    epochs: float | None = typer.Option(
        None, "--epochs", help="Epochs over the training set, may be fractional (default: per arch)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for init, batch order and augmentation."),
    augment: bool | None = typer.Option(
        None, "--augment/--no-augment",
        help="Generic augmentations (crop, flip, jitter, blur, noise, erasing); default: on for the teacher only.",
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Train on the first N images (quick tests)."),
    test_limit: int | None = typer.Option(
        None, "--test-limit", min=1, help="Evaluate on the first N test images (default: all 10,000)."
    ),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default: per arch)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Batch size (default: per arch, 128; 64 for the teacher)."),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="torch threads (default: $EDGEADAPT_THREADS or the CPU count)."
    ),
    force: bool = typer.Option(False, "--force", help="Retrain even if --out holds a model with this configuration."),
    json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
) -> None:
    """Train a reference architecture on clean Fashion-MNIST (padded to 32x32) and report clean test accuracy.

    Writes safetensors weights with metadata (arch, clean_acc, epochs, ...). If --out already holds weights
    trained with the same configuration, training is skipped (use --force to retrain).
    """
    if arch not in TRAINABLE:
        fail(f"unknown arch {arch!r}; valid: {', '.join(TRAINABLE)}")
    if out.suffix.lower() != ".safetensors":
        fail(f"--out must end in .safetensors, not {out.name!r}")
    from edgeadapt.datasets import FMNISTMissingError
    from edgeadapt.models import training

    try:
        cfg = training.resolve_config(arch, epochs, lr, augment, batch_size, seed, limit)
    except ValueError as exc:
        fail(str(exc))
    if out.exists() and not force:
        try:
            meta = training.read_metadata(out)
        except Exception as exc:  # unreadable file: say so, do not overwrite silently
            fail(f"{out} exists but is not readable weights ({exc}); use --force to overwrite")
        if training.metadata_matches(meta, cfg):
            result = {**meta, "path": str(out), "cached": True}
            if json_out:
                print_json(result)
            else:
                console.print(
                    f"{out} already holds {arch} trained with this configuration "
                    f"(clean acc {meta.get('clean_acc', float('nan')):.4f}); skipping (use --force to retrain)."
                )
            return
        console.print(f"[yellow]{out} exists with another configuration; retraining and overwriting it.[/]")
    try:
        result = training.train_model(
            arch, out, epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"], seed=seed,
            augment=cfg["augment"], limit=limit, test_limit=test_limit, progress=not json_out,
            threads=threads,
        )
    except FMNISTMissingError as exc:
        fail(str(exc))
    except (ValueError, OSError) as exc:
        fail(f"training failed: {exc}")
    result["cached"] = False
    if json_out:
        print_json(result)
    else:
        console.print(
            f"{arch}: clean test accuracy {result['clean_acc']:.4f} ({result['test_n']} images) after "
            f"{result['epochs']:g} epoch(s) on {result['train_n']} images, {result['seconds']:.0f} s -> {out}"
        )
