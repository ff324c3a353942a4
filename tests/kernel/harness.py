"""Shared machinery for kernel tests: namespaces, sysctls, a running daemon.

Everything here cleans up after itself even when the test fails: sysctls are
restored, namespaces and links deleted, the daemon stopped (SIGKILL as a last
resort).  Test hosts live in namespaces the test creates; traffic never leaves
them.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BPFTUNE = Path(sys.executable).parent / "bpftune"
_counter = itertools.count()


# Under qemu/TCG (PYBPFTUNE_VM=1, set by tests/vm/vmtest.py) everything runs
# 10-40x slower: waits scale with SLOW, and the daemon's start-up (Python
# imports, probing, loading) takes up to a minute there.
IN_VM = os.environ.get("PYBPFTUNE_VM") == "1"
SLOW = 10 if IN_VM else 1
START_TIMEOUT = 300.0 if IN_VM else 60.0


@contextmanager
def trusted_dir() -> Iterator[Path]:
    """A plugin directory the daemon trusts: root's, under /run (root-owned,
    not group/other-writable), never under /tmp, which it refuses."""
    path = Path(tempfile.mkdtemp(prefix="pybpftune-test-plugins.", dir="/run"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@functools.cache
def demo_tuners_dir() -> Path:
    """A trusted copy of tests/tuners for `-l`: the daemon refuses plugins below
    any directory others could write, and a checkout may live under /tmp."""
    path = Path(tempfile.mkdtemp(prefix="pybpftune-test-tuners.", dir="/run"))
    atexit.register(shutil.rmtree, path, True)
    for f in (Path(__file__).resolve().parents[1] / "tuners").glob("*_tuner.py"):
        shutil.copyfile(f, path / f.name)
    return path


def journaled(state_dir: Path) -> dict[str, tuple[int, ...] | str]:
    """Tunable -> journaled original, for what the journal still holds
    (every namespace; the last original per name)."""
    from pybpftune.journal import boot_id, replay

    path = state_dir / "journal.jsonl"
    if not path.exists():
        return {}
    rep = replay(path.read_bytes(), boot_id(), lambda kind, name: True)
    return {p.tunable: p.original for p in rep.pending}


def run(cmd: Sequence[str], netns: str | None = None, check: bool = True, timeout: float = 60) -> str:
    """Run a command (inside ``netns`` if given); its stdout."""
    full = ["ip", "netns", "exec", netns, *cmd] if netns else list(cmd)
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(full)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def sysctl_get(name: str, netns: str | None = None) -> str:
    return " ".join(run(["sysctl", "-n", name], netns).split())


def sysctl_set(name: str, value: str | int, netns: str | None = None) -> None:
    run(["sysctl", "-q", "-w", f"{name}={value}"], netns)


class Sysctls:
    """Set sysctls for a test; every one is restored on close, in reverse."""

    def __init__(self) -> None:
        self._saved: list[tuple[str, str | None, str]] = []

    def set(self, name: str, value: str | int, netns: str | None = None) -> None:
        if not any(n == name and ns == netns for n, ns, _ in self._saved):
            self._saved.append((name, netns, sysctl_get(name, netns)))
        sysctl_set(name, value, netns)

    def save(self, name: str, netns: str | None = None) -> None:
        """Remember a sysctl something else (the daemon) may change."""
        if not any(n == name and ns == netns for n, ns, _ in self._saved):
            self._saved.append((name, netns, sysctl_get(name, netns)))

    def restore(self) -> None:
        for name, netns, value in reversed(self._saved):
            try:
                sysctl_set(name, value, netns)
            except (AssertionError, subprocess.TimeoutExpired):
                pass  # the namespace may already be gone
        self._saved.clear()


@contextmanager
def sysctls() -> Iterator[Sysctls]:
    s = Sysctls()
    try:
        yield s
    finally:
        s.restore()


@dataclass
class NetnsPair:
    """Two namespaces joined by a veth pair: a server side and a client side."""

    server: str
    client: str
    server_addr: str = "192.168.168.1"
    client_addr: str = "192.168.168.2"
    server_addr6: str = "fd00:168::1"
    client_addr6: str = "fd00:168::2"
    server_dev: str = ""
    client_dev: str = ""
    extra: list[str] = field(default_factory=list)


@contextmanager
def netns_pair(prefix: str = "pbt") -> Iterator[NetnsPair]:
    """Fresh namespaces ``<prefix><pid>s``/``c`` over veth, removed afterwards."""
    tag = f"{prefix}{os.getpid()}x{next(_counter)}"
    pair = NetnsPair(server=f"{tag}s", client=f"{tag}c", server_dev=f"{tag}a"[:15], client_dev=f"{tag}b"[:15])
    try:
        for ns in (pair.server, pair.client):
            run(["ip", "netns", "add", ns])
            run(["ip", "link", "set", "lo", "up"], ns)
        run(
            [
                "ip",
                "link",
                "add",
                pair.server_dev,
                "netns",
                pair.server,
                "type",
                "veth",
                "peer",
                "name",
                pair.client_dev,
                "netns",
                pair.client,
            ]
        )
        for ns, dev, a4, a6 in (
            (pair.server, pair.server_dev, pair.server_addr, pair.server_addr6),
            (pair.client, pair.client_dev, pair.client_addr, pair.client_addr6),
        ):
            run(["ip", "addr", "add", f"{a4}/24", "dev", dev], ns)
            run(["ip", "-6", "addr", "add", f"{a6}/64", "dev", dev, "nodad"], ns, check=False)
            run(["ip", "link", "set", dev, "up"], ns)
        yield pair
    finally:
        for ns in (pair.client, pair.server, *pair.extra):
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextmanager
def iperf3_server(netns: str, port: int = 5201) -> Iterator[None]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, "iperf3", "-s", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        yield
    finally:
        proc.kill()
        proc.wait()


# iperf3 client errors that mean "try again": the server is not listening yet
# (it takes seconds to start in the VMs), or it is still closing the previous
# test (one test at a time; slow under loss).
IPERF3_RETRY = ("unable to connect", "the server is busy")


def iperf3_retrying(cmd: Sequence[str], seconds: float, ready_within: float = 60) -> str:
    """Run an iperf3 client command line; retried for up to ``ready_within``
    seconds while the server cannot take it yet."""
    deadline = time.monotonic() + ready_within
    while True:
        try:
            return run(cmd, timeout=seconds + 60)
        except AssertionError as exc:
            if not any(s in str(exc) for s in IPERF3_RETRY) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def iperf3(netns: str, server: str, seconds: float = 3, port: int = 5201, extra: Sequence[str] = ()) -> str:
    """One iperf3 client run from ``netns``; its stdout."""
    cmd = ["ip", "netns", "exec", netns, "iperf3", "-c", server, "-p", str(port), "-t", str(seconds), *extra]
    return iperf3_retrying(cmd, seconds)


class Daemon:
    """`bpftune` as a subprocess, with its stderr collected line by line.
    ``wrapper`` runs it under another command (``unshare --pid --fork ...``):
    then ``proc`` is the wrapper's process, not the daemon's."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, wrapper: Sequence[str] = ()) -> None:
        self.args = [*wrapper, str(BPFTUNE), *args]
        self.lines: list[str] = []
        self.stamps: list[float] = []  # time.monotonic() when each line arrived
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self.stamps.append(time.monotonic())
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30, start: int = 0) -> re.Match[str]:
        """The first line (from index ``start``) matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    m = regex.search(line)
                    if m:
                        return m
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r} within {timeout}s; output:\n{self.output}")
                self._cond.wait(min(remaining, 0.2))

    def started(self, timeout: float = START_TIMEOUT) -> Daemon:
        self.wait_for(r"bpftune started", timeout)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tuner_daemon(tuner: str, state_dir: Path, variant_args: Sequence[str], *extra: str) -> Daemon:
    """`bpftune -s -a <tuner>` keeping its state in ``state_dir``, for the variant under test."""
    return Daemon(["-s", "-a", tuner, "--state-dir", str(state_dir), *variant_args, *extra])


def repeat_until_logged(
    d: Daemon, action: Callable[[], None], pattern: str, timeout: float = 60, look: float = 0.5
) -> re.Match[str]:
    """Run ``action`` (make traffic) again and again, looking ``look`` seconds
    each time for a line matching ``pattern``, for up to ``timeout`` (times
    SLOW) seconds; the first matching line."""
    deadline = time.monotonic() + timeout * SLOW
    while True:
        action()
        try:
            return d.wait_for(pattern, timeout=look)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
