"""Load a tuner object with the best working form of each kernel signal.

A BPF source may write one signal in several forms ("bpftune_<signal>__<form>"
programs: a tracepoint, an fentry, a kprobe).  :func:`load_object` switches
off the forms the support probe already knows cannot work here, loads, and
attaches; if the kernel refuses a form at load (verifier, missing BTF target)
or at attach (no such tracepoint or symbol), that form is marked dead and the
object is reopened with the next one.  It fails only when a required signal
has no form left, and the error names the signal and every reason.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import isolate
from .errors import AttachError, BpfLoadError, NotSupported, PybpftuneError
from .objects import (
    CGROUP_KINDS,
    LoadedObject,
    OpenObject,
    ProgramInfo,
    SignalChoice,
    check_object_bytes,
    read_object_file,
)
from .ringbuf import SharedMaps
from .support import Support

log = logging.getLogger("pybpftune.loader")

# Preferred first: typed tracepoints are stable ABI, then raw tracepoints,
# then trampolines, then kprobes (slowest, and most exposed to inlining).
FORM_PREFERENCE = ("tp_btf", "raw_tp", "tracepoint", "fentry", "kprobe", "iter")
MAX_ATTEMPTS = 16
# Load objects in a forked child by default (see load_object and isolate.py).
ISOLATED = True
# Kinds libbpf attaches from the section name alone; others (cgroup kinds,
# XDP, tc) need a target, and their owner attaches them.
AUTO_ATTACH_KINDS = frozenset({"tp_btf", "raw_tp", "tracepoint", "fentry", "fexit", "kprobe", "kretprobe", "iter"})


def _rank(family: str, prefer: tuple[str, ...] = ()) -> tuple[int, int]:
    """A family's place: the object's own preference first, then ours."""
    first = prefer.index(family) if family in prefer else len(prefer)
    return first, FORM_PREFERENCE.index(family) if family in FORM_PREFERENCE else len(FORM_PREFERENCE)


@dataclass(frozen=True)
class SignalPolicy:
    """Which signals a tuner can live without, and which form families it
    would rather have tried first (e.g. a hook that fires less often)."""

    optional: frozenset[str] = frozenset()
    prefer: tuple[str, ...] = ()


def _signals(programs: Iterable[ProgramInfo], prefer: tuple[str, ...] = ()) -> dict[str, dict[str, list[str]]]:
    """signal -> form family -> program names, families in preference order."""
    out: dict[str, dict[str, list[str]]] = {}
    for info in programs:
        if info.signal is None:
            continue
        out.setdefault(info.signal, {}).setdefault(info.family, []).append(info.name)
    return {sig: dict(sorted(fams.items(), key=lambda kv: _rank(kv[0], prefer))) for sig, fams in out.items()}


def load_object(
    source: Path | bytes,
    name: str,
    support: Support,
    *,
    shared: SharedMaps | None = None,
    globals_: Mapping[str, int] | None = None,
    optional_signals: Iterable[str] = (),
    cgroup_fd: int | None = None,
    configure: Callable[[OpenObject], None] | None = None,
    isolated: bool | None = None,
    prefer: Iterable[str] = (),
) -> LoadedObject:
    """Open, configure, load and attach ``source`` with the best forms.

    ``shared``: the maps every object shares (the ring buffer's among them),
    reused by this one or created by it.  ``globals_`` are set before load
    (missing names are an error);
    ``configure`` may adjust the object further before each load attempt.
    Raises NotSupported when a required signal has no working form, and
    BpfLoadError/AttachError for failures no fallback can explain.

    ``isolated`` (default :data:`ISOLATED`): do the loading in a forked child
    that hands the fds back (isolate.py), so that libbpf's copies of the
    kernel BTF never count in this process's peak memory.  The object is then
    opened again here, with the child's choices, and adopts the fds; it cannot
    attach more programs afterwards.  :class:`LoadBatch` does several loads
    in one child.
    """
    return load(
        LoadRequest(source, name, support, shared, globals_, optional_signals, cgroup_fd, configure, prefer), isolated
    )


def load(request: LoadRequest, isolated: bool | None = None) -> LoadedObject:
    """:func:`load_object` for a prepared :class:`LoadRequest`."""
    data = _object_bytes(request.source, request.name)
    request = replace(request, source=data)
    if not (ISOLATED if isolated is None else isolated):
        return _load_here(data, request)
    value, fds = isolate.run(_child_job(request, batched=False), f"loading {request.name}")
    return _adopt(data, request.name, request.shared, value, fds)


def _object_bytes(source: Path | bytes, name: str) -> bytes:
    if isinstance(source, Path):
        return read_object_file(source)
    check_object_bytes(source, name)
    return source


def _child_job(request: LoadRequest, batched: bool) -> isolate.Job:
    """The form chain as a loading child's job: its answer is what
    :func:`_adopt` needs.  ``batched``: later jobs of the same child load
    after this one, so the child's ``shared`` keeps the shared maps this
    object created for them (the parent adopts them again from the answer).
    A file is read in the child: its bytes never count in the parent's memory
    before the parent adopts the object."""

    def job() -> tuple[object, list[int]]:
        loaded = _load_here(_object_bytes(request.source, request.name), request, adopt=batched)
        autoload = {program: loaded.autoload(program) for program in loaded.programs}
        choices = [(c.signal, c.forms, c.chosen, c.rejected) for c in loaded.choices.values()]
        names, fds = loaded.handover()
        return (autoload, choices, names), fds

    return job


def _adopt(source: Path | bytes, name: str, shared: SharedMaps | None, value: Any, fds: list[int]) -> LoadedObject:
    """Open the object here and take over what a loading child made of it."""
    try:
        autoload, frozen_choices, names = value
        obj = OpenObject(_object_bytes(source, name), name)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    try:
        for program, on in autoload.items():
            obj.set_autoload(program, on)
    except BaseException:
        obj.close()
        for fd in fds:
            os.close(fd)
        raise
    loaded = obj.adopt(names, fds)
    try:
        if shared is not None:
            shared.adopt(loaded)
    except BaseException:
        loaded.close()
        raise
    loaded.choices = {
        sig: SignalChoice(sig, list(forms), chosen, dict(rejected)) for sig, forms, chosen, rejected in frozen_choices
    }
    for choice in loaded.choices.values():
        if choice.rejected:
            log.debug("%s: %s", name, choice.describe())
    return loaded


@dataclass
class LoadRequest:
    """What :func:`load_object` is given, for a load in a :class:`LoadBatch`."""

    source: Path | bytes
    name: str
    support: Support
    shared: SharedMaps | None = None
    globals_: Mapping[str, int] | None = None
    optional_signals: Iterable[str] = ()
    cgroup_fd: int | None = None
    configure: Callable[[OpenObject], None] | None = None
    prefer: Iterable[str] = ()

    def policy(self) -> SignalPolicy:
        return SignalPolicy(frozenset(self.optional_signals), tuple(self.prefer))


class LoadBatch:
    """Loads prepared together, done by one loading child.

    Forking a child per object costs 60-160 ms each in an emulated guest (the
    page tables of a 20 MB daemon), and a start-up loads nine.  Requests are
    :meth:`add`-ed (each a function that says what to load, called on the
    thread that takes the first result); once :meth:`seal`-ed, the first
    :meth:`take` forks one child that loads and attaches every request in
    order, and sends each object's answer and fds as soon as it is attached:
    each ``take`` returns its object while the child loads the next.  The
    requests must be taken in the order they were added.  Not isolated
    (:data:`ISOLATED` false): each ``take`` loads its object here.

    ``close()`` (idempotent) ends the child: objects not taken yet are
    released with it (their programs never stay attached)."""

    def __init__(self) -> None:
        self._requests: list[Callable[[], LoadRequest]] = []
        self._sealed = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        self._stream: isolate.Stream | None = None
        # per request, once the first take() made them: what to adopt from the
        # child's answer (None once taken), or the error making it met here
        self._prepared: list[LoadRequest | BaseException | None] = []
        self._next = 0

    @property
    def sealed(self) -> bool:
        return self._sealed.is_set()

    def add(self, request: Callable[[], LoadRequest]) -> Callable[[], LoadedObject]:
        """Queue a load (before :meth:`seal`); the function returned takes its result."""
        if self.sealed:
            raise PybpftuneError("the load batch is sealed: load on your own")
        index = len(self._requests)
        self._requests.append(request)
        return lambda: self.take(index)

    def seal(self) -> None:
        """No more requests: the first :meth:`take` may start."""
        self._sealed.set()

    def take(self, index: int) -> LoadedObject:
        """The loaded object of request ``index`` (waits for :meth:`seal`)."""
        self._sealed.wait()
        with self._lock:
            if self._closed:
                raise isolate.IsolatedError("the load batch was closed before this object was loaded")
            if index != self._next:
                raise PybpftuneError(f"load batch: request {index} taken out of order (next is {self._next})")
            self._next += 1
            if index == 0:  # the first take (they come in order) makes the requests
                self._start()
            request, self._prepared[index] = self._prepared[index], None
            if isinstance(request, BaseException):
                raise request
            assert request is not None
            if self._stream is None:
                return _load_here(_object_bytes(request.source, request.name), request)
            value, fds = self._stream.next()
            return _adopt(request.source, request.name, request.shared, value, fds)

    def _start(self) -> None:
        jobs: list[tuple[isolate.Job, str]] = []
        makes, self._requests = self._requests, []
        for make in makes:
            try:
                request = make()
            except BaseException as exc:  # that request's failure, raised by its take()
                self._prepared.append(exc)
                continue
            self._prepared.append(request)
            if ISOLATED:
                job = _child_job(request, batched=True)
                jobs.append((job, f"loading {request.name}"))
        if jobs:
            self._stream = isolate.Stream(jobs)

    def close(self) -> None:
        """End the loading child (if any): what it has not handed over yet
        dies with it.  Idempotent."""
        self._sealed.set()
        with self._lock:
            self._closed = True
            self._prepared.clear()
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()


def _load_here(data: bytes, request: LoadRequest, adopt: bool = True) -> LoadedObject:
    """The form chain in this process, for ``request`` (whose object is
    ``data``).  ``adopt``: let the shared maps keep those this object
    created (not in a loading child: the parent does)."""
    dead: dict[tuple[str, str], str] = {}
    name, support, shared, policy = request.name, request.support, request.shared, request.policy()

    for _attempt in range(MAX_ATTEMPTS):
        with OpenObject(data, name) as obj:
            choices = _plan(obj, support, dead, policy.prefer)
            missing = [c for c in choices.values() if c.chosen is None and c.signal not in policy.optional]
            if missing:
                raise NotSupported(f"{name} signal {missing[0].signal}", missing[0].describe())
            for info in obj.programs.values():
                if info.signal is None and not support.works(info.kind):
                    raise NotSupported(f"{name} program {info.name}", f"{info.kind}: {support.why_not(info.kind)}")
            if shared is not None:
                shared.prepare(obj)
            for gname, value in (request.globals_ or {}).items():
                obj.set_global(gname, value)
            if request.configure is not None:
                request.configure(obj)
            try:
                loaded = obj.load()
            except BpfLoadError as exc:
                key = _form_of(obj.programs, exc.program)
                if key is None:
                    raise
                dead[key] = "rejected at load: " + load_reason(exc)
                log.debug("%s: %s form of %s rejected at load, trying the next form", name, key[1], key[0])
                continue
        try:
            loaded.choices = choices
            if shared is not None and adopt:
                shared.adopt(loaded)
            failed = _attach_all(loaded, request.cgroup_fd)
            if failed is not None:
                program, error = failed
                key = _form_of(loaded.programs, program)
                if key is None:
                    raise error
                dead[key] = f"attach refused: {error.short()}"
                log.debug("%s: %s form of %s cannot attach, trying the next form", name, key[1], key[0])
                loaded.close()
                continue
            for choice in choices.values():
                if choice.chosen is None:
                    log.debug("%s: optional signal %s", name, choice.describe())
            return loaded
        except BaseException:
            loaded.close()
            raise
    raise NotSupported(name, f"no working combination of program forms after {MAX_ATTEMPTS} attempts")


def load_reason(exc: BpfLoadError) -> str:
    """The verifier's own complaint (the last line of the program's load log
    before its statistics), else libbpf's last line, else the errno."""
    lines = [part.strip() for line in exc.log_tail for part in line.splitlines()]
    verifier: list[str] = []
    inside = False
    for line in lines:
        if "BEGIN PROG LOAD LOG" in line:
            inside, verifier = True, []
        elif "END PROG LOAD LOG" in line:
            inside = False
        elif inside and line and not line.startswith(("processed ", "verification time", "stack depth")):
            verifier.append(line)
    if verifier:
        return verifier[-1]
    tail = [line for line in lines if line]
    return tail[-1] if tail else exc.short()


def _form_of(programs: Mapping[str, ProgramInfo], program: str | None) -> tuple[str, str] | None:
    if program is None or program not in programs:
        return None
    info = programs[program]
    return None if info.signal is None else (info.signal, info.family)


def _plan(
    obj: OpenObject, support: Support, dead: Mapping[tuple[str, str], str], prefer: tuple[str, ...] = ()
) -> dict[str, SignalChoice]:
    """Choose a form per signal and set every program's autoload to match."""
    choices: dict[str, SignalChoice] = {}
    for signal, families in _signals(obj.programs.values(), prefer).items():
        choice = SignalChoice(signal, list(families))
        for family, programs in families.items():
            unsupported = [k for k in {obj.programs[p].kind for p in programs} if not support.works(k)]
            if (signal, family) in dead:
                choice.rejected[family] = dead[(signal, family)]
            elif unsupported:
                choice.rejected[family] = support.why_not(unsupported[0]) or "not supported"
            elif choice.chosen is None:
                choice.chosen = family
        for family, programs in families.items():
            for program in programs:
                obj.set_autoload(program, family == choice.chosen)
        choices[signal] = choice
    return choices


def _attach_all(obj: LoadedObject, cgroup_fd: int | None) -> tuple[str, AttachError] | None:
    """Attach every autoloaded program; the first failure is returned."""
    for name, info in obj.programs.items():
        if not obj.autoload(name):
            continue
        if info.kind not in AUTO_ATTACH_KINDS and not (info.kind in CGROUP_KINDS and cgroup_fd is not None):
            continue  # the owner attaches it (XDP, tc, cgroup programs without a cgroup)
        try:
            obj.attach(name, cgroup_fd=cgroup_fd if info.kind in CGROUP_KINDS else None)
        except AttachError as exc:
            return name, exc
    return None
