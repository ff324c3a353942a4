"""Reading and writing sysctls, in any network namespace.

Two backends share one interface: :class:`ProcSysctl` goes through /proc/sys
(inside the event's namespace, via :mod:`pybpftune.netns`), and
:class:`MemorySysctl` keeps values in a dict, for rules driven by synthetic
events in unit tests and for replaying scenarios.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from .errors import PybpftuneError
from .netns import Namespaces

# A container whose runtime mounts /proc/sys read-only can be given the host's
# (a hostPath mount, e.g. at /host/proc/sys): entries under net/ still follow
# the network namespace of the reading thread, as /proc/sys does.
PROC_SYS = Path(os.environ.get("PYBPFTUNE_PROC_SYS", "/proc/sys"))

Values = tuple[int, ...]


class SysctlMissing(PybpftuneError):
    """The sysctl does not exist here (module not loaded, IPv6 disabled...)."""


class SysctlBackend(Protocol):
    def read(self, name: str, netns_cookie: int | None = None) -> Values: ...

    def read_text(self, name: str, netns_cookie: int | None = None) -> str: ...

    def write(self, name: str, values: Values, netns_cookie: int | None = None) -> None: ...

    def write_text(self, name: str, text: str, netns_cookie: int | None = None) -> None: ...


def sysctl_path(name: str) -> Path:
    return PROC_SYS / name.replace(".", "/")


def parse_values(text: str) -> Values:
    try:
        return tuple(int(v) for v in text.split())
    except ValueError as exc:
        raise PybpftuneError(f"not a numeric sysctl value: {text.strip()!r}") from exc


def format_values(values: Values) -> str:
    return " ".join(str(v) for v in values)


class ProcSysctl:
    """The real thing: /proc/sys, entered in the right namespace."""

    def __init__(self, namespaces: Namespaces) -> None:
        self.namespaces = namespaces

    def read_text(self, name: str, netns_cookie: int | None = None) -> str:
        cookie = self.namespaces.global_cookie if netns_cookie is None else netns_cookie
        with self.namespaces.enter(cookie):
            try:
                return sysctl_path(name).read_text().strip()
            except FileNotFoundError as exc:
                raise SysctlMissing(f"sysctl {name} does not exist here") from exc

    def read(self, name: str, netns_cookie: int | None = None) -> Values:
        return parse_values(self.read_text(name, netns_cookie))

    def write(self, name: str, values: Values, netns_cookie: int | None = None) -> None:
        self.write_text(name, format_values(values), netns_cookie)

    def write_text(self, name: str, text: str, netns_cookie: int | None = None) -> None:
        cookie = self.namespaces.global_cookie if netns_cookie is None else netns_cookie
        with self.namespaces.enter(cookie):
            try:
                sysctl_path(name).write_text(text)
            except FileNotFoundError as exc:
                raise SysctlMissing(f"sysctl {name} does not exist here") from exc


class MemorySysctl:
    """Sysctls in a dict keyed by (namespace cookie, name); cookie None is global."""

    def __init__(
        self, values: dict[str, Values] | None = None, global_cookie: int = 0, texts: dict[str, str] | None = None
    ) -> None:
        self.global_cookie = global_cookie
        self.values: dict[tuple[int, str], Values] = {(global_cookie, k): v for k, v in (values or {}).items()}
        self.texts: dict[tuple[int, str], str] = {(global_cookie, k): v for k, v in (texts or {}).items()}
        self.writes: list[tuple[int, str, Values]] = []
        self.text_writes: list[tuple[int, str, str]] = []

    def _key(self, name: str, netns_cookie: int | None) -> tuple[int, str]:
        return (self.global_cookie if netns_cookie is None else netns_cookie, name)

    def read(self, name: str, netns_cookie: int | None = None) -> Values:
        key = self._key(name, netns_cookie)
        if key not in self.values:
            # A new namespace starts from the global values, as the kernel's do.
            glob = (self.global_cookie, name)
            if glob not in self.values:
                raise SysctlMissing(f"sysctl {name} does not exist here")
            self.values[key] = self.values[glob]
        return self.values[key]

    def read_text(self, name: str, netns_cookie: int | None = None) -> str:
        key = self._key(name, netns_cookie)
        if key in self.texts:
            return self.texts[key]
        if (self.global_cookie, name) in self.texts:
            self.texts[key] = self.texts[(self.global_cookie, name)]
            return self.texts[key]
        return format_values(self.read(name, netns_cookie))

    def write_text(self, name: str, text: str, netns_cookie: int | None = None) -> None:
        key = self._key(name, netns_cookie)
        if key in self.texts or (self.global_cookie, name) in self.texts:
            self.texts[key] = text
            self.text_writes.append((key[0], name, text))
        else:
            self.write(name, parse_values(text), netns_cookie)

    def write(self, name: str, values: Values, netns_cookie: int | None = None) -> None:
        key = self._key(name, netns_cookie)
        self.values[key] = tuple(values)
        self.writes.append((key[0], name, tuple(values)))
