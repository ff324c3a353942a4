"""Network namespaces: the one place that switches into them.

BPF events name a namespace by its cookie (SO_NETNS_COOKIE, Linux 5.14+).
:class:`Namespaces` maps cookies to something that can be entered: a
``/run/netns/*`` bind mount or a ``/proc/<pid>/ns/net`` of a process inside.
Lookups are cached by namespace inode, so a miss costs one ``stat`` per
process and a ``setns`` only for namespaces never seen before; no fd is held
per namespace (1000 namespaces cost no fds).

Without cookie support the BPF side reports 0 for the initial namespace and
drops events from others, so everything here degrades to "global only".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import PybpftuneError

log = logging.getLogger("pybpftune.netns")

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71
RUN_NETNS = Path("/run/netns")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_lock = threading.RLock()


class NetnsGone(PybpftuneError):
    """The namespace an event came from no longer exists (or cannot be entered)."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsGone(f"cannot enter network namespace: {os.strerror(err)}")


def current_cookie() -> int | None:
    """Cookie of the calling thread's namespace; None without kernel support."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    except OSError:
        return None


def current_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


@dataclass
class NetnsRef:
    """Where to find a namespace again: a path whose inode must still match."""

    cookie: int
    inode: int
    path: str

    def valid(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.inode
        except OSError:
            return False


@contextmanager
def entered(path: str) -> Iterator[None]:
    """Run the block inside the namespace at ``path`` (this thread only)."""
    with _lock:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise NetnsGone(f"network namespace {path} is gone ({exc.strerror})") from exc
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(home)


class Namespaces:
    """Cookie <-> namespace bookkeeping for the daemon."""

    def __init__(self) -> None:
        cookie = current_cookie()
        self.cookie_supported = cookie is not None
        self.global_cookie = cookie if cookie is not None else 0
        self.global_inode = current_inode()
        self._by_cookie: dict[int, NetnsRef] = {}
        self._cookie_by_inode: dict[int, int] = {self.global_inode: self.global_cookie}
        self.scans = 0

    def is_global(self, cookie: int) -> bool:
        return cookie == self.global_cookie

    def describe(self, cookie: int) -> str:
        """'global ns' or 'non-global ns' as bpftune words it."""
        return "global ns" if self.is_global(cookie) else "non-global ns"

    def known(self) -> list[NetnsRef]:
        return list(self._by_cookie.values())

    def _candidates(self) -> Iterator[str]:
        if RUN_NETNS.is_dir():
            for p in RUN_NETNS.iterdir():
                yield str(p)
        try:
            for line in Path("/proc/self/mounts").read_text().splitlines():
                parts = line.split()
                if len(parts) > 2 and parts[2] == "nsfs" and "net:" not in parts[1]:
                    yield parts[1]
        except OSError:
            pass
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                yield f"/proc/{pid}/ns/net"

    def _learn(self, path: str) -> int | None:
        """Cookie of the namespace at path (cached by inode)."""
        try:
            inode = os.stat(path).st_ino
        except OSError:
            return None
        cookie = self._cookie_by_inode.get(inode)
        if cookie is None:
            try:
                with entered(path):
                    cookie = current_cookie()
            except NetnsGone:
                return None
            if cookie is None:
                return None
            self._cookie_by_inode[inode] = cookie
        if cookie != self.global_cookie:
            ref = self._by_cookie.get(cookie)
            if ref is None or not ref.valid():
                self._by_cookie[cookie] = NetnsRef(cookie, inode, path)
        return cookie

    def scan(self) -> int:
        """Learn every namespace reachable now; returns how many are known."""
        self.scans += 1
        for path in self._candidates():
            self._learn(path)
        self.forget_gone()
        return len(self._by_cookie)

    def add(self, path: str) -> int | None:
        """Learn one namespace (e.g. a new one reported by the kernel)."""
        return self._learn(path)

    def forget_gone(self) -> list[int]:
        """Drop namespaces whose path no longer leads to them (a later scan
        re-learns one that lives on under another path)."""
        gone = [c for c, ref in self._by_cookie.items() if not ref.valid()]
        for cookie in gone:
            ref = self._by_cookie.pop(cookie)
            self._cookie_by_inode.pop(ref.inode, None)
        return gone

    def resolve(self, cookie: int) -> NetnsRef | None:
        """Where the namespace with this cookie is, scanning once on a miss."""
        if cookie == self.global_cookie:
            return None
        ref = self._by_cookie.get(cookie)
        if ref is not None and ref.valid():
            return ref
        self.scan()
        return self._by_cookie.get(cookie)

    @contextmanager
    def enter(self, cookie: int) -> Iterator[None]:
        """Run the block in the namespace of ``cookie`` (global: no switch)."""
        if cookie == self.global_cookie:
            yield
            return
        ref = self.resolve(cookie)
        if ref is None:
            raise NetnsGone(f"network namespace with cookie {cookie} is gone")
        with entered(ref.path):
            yield
