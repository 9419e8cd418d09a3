"""Strings a peer sends (a device's heartbeat status, counter names) reduced to printable text (torch-free).

They end up in the admin's terminal (``cloud devices``) and in logs: an escape sequence in them would reach the
terminal, a newline would forge log lines. So every control, format (bidi overrides, zero-width), surrogate,
private-use and unassigned character is removed, and the length is capped. Rich markup in them is a printing
matter: the CLI prints them as plain ``rich.text.Text``, never as markup.
"""

from __future__ import annotations

import unicodedata

MAX_STATUS_CHARS = 200
MAX_NAME_CHARS = 64


def clean_text(value: object, limit: int = MAX_STATUS_CHARS) -> str:
    """``value`` as a string of printable characters only, at most ``limit`` long."""
    text = str(value)
    return "".join(ch for ch in text[: limit * 4] if not unicodedata.category(ch).startswith("C"))[:limit]
