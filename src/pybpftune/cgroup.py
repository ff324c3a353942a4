"""The cgroup v2 root that cgroup programs (sysctl, sockops) attach to.

Prefer an existing cgroup2 mount (no side effects); otherwise mount a private
one under the state directory and remove it on close.  Also finds programs of
ours left attached by an earlier daemon (bpf_prog_attach-style attachments
survive their process; the bpf_link ones the daemon makes do not) and
detaches them.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Self

from . import libbpf
from .errors import BpfError, PybpftuneError
from .procfs import mounts
from .resource import Resource
from .state import StateDir
from .support import find_cgroup2

log = logging.getLogger("pybpftune.cgroup")

_libc = ctypes.CDLL(None, use_errno=True)  # libc is in the process already (see netns.py)
MNT_DETACH = 2


def _is_cgroup2_mount(path: Path) -> bool:
    """Is ``path`` (resolved: /proc/self/mounts names real paths, and
    /var/run is a symbolic link to /run) a cgroup2 mount point?"""
    real = Path(os.path.realpath(path))
    return any(m.fstype == "cgroup2" and Path(m.target) == real for m in mounts())


class CgroupRoot(Resource):
    """An open fd on a cgroup v2 root; mounts one only if it must."""

    def __init__(self, state: StateDir, path: Path | None = None) -> None:
        self._state = state
        self._requested = path
        self.path: Path | None = None
        self.fd: int | None = None
        self._mounted = False

    def open(self) -> int:
        if self.fd is not None:
            return self.fd
        path = self._requested
        if path is None:
            found = find_cgroup2()
            path = Path(found) if found else self._state.subdir("cgroupv2")
        # Resolved: bpftune's default, /var/run/bpftune/cgroupv2, goes through
        # the /var/run -> /run link, and a mount left by a daemon that was
        # killed must be found (and reused) rather than mounted over.
        path = Path(os.path.realpath(path))
        if not _is_cgroup2_mount(path):
            path.mkdir(mode=0o755, parents=True, exist_ok=True)
            if _libc.mount(b"cgroup2", str(path).encode(), b"cgroup2", 0, None) != 0:
                err = ctypes.get_errno()
                raise PybpftuneError(f"cannot mount cgroup2 at {path}: {os.strerror(err)}")
            self._mounted = True
            log.debug("mounted cgroup2 at %s", path)
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self.fd

    def detach_stale(self, attach_type: int, names: set[str], keep: set[int]) -> int:
        """Detach programs named like ours (full names, as bpftool shows
        them) that we did not attach: ones attached with bpf_prog_attach,
        which outlive their process (bpftune's way; ours are bpf_links, which
        the kernel detaches when the daemon dies, however it dies)."""
        if self.fd is None or not names:
            return 0
        try:
            attached = libbpf.cgroup_programs(self.fd, attach_type)
        except BpfError as exc:
            log.debug("cannot list cgroup programs: %s", exc)
            return 0
        # Without BTF the kernel knows only the first 15 characters.
        wanted = names | {n[:15] for n in names}
        detached = 0
        for prog_id in attached:
            if prog_id in keep:
                continue
            try:
                prog_fd = libbpf.prog_fd_by_id(prog_id)
            except BpfError:
                continue  # gone meanwhile
            try:
                name = libbpf.program_full_name(prog_fd)
                if name not in wanted:
                    continue
                log.info("detaching old BPF program '%s' (id %d) left by a previous daemon", name, prog_id)
                libbpf.prog_detach(prog_fd, self.fd, attach_type)
                detached += 1
            except BpfError as exc:
                log.info("could not detach old program %d: %s", prog_id, exc)
            finally:
                os.close(prog_fd)
        return detached

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self._mounted and self.path is not None:
            if _libc.umount2(str(self.path).encode(), MNT_DETACH) == 0:
                try:
                    self.path.rmdir()
                except OSError:
                    pass
            self._mounted = False

    def __enter__(self) -> Self:
        self.open()  # entering opens it (the other resources are open once made)
        return self
