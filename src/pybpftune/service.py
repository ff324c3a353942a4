"""Running as a service: systemd's notify protocol, its watchdog, and -D.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET``; the daemon says
``READY=1`` once every tuner that can start has attached (and the query
socket, if any, is up), ``STATUS=`` lines as it goes, ``STOPPING=1`` when it
starts to shut down, and ``WATCHDOG=1`` from its event loop at half the
``WATCHDOG_USEC`` interval, so a wedged loop stops the pings and systemd
restarts the service.  The datagrams go through the ``systemd_watchdog``
library (imported only when NOTIFY_SOCKET is set); whether the watchdog
applies to this process (``WATCHDOG_PID``) is decided here, as
``sd_watchdog_enabled(3)`` does, because the library measures its own
intervals with the wall clock, which can jump.

``-D`` (:func:`detach`) forks into the background, but the parent waits until
the child is ready or has failed, so ``bpftune -D`` exits 0 only for a daemon
that runs, and an operator's mistake still ends in one line and exit 1.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections import Counter
from collections.abc import Mapping
from typing import Any

from .errors import UsageError

log = logging.getLogger("pybpftune.service")


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings (half of WATCHDOG_USEC), or None when the
    watchdog is off or meant for another process (WATCHDOG_PID)."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner is not None and owner != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 2e6


class Notifier:
    """sd_notify(3) messages to the service manager; every method is a no-op
    when there is no NOTIFY_SOCKET (not started by systemd with Type=notify)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        self.watchdog = watchdog_interval(env) if self.address else None
        self._wd: Any = None
        self._sock: socket.socket | None = None
        if self.address:
            from systemd_watchdog.systemd_watchdog import WatchDog

            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._wd = WatchDog(sock=self._sock, addr=self.address)
        self.sent: Counter[str] = Counter()  # message kind ("READY", "WATCHDOG", ...) -> times sent

    @property
    def enabled(self) -> bool:
        return self._wd is not None

    def _send(self, message: str) -> None:
        if self._wd is None:
            return
        try:
            if message == "READY=1":
                self._wd.ready()
            elif message == "WATCHDOG=1":
                self._wd.notify()
            elif message.startswith("STATUS="):
                self._wd.status(message.removeprefix("STATUS="))
            else:
                # STOPPING=1 has no public method in the library (pinned <2);
                # its sender takes any state line.
                self._wd._send(message + "\n")
        except OSError as exc:
            # The manager may be gone (shutdown); never fail the daemon for it.
            log.debug("sd_notify %s failed: %s", message, exc)
            return
        self.sent[message.partition("=")[0]] += 1

    def ready(self, status: str) -> None:
        self._send(f"STATUS={status}")
        self._send("READY=1")

    def status(self, text: str) -> None:
        self._send(f"STATUS={text}")

    def stopping(self) -> None:
        self._send("STOPPING=1")
        self._send("STATUS=stopping: summary, rollback, detaching programs")

    def ping(self) -> None:
        self._send("WATCHDOG=1")

    def close(self) -> None:
        self._wd = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Detached:
    """The child side of ``-D``: report readiness or failure to the waiting parent."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, data)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def ready(self) -> None:
        self._write(b"ok\n")

    def failed(self, message: str) -> None:
        self._write(b"error " + message.encode(errors="replace")[:4000] + b"\n")

    @property
    def pending(self) -> bool:
        return self._fd is not None


def detach(keep_stderr: bool = False) -> Detached:
    """Double fork into a new session with stdio on /dev/null (stderr kept
    with ``keep_stderr``, for ``-D -s``, as bpftune keeps its stdio).  The original
    process waits for :meth:`Detached.ready` (exit 0) or :meth:`Detached.failed`
    (its message on stderr, exit 1); a child that dies without a word is exit 1."""
    r, w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() > 0:
        os.close(w)
        reply = b""
        while chunk := os.read(r, 4096):
            reply += chunk
        text = reply.decode(errors="replace").strip()
        if text == "ok":
            os._exit(0)
        message = text.removeprefix("error ") if text else "the daemon exited during start-up (see the system log)"
        sys.stderr.write(f"bpftune: {message}\n")
        os._exit(1)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1) if keep_stderr else (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return Detached(w)


def parse_metrics_address(text: str, default_port: int) -> tuple[str, int]:
    """``ADDR:PORT``, ``[V6]:PORT``, ``:PORT``/``PORT`` (loopback) or ``ADDR`` (default port)."""
    host, port_s = "127.0.0.1", ""
    text = text.strip()
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise UsageError(f"bad metrics address {text!r}: expected [ADDR]:PORT")
        host, port_s = inner, rest[1:]
    elif text.isdigit():
        port_s = text
    elif text.count(":") == 1:
        h, port_s = text.split(":")
        host = h or host
    elif ":" in text:
        host = text  # a bare IPv6 address
    else:
        host = text
    if not port_s:
        return host, default_port
    if not port_s.isdigit() or not 0 <= int(port_s) < 65536:
        raise UsageError(f"bad metrics port {port_s!r} in {text!r}: expected 0-65535 (0: any free port)")
    return host, int(port_s)
