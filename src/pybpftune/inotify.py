"""Watch directories for files that appear and disappear (inotify).

The one owner of inotify descriptors.  Python has no inotify module, so the
three system calls go through libc with ctypes; the records are the kernel's
``struct inotify_event`` (linux/inotify.h), a stable user-space ABI.

A file counts as *added* once it is complete: closed after writing, moved
in, or created by something that writes no data (a symbolic link, a hard
link, a directory).  A regular file that is merely created is still being
written, and loading it then would read half of it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import PybpftuneError
from .resource import Resource

# linux/inotify.h
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000

WATCH_MASK = (IN_CREATE | IN_CLOSE_WRITE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM | IN_DELETE_SELF | IN_MOVE_SELF) | (
    IN_ONLYDIR | IN_DONT_FOLLOW
)
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len
READ_SIZE = 64 * 1024

ADDED = "added"
REMOVED = "removed"
OVERFLOW = "overflow"  # events were lost: the directory must be rescanned
GONE = "gone"  # the watched directory was deleted or moved away


@dataclass(frozen=True)
class DirEvent:
    """A file ``path`` was added to or removed from a watched directory;
    for OVERFLOW and GONE, ``path`` is the directory."""

    kind: str
    path: Path


class _Libc:
    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.init1 = libc.inotify_init1
        self.init1.argtypes, self.init1.restype = [ctypes.c_int], ctypes.c_int
        self.add_watch = libc.inotify_add_watch
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.add_watch.restype = ctypes.c_int
        self.rm_watch = libc.inotify_rm_watch
        self.rm_watch.argtypes, self.rm_watch.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int


def _complete_on_create(path: Path) -> bool:
    """Is a just-created entry already whole (not a regular file being written)?"""
    try:
        st = os.lstat(path)
    except OSError:
        return False  # gone again: its removal follows
    return not os.path.isfile(path) or os.path.islink(path) or st.st_nlink > 1


class DirWatcher(Resource):
    """inotify watches on some directories; :meth:`read_events` is non-blocking,
    so an event loop can wait for :meth:`fileno` to become readable."""

    def __init__(self, directories: Iterable[Path]) -> None:
        self._libc = _Libc()
        fd = self._libc.init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise PybpftuneError(f"cannot create an inotify instance: {os.strerror(err)}")
        self._fd: int | None = fd
        self._dirs: dict[int, Path] = {}
        try:
            for directory in directories:
                self.watch(directory)
        except BaseException:
            self.close()
            raise

    def watch(self, directory: Path) -> None:
        wd = self._libc.add_watch(self.fileno(), os.fsencode(directory), WATCH_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            raise PybpftuneError(f"cannot watch {directory}: {os.strerror(err)}")
        self._dirs[wd] = directory

    @property
    def directories(self) -> list[Path]:
        return list(self._dirs.values())

    def fileno(self) -> int:
        if self._fd is None:
            raise PybpftuneError("the directory watcher is closed")
        return self._fd

    def read_events(self) -> list[DirEvent]:
        """Whatever happened since the last call (nothing if nothing did)."""
        out: list[DirEvent] = []
        while True:
            try:
                data = os.read(self.fileno(), READ_SIZE)
            except BlockingIOError:
                return out
            except InterruptedError:
                continue
            if not data:
                return out
            out.extend(self._parse(data))

    def _parse(self, data: bytes) -> list[DirEvent]:
        out: list[DirEvent] = []
        offset = 0
        while offset + _HEADER.size <= len(data):
            wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
            raw = data[offset + _HEADER.size : offset + _HEADER.size + length]
            offset += _HEADER.size + length
            name = os.fsdecode(raw.split(b"\0", 1)[0])
            if mask & IN_Q_OVERFLOW:
                out.extend(DirEvent(OVERFLOW, d) for d in self._dirs.values())
                continue
            directory = self._dirs.get(wd)
            if directory is None:
                continue  # a watch already given up
            if mask & (IN_IGNORED | IN_MOVE_SELF):
                del self._dirs[wd]
                if mask & IN_MOVE_SELF:
                    self._libc.rm_watch(self.fileno(), wd)
                out.append(DirEvent(GONE, directory))
                continue
            if not name or "/" in name:
                continue
            path = directory / name
            if mask & (IN_DELETE | IN_MOVED_FROM):
                out.append(DirEvent(REMOVED, path))
            elif mask & (IN_CLOSE_WRITE | IN_MOVED_TO) or (mask & IN_CREATE and _complete_on_create(path)):
                out.append(DirEvent(ADDED, path))
        return out

    def close(self) -> None:
        """Drop every watch.  Safe to repeat."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        self._dirs.clear()
        try:
            os.close(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
