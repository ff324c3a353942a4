"""Typed errors: every failure an operator or a caller can meet has a class.

The CLI turns any PybpftuneError into one line on stderr and a non-zero exit;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno as _errno
import os


class PybpftuneError(Exception):
    """Base class of every error pybpftune raises on purpose."""


class UsageError(PybpftuneError):
    """An operator mistake: bad option value, unknown tuner name, bad path."""


class BpfError(PybpftuneError):
    """A libbpf or bpf(2) call failed; carries errno."""

    def __init__(self, what: str, err: int) -> None:
        self.what = what
        self.errno = abs(err)
        super().__init__(f"{what}: {self.short()}")

    def short(self) -> str:
        """The errno as words and symbol: 'Operation not permitted (EPERM)'."""
        return f"{os.strerror(self.errno)} ({errno_name(self.errno)})"


class BpfObjectError(PybpftuneError):
    """A BPF object file is missing, truncated or not a BPF ELF object."""


class BpfLoadError(BpfError):
    """The kernel (verifier) or libbpf refused to load an object.

    ``log_tail`` holds the last lines libbpf printed while loading, which
    include the verifier log of the failing program.
    """

    def __init__(self, object_name: str, err: int, log_tail: list[str], program: str | None = None) -> None:
        self.object_name = object_name
        self.program = program
        self.log_tail = log_tail
        where = f"{object_name}" + (f", program {program}" if program else "")
        super().__init__(f"loading BPF object {where} failed", err)

    def __str__(self) -> str:
        tail = [line for line in self.log_tail if line.strip()][-3:]
        base = super().__str__()
        return base + (": " + " | ".join(tail) if tail else "")


class LayoutError(PybpftuneError, ValueError):
    """Bytes or values that do not fit a layout of the shared header (wrong
    size, unknown field, a value out of range), or a name it does not define."""


class AttachError(BpfError):
    """A loaded program could not be attached to its hook."""


class NotSupported(PybpftuneError):
    """The running kernel lacks something a feature needs."""

    def __init__(self, feature: str, reason: str) -> None:
        self.feature = feature
        self.reason = reason
        super().__init__(f"{feature} is not supported here: {reason}")


class TunerError(PybpftuneError):
    """A tuner failed to start or to handle an event; the daemon disables it."""


def errno_name(err: int) -> str:
    """Symbolic name of an errno value (EPERM), for compact reports."""
    return _errno.errorcode.get(abs(err), str(abs(err)))
