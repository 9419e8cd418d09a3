"""`edgeadapt demo`: the whole loop on the embedded default."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeadapt.cli.common import console


def demo(
    out: Path = typer.Option(Path("demo-output"), help="where the plot, summary and logs go"),
    per_corruption: int = typer.Option(None, help="images per corruption streamed (default 1000, half the stream, so the warm demo fits 3 minutes; 2000 = the full stream)", min=64,
                                       max=2000),
    train_every: int = typer.Option(None, help="the cloud trains after this many new uploads", min=1),
    round_steps: int = typer.Option(None, help="the cloud's budget: at least this many SGD steps per round", min=1),
    round_uploads: int = typer.Option(None, help="the cloud's budget: at most this many newest uploads per round "
                                                 "(older ones go to replay)", min=1),
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
        from edgeadapt import demo as D

        def pick(value, default):
            return default if value is None else value

        run_demo(out, per_corruption=pick(per_corruption, D.DEFAULT_PER_CORRUPTION),
                 train_every=pick(train_every, D.DEFAULT_TRAIN_EVERY), fps=pick(fps, D.DEFAULT_FPS),
                 round_steps=pick(round_steps, D.DEFAULT_ROUND_STEPS),
                 round_uploads=pick(round_uploads, D.DEFAULT_ROUND_UPLOADS), console=console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; cloud and device stopped")
        raise typer.Exit(130) from None
