"""Network namespaces: the one place that switches into them.

BPF events name a namespace by its cookie (SO_NETNS_COOKIE, Linux 5.14+).
:class:`Namespaces` maps cookies to something that can be entered: a
``/run/netns/*`` bind mount (or any nsfs mount) or a ``/proc/<pid>/ns/net`` of
a process inside.  No fd is held per namespace (1000 namespaces cost no fds):
a reference is a path plus the namespace's inode, re-checked before use.

Costs, so that thousands of namespaces stay cheap:

* cookie -> path and inode -> cookie are cached; entering a namespace to read
  its cookie (``setns`` + a socket) happens once per namespace ever, and not
  at all when the kernel already told us the (cookie, inode) pair;
* a miss never scans all processes per event: it first tries the caller's
  hint (the event's pid), then the nsfs mounts (at most once a second), and
  scans /proc at most once every ``PROCESS_SCAN_INTERVAL`` seconds;
* namespaces known to be gone are remembered (cookies are never reused), so
  events from them cost nothing, and are reported once;
* new bind mounts under /run/netns are seen through one inotify fd
  (:meth:`Namespaces.watch` / :meth:`Namespaces.poll_watch`).

Without cookie support the BPF side reports 0 for the initial namespace and
drops events from others, so everything here degrades to "global only".
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PybpftuneError
from .procfs import mounts
from .procnet import Counters, read_counters

log = logging.getLogger("pybpftune.netns")

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71
RUN_NETNS = Path("/run/netns")
# A miss scans the nsfs mounts at most this often, and /proc at most this often.
MOUNT_SCAN_INTERVAL = 1.0
PROCESS_SCAN_INTERVAL = 10.0
# How long a new /run/netns entry may stay a plain file before its bind mount shows.
PENDING_MOUNT_S = 5.0
# Cookies of gone namespaces remembered (8 bytes each, oldest forgotten first).
GONE_MAX = 65536

# libc is already in the process: CDLL(None) finds setns/inotify there, where
# ctypes.util.find_library would run ldconfig in a subprocess (slow in a VM).
_libc = ctypes.CDLL(None, use_errno=True)
_lock = threading.RLock()

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_DELETE_SELF = 0x400
IN_IGNORED = 0x8000
_INOTIFY_EVENT = struct.Struct("iIII")


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


def _inode_of(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def current_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def _nsfs_dev() -> int | None:
    try:
        return os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return None


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

    def __init__(self, clock: Any = time.monotonic) -> None:
        cookie = current_cookie()
        self.cookie_supported = cookie is not None
        self.global_cookie = cookie if cookie is not None else 0
        self.global_inode = current_inode()
        self._clock = clock
        self._by_cookie: dict[int, NetnsRef] = {}
        self._cookie_by_inode: dict[int, int] = {self.global_inode: self.global_cookie}
        self._path_by_inode: dict[int, str] = {}  # namespaces without cookies, found by inode
        self._inode_missed: dict[int, float] = {}  # inode -> when a scan last failed to find it
        self._gone: dict[int, None] = {}
        self._last_mount_scan = float("-inf")
        self._last_process_scan = float("-inf")
        self._nsfs_dev = _nsfs_dev()
        self._watch_fd: int | None = None
        self._watch_wds: dict[int, str] = {}
        self._pending: dict[str, float] = {}
        # Counters for the summary and for tests.
        self.scans = 0  # full scans (mounts and all processes)
        self.process_scans = 0
        self.mount_scans = 0
        self.entered_to_learn = 0  # setns calls made only to read a cookie

    # --- identity ----------------------------------------------------------------

    def is_global(self, cookie: int) -> bool:
        return cookie == self.global_cookie

    def describe(self, cookie: int) -> str:
        """'global ns' or 'non-global ns' as bpftune words it."""
        return "global ns" if self.is_global(cookie) else "non-global ns"

    def command_prefix(self, cookie: int) -> str | None:
        """How a shell enters this namespace ("ip netns exec NAME" for a
        /run/netns mount, else "nsenter --net=PATH"); None if no path to it
        is known.  Text for advice only: nothing is entered here."""
        ref = self._by_cookie.get(cookie)
        if ref is None:
            return None
        import shlex  # only here: advice text, never needed while starting

        path = Path(ref.path)
        if path.parent == RUN_NETNS:
            return f"ip netns exec {shlex.quote(path.name)}"
        return f"nsenter --net={shlex.quote(ref.path)}"

    def known(self) -> list[NetnsRef]:
        return list(self._by_cookie.values())

    def cookie_of_path(self, path: str) -> int | None:
        """Cookie of the namespace at ``path`` (learning it if needed)."""
        return self._learn(path)

    # --- gone namespaces -----------------------------------------------------------

    def is_gone(self, cookie: int) -> bool:
        return cookie in self._gone

    def mark_gone(self, cookie: int) -> bool:
        """Remember that a namespace no longer exists; True the first time."""
        if cookie == self.global_cookie or cookie in self._gone:
            return False
        ref = self._by_cookie.pop(cookie, None)
        if ref is not None:
            self._cookie_by_inode.pop(ref.inode, None)
        for inode in [i for i, c in self._cookie_by_inode.items() if c == cookie]:
            del self._cookie_by_inode[inode]
        self._gone[cookie] = None
        while len(self._gone) > GONE_MAX:
            del self._gone[next(iter(self._gone))]
        return True

    # --- learning ------------------------------------------------------------------

    def _learn(self, path: str) -> int | None:
        """Cookie of the namespace at path (cached by inode)."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        if self._nsfs_dev is not None and st.st_dev != self._nsfs_dev:
            return None  # not (yet) a namespace: e.g. /run/netns/X before its bind mount
        inode = st.st_ino
        cookie = self._cookie_by_inode.get(inode)
        if cookie is None:
            try:
                self.entered_to_learn += 1
                with entered(path):
                    cookie = current_cookie()
            except NetnsGone:
                return None
            if cookie is None:
                return None
            self._cookie_by_inode[inode] = cookie
        if cookie != self.global_cookie and cookie not in self._gone:
            ref = self._by_cookie.get(cookie)
            if ref is None or not ref.valid():
                self._by_cookie[cookie] = NetnsRef(cookie, inode, path)
        return cookie

    def add(self, path: str) -> int | None:
        """Learn one namespace (e.g. a new one reported by the kernel)."""
        return self._learn(path)

    def learn(self, cookie: int, inode: int, hint: str | None = None) -> bool:
        """Record a (cookie, inode) pair the kernel reported; True if a path for
        it is known now.  ``hint`` (e.g. the creator's /proc/<pid>/ns/net) is
        used when it still leads to that inode: no setns is needed."""
        if cookie == self.global_cookie or cookie in self._gone:
            return False
        self._cookie_by_inode[inode] = cookie
        ref = self._by_cookie.get(cookie)
        if ref is not None and ref.valid():
            return True
        if hint is not None:
            try:
                if os.stat(hint).st_ino == inode:
                    self._by_cookie[cookie] = NetnsRef(cookie, inode, hint)
                    return True
            except OSError:
                pass
        return False

    def _mount_candidates(self) -> Iterator[str]:
        seen = set()
        if RUN_NETNS.is_dir():
            for p in RUN_NETNS.iterdir():
                seen.add(str(p))
                yield str(p)
        for m in mounts():
            if m.fstype == "nsfs" and "net:" not in m.target and m.target not in seen:
                yield m.target

    @staticmethod
    def _process_candidates() -> Iterator[str]:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                yield f"/proc/{pid}/ns/net"

    def scan_mounts(self) -> None:
        self.mount_scans += 1
        self._last_mount_scan = self._clock()
        for path in self._mount_candidates():
            self._learn(path)

    def scan_processes(self) -> None:
        self.process_scans += 1
        self._last_process_scan = self._clock()
        for path in self._process_candidates():
            self._learn(path)

    def scan(self) -> int:
        """Learn every namespace reachable now; returns how many are known."""
        self.scans += 1
        self.scan_mounts()
        self.scan_processes()
        self.forget_gone()
        return len(self._by_cookie)

    def forget_gone(self) -> list[int]:
        """Drop namespaces whose path no longer leads to them (a later scan
        re-learns one that lives on under another path)."""
        gone = [c for c, ref in self._by_cookie.items() if not ref.valid()]
        for cookie in gone:
            ref = self._by_cookie.pop(cookie)
            self._cookie_by_inode.pop(ref.inode, None)
        return gone

    # --- lookup ---------------------------------------------------------------------

    def resolve(self, cookie: int, hint: str | None = None) -> NetnsRef | None:
        """Where the namespace with this cookie is, or None.

        Never a per-event scan of every process: the hint first, then the
        nsfs mounts (at most once a second), then /proc (at most every
        PROCESS_SCAN_INTERVAL seconds)."""
        if cookie == self.global_cookie or cookie in self._gone:
            return None
        ref = self._by_cookie.get(cookie)
        if ref is not None and ref.valid():
            return ref
        if hint is not None and self._learn(hint) == cookie:
            return self._by_cookie.get(cookie)
        now = self._clock()
        if now - self._last_mount_scan >= MOUNT_SCAN_INTERVAL:
            self.scan_mounts()
            ref = self._by_cookie.get(cookie)
            if ref is not None and ref.valid():
                return ref
        if now - self._last_process_scan >= PROCESS_SCAN_INTERVAL:
            self.scan_processes()
            ref = self._by_cookie.get(cookie)
            if ref is not None and ref.valid():
                return ref
        return None

    def path_of_inode(self, inode: int) -> str | None:
        """A path that leads to the namespace with this inode (kernels without
        cookies name namespaces only by inode): a known one, else a scan whose
        find is cached."""
        known = self._by_cookie.get(self._cookie_by_inode.get(inode, -1))
        if known is not None and known.valid():
            return known.path
        cached = self._path_by_inode.get(inode)
        if cached is not None and _inode_of(cached) == inode:
            return cached
        # Not a scan of every process per event: a namespace not found is
        # looked for again only after PROCESS_SCAN_INTERVAL.
        missed = self._inode_missed.get(inode)
        if missed is not None and self._clock() - missed < PROCESS_SCAN_INTERVAL:
            return None
        for path in (*self._mount_candidates(), *self._process_candidates()):
            if _inode_of(path) == inode:
                self._path_by_inode[inode] = path
                self._inode_missed.pop(inode, None)
                return path
        self._path_by_inode.pop(inode, None)
        if len(self._inode_missed) >= 4096:
            self._inode_missed.clear()  # bounded: dead namespaces' inodes are never asked for again
        self._inode_missed[inode] = self._clock()
        return None

    @contextmanager
    def enter_inode(self, inode: int) -> Iterator[None]:
        """Run the block in the namespace with this inode (ours or 0: no switch)."""
        if inode in (0, self.global_inode):
            yield
            return
        path = self.path_of_inode(inode)
        if path is None:
            raise NetnsGone(f"network namespace with inode {inode} is gone")
        with entered(path):
            yield

    def counters(self, cookie: int, files: tuple[str, ...] = ("snmp", "snmp6")) -> Counters | None:
        """Protocol counters (/proc/net/snmp, snmp6, netstat) of the namespace
        with ``cookie``; None if it cannot be entered."""
        try:
            with self.enter(cookie):
                return read_counters(files)
        except NetnsGone:
            return None

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

    def rtnl(self, cookie: int | None = None, inode: int | None = None) -> Any:
        """A pyroute2 rtnetlink handle (no multicast groups) in the namespace
        of ``cookie`` or, on kernels without cookies, of ``inode``; the
        daemon's own without either.  Close it after use.  Its socket is
        opened inside the namespace, so no pyroute2 namespace helper (and no
        second setns site) is involved.  NetnsGone if it cannot be entered."""
        from pyroute2 import IPRoute

        if cookie is not None:
            with self.enter(cookie):
                return IPRoute(groups=0)
        with self.enter_inode(inode or 0):
            return IPRoute(groups=0)

    # --- watching /run/netns ------------------------------------------------------------

    def watch(self) -> bool:
        """Start noticing bind mounts appearing under /run/netns (one fd)."""
        if self._watch_fd is not None:
            return True
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            log.debug("inotify unavailable: %s", os.strerror(ctypes.get_errno()))
            return False
        self._watch_fd = fd
        self._add_watch(str(RUN_NETNS.parent), IN_CREATE | IN_MOVED_TO)
        if RUN_NETNS.is_dir():
            self._add_watch(str(RUN_NETNS), IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM)
        return True

    @property
    def watch_fd(self) -> int | None:
        """The inotify fd (readable when /run/netns changed), once watch() succeeded."""
        return self._watch_fd

    @property
    def pending(self) -> bool:
        """New /run/netns entries whose bind mount has not shown yet: call
        poll_watch() again shortly (no inotify event announces the mount)."""
        return bool(self._pending)

    def _add_watch(self, path: str, mask: int) -> None:
        assert self._watch_fd is not None
        wd = _libc.inotify_add_watch(self._watch_fd, path.encode(), mask)
        if wd >= 0:
            self._watch_wds[wd] = path

    def poll_watch(self) -> list[int]:
        """Handle what inotify saw; returns cookies learned now."""
        if self._watch_fd is None:
            return []
        while True:
            try:
                data = os.read(self._watch_fd, 65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                break
            if not data:
                break
            self._inotify_records(data)
        learned = []
        now = self._clock()
        for path, since in list(self._pending.items()):
            cookie = self._learn(path)
            if cookie is not None:
                del self._pending[path]
                learned.append(cookie)
            elif now - since > PENDING_MOUNT_S or not os.path.exists(path):
                del self._pending[path]
        return learned

    def _inotify_records(self, data: bytes) -> None:
        off = 0
        while off + _INOTIFY_EVENT.size <= len(data):
            wd, mask, _cookie, length = _INOTIFY_EVENT.unpack_from(data, off)
            raw = data[off + _INOTIFY_EVENT.size : off + _INOTIFY_EVENT.size + length]
            off += _INOTIFY_EVENT.size + length
            name = raw.split(b"\0", 1)[0].decode(errors="replace")
            parent = self._watch_wds.get(wd)
            if mask & IN_IGNORED:
                self._watch_wds.pop(wd, None)
                continue
            if parent is None or not name:
                continue
            path = f"{parent}/{name}"
            if parent == str(RUN_NETNS.parent):
                if name == RUN_NETNS.name and str(RUN_NETNS) not in self._watch_wds.values():
                    self._add_watch(str(RUN_NETNS), IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM)
                    for p in RUN_NETNS.iterdir():
                        self._pending.setdefault(str(p), self._clock())
                continue
            if mask & (IN_CREATE | IN_MOVED_TO):
                self._pending[path] = self._clock()
            elif mask & (IN_DELETE | IN_MOVED_FROM):
                self._pending.pop(path, None)
                for cookie, ref in list(self._by_cookie.items()):
                    if ref.path == path:
                        del self._by_cookie[cookie]

    def close(self) -> None:
        if self._watch_fd is not None:
            os.close(self._watch_fd)
            self._watch_fd = None
            self._watch_wds.clear()
