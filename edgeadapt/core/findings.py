"""What ``edgeadapt doctor`` reports: one finding per check, with what to do about it (torch-free)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Level = Literal["ok", "warn", "fatal"]


@dataclass
class Finding:
    """One check's outcome. ``fatal``: it can never work as configured (doctor exits non-zero, startup refuses)."""

    level: Level
    check: str
    message: str
    fix: str = ""

    def line(self) -> str:
        tag = {"ok": "ok   ", "warn": "WARN ", "fatal": "FATAL"}[self.level]
        return f"{tag} {self.check}: {self.message}" + (f" -> {self.fix}" if self.fix else "")

    def to_dict(self) -> dict:
        return asdict(self)


def fatal(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == "fatal"]


def export_hint(public_key_file: str = "CLOUD_HOME/signing_key.pub") -> str:
    """The export command that puts a cloud's key into a bundle (fill in NAME and BUNDLE; runs as printed)."""
    return f"edgeadapt export --arch NAME --out BUNDLE --cloud-key {public_key_file}"
