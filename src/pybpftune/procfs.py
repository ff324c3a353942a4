"""Parsing /proc files that more than one module reads (a leaf: imports nothing of ours)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

MOUNTS = Path("/proc/self/mounts")


class Mount(NamedTuple):
    source: str
    target: str
    fstype: str


def _unescape(field: str) -> str:
    """A mounts field: space, tab, newline and backslash are octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def mounts(path: Path = MOUNTS) -> list[Mount]:
    """This process's mounts (empty if they cannot be read)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) > 2:
            out.append(Mount(_unescape(parts[0]), _unescape(parts[1]), parts[2]))
    return out
