"""`edgeadapt demo`: the whole loop on the embedded default."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeadapt.cli.common import console


def demo(
    out: Path = typer.Option(Path("demo-output"), help="where the plot, summary and logs go"),
    per_corruption: int = typer.Option(2000, help="images per corruption streamed (2000 = the full stream)"),
    train_every: int = typer.Option(256, help="the cloud trains after this many new uploads"),
    fps: float = typer.Option(None, help="the camera's frame rate the stream stands for (default: the rate the "
                                         "cloud keeps up with on 2 cores); 0 = as fast as the device answers",
                              min=0),
) -> None:
    """Run the whole loop on the embedded default: data, models, bundle (cached), cloud + device, stream.

    Ctrl-C stops everything cleanly.
    """
    import signal

    from edgeadapt.demo import run_demo

    def _terminate(signum, frame):  # SIGTERM stops the cloud and device processes too, as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        from edgeadapt.demo import DEFAULT_FPS

        run_demo(out, per_corruption=per_corruption, train_every=train_every,
                 fps=DEFAULT_FPS if fps is None else fps, console=console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; cloud and device stopped")
        raise typer.Exit(130) from None
