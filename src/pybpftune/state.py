"""The state directory (/run/pybpftune): the only code that writes there.

It holds one journal of original values per daemon process
(``originals-<pid>.jsonl``): before the daemon first changes a tunable in a
namespace, the original is appended and fsync'ed, so a daemon killed with
SIGKILL leaves enough behind for the next start to restore.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("pybpftune.state")

DEFAULT_STATE_DIR = Path("/run/pybpftune")
JOURNAL_GLOB = "originals-*.jsonl"


@dataclass(frozen=True)
class JournalEntry:
    pid: int
    tuner: str
    tunable: str
    netns_cookie: int
    global_ns: bool
    original: tuple[int, ...]


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
        lines = []
        for p in self._dead_journals():
            try:
                lines.extend(p.read_text().splitlines())
            except OSError:
                continue
        entries = []
        for line in lines:
            try:
                raw = json.loads(line)
                entry = JournalEntry(
                    int(raw["pid"]),
                    str(raw["tuner"]),
                    str(raw["tunable"]),
                    int(raw["netns_cookie"]),
                    bool(raw["global_ns"]),
                    tuple(int(v) for v in raw["original"]),
                )
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a corrupt line in %s", self.journal_path)
                continue
            entries.append(entry)
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
        line = json.dumps(
            {
                "pid": entry.pid,
                "tuner": entry.tuner,
                "tunable": entry.tunable,
                "netns_cookie": entry.netns_cookie,
                "global_ns": entry.global_ns,
                "original": list(entry.original),
            }
        )
        os.write(self._journal_fd, (line + "\n").encode())
        os.fsync(self._journal_fd)

    def clear_journal(self) -> None:
        """After a clean exit (and rollback, if asked) nothing is pending."""
        self.close()
        try:
            self.journal_path.unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
