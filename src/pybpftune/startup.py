"""What the daemon starts before its own (heavy) imports: the load thread
and the support probe on it.

``launch.start_daemon`` calls :func:`begin_probe` as soon as it knows a daemon is to
run, so the probe (a kernel-BTF parse and nine verifications: about a second
in an emulated guest, and the first daemon of a boot has no cache to skip it)
overlaps the import of the daemon, the store, the registry and the tuners.
The daemon then loads the tuner objects on the same thread.  This module
imports only what the probe needs.
"""

from __future__ import annotations

import collections
import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .support import KindSupport, cache_key, kinds_from_text, probe_support


class LoadThread:
    """One thread that runs jobs in order; ``done(result, exc)`` is called on
    that thread after each.  Jobs are the daemon's slow C work (the probe,
    object loads); see the module docstring."""

    def __init__(self) -> None:
        self._jobs: collections.deque[tuple[Callable[[], object], Callable[[object, BaseException | None], None]]]
        self._jobs = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], object], done: Callable[[object, BaseException | None], None]) -> None:
        with self._cond:
            self._jobs.append((job, done))
            self._cond.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pybpftune-load", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                job, done = self._jobs.popleft()
            try:
                result = job()
            except BaseException as exc:
                done(None, exc)
            else:
                done(result, None)

    def close(self) -> None:
        """Drop the jobs not yet started, wait for the one running.  Idempotent."""
        with self._cond:
            self._closing = True
            self._jobs.clear()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class Future:
    """A result the load thread hands to the main thread."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._result: object = None
        self._exc: BaseException | None = None

    def set(self, result: object, exc: BaseException | None) -> None:
        self._result, self._exc = result, exc
        self._event.set()

    def result(self) -> object:
        self._event.wait()
        if self._exc is not None:
            raise self._exc
        return self._result


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def tune_malloc() -> None:
    """glibc settings for a daemon that parses kernel BTF at start and then idles.

    Each object load makes libbpf read the kernel's BTF (4-6 MB) and copy it,
    then free both.  With glibc's default (dynamic) mmap threshold, after the
    first such free the next copies come from the heap and stay resident until
    the heap happens to shrink; a fixed threshold keeps every copy in its own
    mapping, returned on free.  One arena: the load thread's allocations would
    otherwise fill an arena of their own that outlives the loads (about 1 MB
    of idle RSS).  Must run before the load thread starts; repeating is harmless."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_ARENA_MAX, 1)
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 256 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


@dataclass
class EarlyProbe:
    """The probe under way (or this boot's cached answer) and its thread."""

    loader: LoadThread
    key: str
    kinds: dict[str, KindSupport] | None
    probed: Future = field(default_factory=Future)


def begin_probe(cache_dir: Path | None, loader: LoadThread | None = None) -> EarlyProbe:
    """Start probing on ``loader`` (a new load thread by default) unless this
    boot's answer is cached in ``cache_dir`` (read only here; the daemon
    writes it).  A daemon started without an early probe begins it here too."""
    from .state import StateDir

    tune_malloc()
    loader = loader if loader is not None else LoadThread()
    key, kinds = "", None
    if cache_dir is not None:
        key = cache_key()
        text = StateDir(cache_dir).read_cache("support") if key else None
        kinds = kinds_from_text(text, key) if text is not None else None
    early = EarlyProbe(loader, key, kinds)
    if kinds is None:
        loader.submit(probe_support, early.probed.set)
    return early
