"""`edgeadapt bundle ...` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="bundle commands", no_args_is_help=True)
