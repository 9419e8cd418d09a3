"""`edgeadapt demo`: the whole loop on the embedded default."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeadapt.cli.common import console


def demo(
    out: Path = typer.Option(Path("demo-output"), help="where the plot, summary and logs go"),
    per_corruption: int = typer.Option(2000, help="images per corruption streamed (2000 = the full stream)"),
    train_every: int = typer.Option(256, help="the cloud trains after this many new uploads"),
) -> None:
    """Run the whole loop on the embedded default: data, models, bundle (cached), cloud + device, stream.

    Ctrl-C stops everything cleanly.
    """
    from edgeadapt.demo import run_demo

    try:
        run_demo(out, per_corruption=per_corruption, train_every=train_every, console=console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; cloud and device stopped")
        raise typer.Exit(130) from None
