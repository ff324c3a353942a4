"""Capabilities: after start-up the daemon keeps only what it still uses.

Start-up (probing, loading and attaching BPF, mounting a cgroup2, raising
RLIMIT_MEMLOCK, modprobe of congestion controls, binding the metrics port)
needs most of root.  Once the tuners run, the daemon still:

* enters other network namespaces (``setns``: CAP_SYS_ADMIN) and, at exit,
  unmounts a private cgroup2 (CAP_SYS_ADMIN);
* calls bpf(2) on fds it already holds: map updates from Python, program
  queries, cgroup detach at exit (all gated on CAP_SYS_ADMIN or CAP_BPF when
  unprivileged BPF is off, the default);
* changes neighbour tables over rtnetlink (CAP_NET_ADMIN) and writes
  /proc/sys as uid 0 (no capability: root owns the files);
* opens ``/proc/<pid>/ns/net`` of other processes to learn their namespaces
  (a ptrace-mode check: needs CAP_SYS_PTRACE unless the target's permitted
  set is a subset of ours, which it is not for any full-root process).

So :data:`RUNTIME_CAPS` is CAP_SYS_ADMIN, CAP_NET_ADMIN and CAP_SYS_PTRACE;
every other capability leaves the effective, permitted, inheritable, ambient
and bounding sets, and no_new_privs is set.  bpftune keeps CAP_SYS_CHROOT,
CAP_SYS_MODULE and CAP_SYSLOG too: we enter no mount namespace (no chroot),
modprobe only at start-up, and resolve kernel symbols only while loading.

Linux capabilities are per thread: :func:`drop_to` changes the calling
thread, and threads started afterwards inherit its sets.  The daemon calls it
on its main thread before it starts any other thread.

The capability numbers are the kernel's ABI (``linux/capability.h``); a unit
test compares them with the header where it is installed.  The calls go
through ctypes and the C library, as :mod:`pybpftune.netns` does for setns
(only :mod:`pybpftune.libbpf` calls the cffi extension, which binds libbpf).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from pathlib import Path

from .errors import PybpftuneError

# Index = capability number (linux/capability.h, stable ABI).
CAP_NAMES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
CAP_NUMBERS = {name: i for i, name in enumerate(CAP_NAMES)}

RUNTIME_CAPS: frozenset[str] = frozenset({"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SYS_PTRACE"})

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# The C library is already in the process (CDLL(None)); ctypes.util.find_library
# would run ldconfig in a subprocess and keep a megabyte of imports (subprocess,
# shutil, tempfile, bz2, lzma) in the daemon for good.
_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32))


class CapsError(PybpftuneError):
    """The kernel refused a capability change."""


def mask(names: Iterable[str]) -> int:
    """The bit mask of capability names (unknown names are an error)."""
    out = 0
    for name in names:
        try:
            out |= 1 << CAP_NUMBERS[name]
        except KeyError:
            raise CapsError(f"unknown capability {name!r}") from None
    return out


def names(bits: int) -> list[str]:
    """Capability names of a mask, by number; bits past the known ones as 'cap_N'."""
    return [CAP_NAMES[i] if i < len(CAP_NAMES) else f"cap_{i}" for i in range(bits.bit_length()) if bits >> i & 1]


def status(pid: int | str = "self") -> dict[str, int]:
    """The Cap* lines of /proc/PID/status: {'CapEff': mask, 'CapPrm': ..., 'CapBnd': ...}."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Cap"):
            out[key] = int(value.strip(), 16)
    return out


def _last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return len(CAP_NAMES) - 1


def _prctl(option: int, arg: int, arg3: int = 0) -> int:
    ret: int = _libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0))
    return ret


def drop_to(keep: Iterable[str] = RUNTIME_CAPS) -> int:
    """Reduce the calling thread to ``keep`` (those of them it has); returns the
    mask it kept.  Bounding set first (needs CAP_SETPCAP, still held), then
    ambient, then effective/permitted/inheritable in one capset."""
    wanted = mask(keep)
    have = status()
    kept = wanted & have.get("CapPrm", 0)
    for cap in range(_last_cap() + 1):
        if not wanted >> cap & 1 and have.get("CapBnd", 0) >> cap & 1 and _prctl(PR_CAPBSET_DROP, cap) != 0:
            err = ctypes.get_errno()
            raise CapsError(f"cannot drop {names(1 << cap)[0]} from the bounding set: {os.strerror(err)}")
    # Ambient capabilities exist since 4.3; EINVAL before that means there are none.
    if _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL) != 0 and ctypes.get_errno() != 22:
        raise CapsError(f"cannot clear the ambient capabilities: {os.strerror(ctypes.get_errno())}")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for word in range(2):
        bits = kept >> (32 * word) & 0xFFFFFFFF
        data[word].effective = bits
        data[word].permitted = bits
        data[word].inheritable = 0
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise CapsError(f"capset failed: {os.strerror(ctypes.get_errno())}")
    if _prctl(PR_SET_NO_NEW_PRIVS, 1) != 0:
        raise CapsError(f"cannot set no_new_privs: {os.strerror(ctypes.get_errno())}")
    return kept
