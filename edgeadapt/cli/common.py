"""Small helpers shared by the CLI modules: clean error exit, JSON printing, peer text printed safely."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    # messages quote files, peers and servers: printed as text, never parsed as markup; never wrapped, so a
    # command hint in one can be copied as printed
    console.print("[bold red]error:[/]", Text(str(message)), soft_wrap=True)
    raise typer.Exit(code)


def plain(value: object, limit: int = 200) -> Text:
    """Something a peer sent (a device's status, a server's message) as printable text: control characters
    stripped (no escape sequence reaches the terminal) and no rich markup interpreted (``[/]`` cannot crash a
    table, ``[link=...]`` cannot plant a link)."""
    from edgeadapt.core.safetext import clean_text

    return Text("" if value is None else clean_text(value, limit))


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=float) + "\n")
    sys.stdout.flush()
