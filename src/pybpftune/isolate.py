"""Run a BPF load in a short-lived child process and take its fds back.

libbpf 1.1 reads the kernel's BTF for every object it loads (4.4 MB on
Debian's 6.1, 5.5 MB on 6.18) and holds two copies of it while it relocates:
each load lifts the process by 9-11 MB for a few hundred milliseconds.  It is
all freed afterwards, but a daemon's peak RSS (VmHWM) is set by that moment,
not by the 20 MB it lives in.  So the support probe and every object load run
in a child forked for the purpose: it shares the daemon's pages copy-on-write
(the configured object, the shared maps' fds, the cgroup fd), does the load
and the attaches, sends back a small ``marshal``-able answer and the fds of
what it created (programs, maps, links) over a socketpair with SCM_RIGHTS,
and exits.  The kernel objects live on through the daemon's copies of the fds;
the child's memory is never the daemon's.  A :class:`Stream` runs several
jobs in one child (the start-up's loads: one fork instead of nine, 60-160 ms
each in an emulated guest) and sends each answer as soon as its job is done.

The child is forked from whichever thread asks (the daemon's load thread), so
it must only run code whose modules are already imported (another thread may
hold an import lock that no thread in the child will ever release), must not
log (libbpf's lines and the job's debug notes come back with the answer and
are logged by the parent), and ends with ``os._exit``: it never returns into
the caller's stack.  Errors come back typed (:func:`freeze`/:func:`thaw`).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import marshal
import os
import signal
import socket
import struct
import time
import traceback
from collections.abc import Callable
from typing import Any

from . import libbpf
from .errors import AttachError, BpfError, BpfLoadError, BpfObjectError, NotSupported, PybpftuneError
from .resource import Resource

log = logging.getLogger("pybpftune.isolate")

# What a job returns: a marshal-able value and the fds to hand over.
Job = Callable[[], tuple[Any, list[int]]]
_HEADER = struct.Struct("=Q")
_MAX_FDS = 253  # SCM_MAX_FD: what one message may carry
PR_SET_PDEATHSIG = 1
_BLOCKED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2}


def _find_prctl() -> Any:
    try:
        return ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return None


# Looked up here: a forked child must not dlopen or dlsym (another thread
# may have held the dynamic loader's lock when it was forked).
_PRCTL = _find_prctl()


class IsolatedError(PybpftuneError):
    """The child died, or failed in a way that is a bug (its traceback is the message)."""


def freeze(exc: BaseException) -> tuple[Any, ...]:
    """An exception as marshal-able fields (:func:`thaw` rebuilds it)."""
    if isinstance(exc, BpfLoadError):
        return ("load", exc.object_name, exc.errno, list(exc.log_tail), exc.program)
    if isinstance(exc, AttachError):
        return ("attach", exc.what, exc.errno)
    if isinstance(exc, BpfError):
        return ("bpf", exc.what, exc.errno)
    if isinstance(exc, NotSupported):
        return ("notsup", exc.feature, exc.reason)
    if isinstance(exc, BpfObjectError):
        return ("object", str(exc))
    if isinstance(exc, PybpftuneError):
        return ("pybpftune", str(exc))
    return ("bug", "".join(traceback.format_exception(exc)).rstrip())


def thaw(frozen: tuple[Any, ...]) -> PybpftuneError:
    kind, *fields = frozen
    if kind == "load":
        return BpfLoadError(fields[0], fields[1], fields[2], fields[3])
    if kind == "attach":
        return AttachError(fields[0], fields[1])
    if kind == "bpf":
        return BpfError(fields[0], fields[1])
    if kind == "notsup":
        return NotSupported(fields[0], fields[1])
    if kind == "object":
        return BpfObjectError(fields[0])
    if kind == "pybpftune":
        return PybpftuneError(fields[0])
    return IsolatedError(f"the loading process failed:\n{fields[0]}")


def run(job: Job, what: str) -> tuple[Any, list[int]]:
    """Run ``job`` in a forked child; return its value and the fds it handed
    over (now the caller's to close).  Its errors are raised here, typed."""
    with Stream([(job, what)]) as stream:
        return stream.next()


class Stream(Resource):
    """Several jobs in one forked child, in order; :meth:`next` returns each
    one's answer as soon as the child has sent it (the child goes on with the
    next job meanwhile).  A job's error is that job's: the child carries on.
    ``close()`` (idempotent) ends the child, done or not: what it already
    made but the caller did not take is released with it."""

    def __init__(self, jobs: list[tuple[Job, str]]) -> None:
        self._whats = [what for _, what in jobs]
        self._taken = 0
        self._pid: int | None = None
        self._status: int | None = None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._started = time.monotonic()
        ppid = os.getpid()
        try:
            pid = os.fork()
        except BaseException:
            parent.close()
            child.close()
            raise
        if pid == 0:  # pragma: no cover - the child; its work is checked through the parent
            _child([job for job, _ in jobs], child, parent, ppid)
        child.close()
        self._sock: socket.socket | None = parent
        self._pid = pid

    def __len__(self) -> int:
        return len(self._whats) - self._taken

    def next(self) -> tuple[Any, list[int]]:
        """The next job's value and fds (the caller's to close); its error
        raised, typed; IsolatedError if the child died before answering."""
        if self._taken >= len(self._whats):
            raise IsolatedError("no job left in the loading process")
        what = self._whats[self._taken]
        self._taken += 1
        if self._sock is None:
            raise IsolatedError(f"{what}: the loading process was ended before it answered")
        try:
            frozen, fds = _receive(self._sock)
        except BaseException:
            self.close()
            raise
        if frozen is None:
            self.close()
            assert self._status is not None
            raise IsolatedError(f"{what}: the loading process ended without an answer ({_describe(self._status)})")
        if self._taken == len(self._whats):
            self.close()  # the child has nothing left to say: reap it now
        try:
            ok, value, lines, busy = frozen
            libbpf.replay_log(lines)
            log.debug(
                "%s in a child: %.0f ms, %.0f ms of it its own work",
                what,
                (time.monotonic() - self._started) * 1e3,
                busy * 1e3,
            )
            self._started = time.monotonic()
            if not ok:
                raise thaw(value)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return value, fds

    def close(self) -> None:
        """End the child and reap it.  If it still works, it is killed: its
        fds (and the kernel objects only they hold) go with it, and those it
        sent but nobody received are released with the socket."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        pid, self._pid = self._pid, None
        if pid is None:
            return
        if self._taken < len(self._whats):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, self._status = os.waitpid(pid, 0)


def _child(jobs: list[Job], sock: socket.socket, other: socket.socket, ppid: int) -> None:  # pragma: no cover
    code = 1
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
        # A daemon killed during its start-up takes its loading child along
        # (sent when the forking thread ends: the load thread outlives every
        # load it waits for), rather than leave it attaching programs.
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != ppid:
            return
        other.close()
        gc.disable()  # a collection would touch (and copy) every page of the parent's heap
        logging.disable(logging.CRITICAL)
        lines = libbpf.keep_log_in_child()
        for job in jobs:
            fds: list[int] = []
            started = time.monotonic()
            try:
                value, fds = job()
                if len(fds) > _MAX_FDS:
                    raise PybpftuneError(f"{len(fds)} fds to hand over, at most {_MAX_FDS}")
                answer: tuple[Any, ...] = (True, value, list(lines), time.monotonic() - started)
            except BaseException as exc:
                answer, fds = (False, freeze(exc), list(lines), time.monotonic() - started), []
            lines.clear()
            payload = marshal.dumps(answer)
            socket.send_fds(sock, [_HEADER.pack(len(payload))], fds)
            sock.sendall(payload)
        code = 0
    finally:
        os._exit(code)


def _receive(sock: socket.socket) -> tuple[Any, list[int]]:
    """(answer, fds), or (None, []) when the child sent nothing."""
    data, fds, flags, _ = socket.recv_fds(sock, _HEADER.size, _MAX_FDS)
    try:
        if not data:
            for fd in fds:
                os.close(fd)
            return None, []
        if flags & socket.MSG_CTRUNC:
            raise IsolatedError("the loading process handed over more fds than fit")
        while len(data) < _HEADER.size:
            more = sock.recv(_HEADER.size - len(data))
            if not more:
                raise IsolatedError("the loading process's answer was cut short")
            data += more
        (size,) = _HEADER.unpack(data)
        chunks = bytearray()
        while len(chunks) < size:
            more = sock.recv(min(size - len(chunks), 1 << 20))
            if not more:
                raise IsolatedError("the loading process's answer was cut short")
            chunks += more
        return marshal.loads(bytes(chunks)), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by {name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
