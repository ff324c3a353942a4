"""The state directory (/run/pybpftune): the only code that writes there.

It holds the lock and pid file (``pybpftune.pid``, flock'ed for the daemon's
life: a second daemon, or ``bpftune --restore`` while a daemon runs, is
refused before it touches anything; a stale file from a killed daemon is
simply taken over), the journal of original values (``journal.jsonl``; its
format and guarantees are in journal.py and docs/journal.md), the query
socket (``bpftune.sock``, mode 0600, root only) and caches.

The directory must belong to root (or to whoever runs us) and be writable by
nobody else: a journal that anybody can edit would let them choose what root
writes back.  Missing parents are created 0755 whatever the umask; files are
created 0600 and opened without following symlinks.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import stat
from pathlib import Path

from .errors import PybpftuneError

log = logging.getLogger("pybpftune.state")

DEFAULT_STATE_DIR = Path("/run/pybpftune")
JOURNAL = "journal.jsonl"
PID_FILE = "pybpftune.pid"
# A cache file larger than this is not ours.
CACHE_MAX = 65536
# Nor a journal larger than this (a daemon writes a few lines per change).
JOURNAL_MAX = 16 << 20
QUERY_SOCKET = "bpftune.sock"


class StateDirError(PybpftuneError):
    """The state directory is not safe to use (owner, mode, symlinks)."""


class StateDir:
    def __init__(self, path: Path = DEFAULT_STATE_DIR) -> None:
        self.path = path
        self._journal_fd: int | None = None
        self._pid_fd: int | None = None
        self._sockets: dict[Path, int] = {}  # query sockets we bound -> their inode
        self._checked = False

    def ensure(self) -> Path:
        """The directory, created (with missing parents) 0755 and checked."""
        if not self._checked:
            missing = []
            p = self.path
            while not p.exists() and not p.is_symlink() and p != p.parent:
                missing.append(p)
                p = p.parent
            for d in reversed(missing):
                try:
                    os.mkdir(d, 0o755)
                    os.chmod(d, 0o755)  # mkdir applied the umask
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise StateDirError(f"cannot create state directory {d}: {exc.strerror or exc}") from None
            self.check()
            self._checked = True
        return self.path

    def check(self) -> None:
        """Refuse a directory someone else owns or may write to."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise StateDirError(f"state directory {self.path}: {exc.strerror or exc}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise StateDirError(f"state directory {self.path} is not a directory")
        if st.st_uid not in (0, os.geteuid()):
            raise StateDirError(f"state directory {self.path} belongs to uid {st.st_uid}, not root: refusing to use it")
        if st.st_mode & 0o022:
            raise StateDirError(
                f"state directory {self.path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}): "
                "refusing to use it"
            )

    def subdir(self, name: str, mode: int = 0o755) -> Path:
        d = self.ensure() / name
        d.mkdir(mode=mode, exist_ok=True)
        return d

    def _open(self, name: str, flags: int, mode: int = 0o600) -> int:
        return os.open(self.ensure() / name, flags | os.O_CLOEXEC | os.O_NOFOLLOW, mode)

    # --- the lock and pid file ------------------------------------------------------

    @property
    def pid_path(self) -> Path:
        return self.path / PID_FILE

    def lock(self, what: str = "daemon") -> Path:
        """Take the directory's lock and write our pid; one line refusing if a
        live daemon holds it.  Taken before anything else is touched."""
        if self._pid_fd is not None:
            return self.pid_path
        try:
            fd = self._open(PID_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StateDirError(f"cannot open {self.pid_path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise PybpftuneError(
                f"another pybpftune daemon (pid {other}) is running with state directory {self.path}"
                + ("" if what == "daemon" else f"; stop it before the {what}")
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._pid_fd = fd
        return self.pid_path

    @property
    def locked(self) -> bool:
        return self._pid_fd is not None

    def unlock(self) -> None:
        if self._pid_fd is None:
            return
        try:
            self.pid_path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._pid_fd)
        self._pid_fd = None

    # --- the journal (format: journal.py) ----------------------------------------------

    @property
    def journal_path(self) -> Path:
        return self.path / JOURNAL

    def read_journal(self) -> bytes:
        """The journal's bytes (empty if there is none); at most JOURNAL_MAX
        are read, the rest is reported as corrupt by the reader."""
        if not self.path.is_dir():
            return b""
        try:
            fd = self._open(JOURNAL, os.O_RDONLY)
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise StateDirError(f"cannot read the journal {self.journal_path}: {exc.strerror or exc}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StateDirError(f"the journal {self.journal_path} is not a regular file")
            chunks, size = [], 0
            while size < JOURNAL_MAX and (chunk := os.read(fd, min(1 << 20, JOURNAL_MAX - size))):
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def append_journal(self, lines: list[str]) -> None:
        """Append lines durably (fsync'ed before returning)."""
        if self._journal_fd is None:
            self._journal_fd = self._open(JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(self._journal_fd, "".join(line + "\n" for line in lines).encode())
        os.fsync(self._journal_fd)

    def replace_journal(self, lines: list[str]) -> None:
        """Replace the journal atomically with ``lines`` (none: remove it)."""
        self.close()
        if not lines:
            try:
                os.unlink(self.journal_path)
            except FileNotFoundError:
                pass
            return
        tmp = f".{JOURNAL}.{os.getpid()}"
        fd = self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.write(fd, "".join(line + "\n" for line in lines).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.path / tmp, self.journal_path)
        dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)  # the rename itself survives a crash
        finally:
            os.close(dfd)

    # --- caches: facts about this boot that are costly to learn (the support probe) ---

    def read_cache(self, name: str) -> str | None:
        """A cache file's text, or None.  Only a root-owned regular file that
        only root can write is read; callers still validate what they get."""
        path = self.path / f"{name}.cache"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022 or st.st_size > CACHE_MAX:
                return None
            return os.read(fd, CACHE_MAX).decode("utf-8", errors="strict")
        except (OSError, UnicodeDecodeError):
            return None
        finally:
            os.close(fd)

    def write_cache(self, name: str, text: str) -> None:
        """Replace a cache file atomically; failures are only logged (a cache
        is an optimisation)."""
        path = self.path / f"{name}.cache"
        tmp = self.path / f".{name}.cache.{os.getpid()}"
        try:
            self.ensure()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("cannot write cache %s: %s", path, exc)
            try:
                tmp.unlink()
            except OSError:
                pass

    # --- the query socket ---------------------------------------------------------

    @property
    def default_socket(self) -> Path:
        return self.path / QUERY_SOCKET

    def bind_socket(self, path: Path) -> socket.socket:
        """A Unix stream socket bound at ``path``, mode 0600 from the start.

        A socket file left by a daemon that died is replaced; one that
        answers belongs to a running daemon, and we refuse to take it over."""
        if path.parent == self.path:
            self.ensure()
        if path.is_socket():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink(missing_ok=True)  # stale: nobody listens
            else:
                raise PybpftuneError(f"another pybpftune daemon is serving queries on {path}; stop it first")
            finally:
                probe.close()
        elif path.exists() or path.is_symlink():
            raise PybpftuneError(f"cannot serve queries on {path}: it exists and is not a socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # bind() creates the file with the umask applied: 0600 at once, no window.
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        except OSError as exc:
            sock.close()
            raise PybpftuneError(f"cannot serve queries on {path}: {exc.strerror or exc}") from None
        finally:
            os.umask(old)
        self._sockets[path] = os.stat(path).st_ino
        return sock

    def remove_socket(self, path: Path) -> None:
        """Remove the socket we bound, unless another daemon has replaced it since."""
        inode = self._sockets.pop(path, None)
        try:
            if inode is not None and os.stat(path).st_ino == inode:
                path.unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
