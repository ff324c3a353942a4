"""The state directory (/run/pybpftune): the only code that writes there.

It holds the pid file of a daemon started with -D (``pybpftune.pid``, locked
with flock for the daemon's life, so a second daemon on the same directory is
refused and a stale file from a killed one is simply taken over), the query
socket (``bpftune.sock``, mode 0600, root only), and one
journal of original values per daemon process
(``originals-<pid>.jsonl``): before the daemon first changes a tunable in a
namespace, the original is appended and fsync'ed, so a daemon killed with
SIGKILL leaves enough behind for the next start to restore.

One JSON object a line.  A numeric sysctl's original is ``"original": [60]``;
a string sysctl's (tcp_allowed_congestion_control, say) is
``"original_text": "reno bbr"`` with no ``"original"`` key, so a daemon from
before string originals were journaled skips such a line as corrupt instead of
writing digits it parsed out of a string.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import PybpftuneError

log = logging.getLogger("pybpftune.state")

DEFAULT_STATE_DIR = Path("/run/pybpftune")
JOURNAL_GLOB = "originals-*.jsonl"
PID_FILE = "pybpftune.pid"
# A cache file larger than this is not ours.
CACHE_MAX = 65536
QUERY_SOCKET = "bpftune.sock"


@dataclass(frozen=True)
class JournalEntry:
    pid: int
    tuner: str
    tunable: str
    netns_cookie: int
    global_ns: bool
    original: tuple[int, ...] = ()
    original_text: str | None = None  # a string sysctl's original (then ``original`` is empty)

    def describe_original(self) -> str:
        return self.original_text if self.original_text is not None else " ".join(map(str, self.original))

    def to_json(self) -> str:
        raw: dict[str, object] = {
            "pid": self.pid,
            "tuner": self.tuner,
            "tunable": self.tunable,
            "netns_cookie": self.netns_cookie,
            "global_ns": self.global_ns,
        }
        if self.original_text is not None:
            raw["original_text"] = self.original_text
        else:
            raw["original"] = list(self.original)
        return json.dumps(raw)

    @classmethod
    def from_json(cls, line: str) -> JournalEntry:
        """Parse one journal line; ValueError, KeyError or TypeError if it is corrupt."""
        raw = json.loads(line)
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        text = raw.get("original_text")
        if text is not None and not isinstance(text, str):
            raise TypeError("original_text is not a string")
        return cls(
            int(raw["pid"]),
            str(raw["tuner"]),
            str(raw["tunable"]),
            int(raw["netns_cookie"]),
            bool(raw["global_ns"]),
            () if text is not None else tuple(int(v) for v in raw["original"]),
            text,
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StateDir:
    def __init__(self, path: Path = DEFAULT_STATE_DIR) -> None:
        self.path = path
        self._journal_fd: int | None = None
        self._pid_fd: int | None = None
        self._sockets: dict[Path, int] = {}  # query sockets we bound -> their inode

    def ensure(self) -> Path:
        self.path.mkdir(mode=0o755, parents=True, exist_ok=True)
        return self.path

    def subdir(self, name: str, mode: int = 0o755) -> Path:
        d = self.ensure() / name
        d.mkdir(mode=mode, exist_ok=True)
        return d

    @property
    def journal_path(self) -> Path:
        return self.path / f"originals-{os.getpid()}.jsonl"

    def _dead_journals(self) -> list[Path]:
        out = []
        for p in sorted(self.path.glob(JOURNAL_GLOB)) if self.path.is_dir() else []:
            pid = p.name.removeprefix("originals-").removesuffix(".jsonl")
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                out.append(p)
        return out

    def leftovers(self) -> list[JournalEntry]:
        """Journal entries of daemons that died without cleaning up."""
        entries = []
        for p in self._dead_journals():
            entries.extend(self.read_journal(p))
        return entries

    @staticmethod
    def read_journal(path: Path) -> list[JournalEntry]:
        """The entries of one journal file; corrupt lines are skipped with a warning."""
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return []
        entries = []
        for line in lines:
            try:
                entries.append(JournalEntry.from_json(line))
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a corrupt line in %s", path)
        return entries

    def forget_leftovers(self) -> None:
        """The dead daemons' journals have been dealt with."""
        for p in self._dead_journals():
            p.unlink(missing_ok=True)

    def record_original(self, entry: JournalEntry) -> None:
        """Append one original value durably, before it is overwritten."""
        if self._journal_fd is None:
            self.ensure()
            self._journal_fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        line = entry.to_json()
        os.write(self._journal_fd, (line + "\n").encode())
        os.fsync(self._journal_fd)

    def clear_journal(self) -> None:
        """After a clean exit (and rollback, if asked) nothing is pending."""
        self.close()
        try:
            self.journal_path.unlink()
        except FileNotFoundError:
            pass

    # --- the pid file (-D) ------------------------------------------------------

    @property
    def pid_path(self) -> Path:
        return self.path / PID_FILE

    def write_pid(self) -> Path:
        """Create and lock the pid file with our pid; PybpftuneError if another
        live daemon holds it."""
        self.ensure()
        fd = os.open(self.pid_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise PybpftuneError(
                f"another pybpftune daemon (pid {other}) is running with state directory {self.path}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._pid_fd = fd
        return self.pid_path

    def remove_pid(self) -> None:
        if self._pid_fd is None:
            return
        try:
            self.pid_path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._pid_fd)
        self._pid_fd = None

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
