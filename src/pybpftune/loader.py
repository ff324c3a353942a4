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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from . import isolate
from .errors import AttachError, BpfLoadError, NotSupported
from .objects import CGROUP_KINDS, BpfObject, ProgramInfo, check_object_bytes, read_object_file
from .ringbuf import RingBuffer
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


def _rank(family: str) -> int:
    return FORM_PREFERENCE.index(family) if family in FORM_PREFERENCE else len(FORM_PREFERENCE)


@dataclass
class SignalChoice:
    """How one signal is observed here: the chosen form and why not others."""

    signal: str
    forms: list[str]
    chosen: str | None = None
    rejected: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        if self.chosen is None:
            why = "; ".join(f"{f}: {r}" for f, r in self.rejected.items())
            return f"{self.signal}: unavailable ({why})"
        others = "".join(f", {f} unavailable: {r}" for f, r in self.rejected.items())
        return f"{self.signal}: {self.chosen}{others}"


class LoadedObject:
    """An object loaded and attached through the form chain."""

    def __init__(self, obj: BpfObject, choices: dict[str, SignalChoice]) -> None:
        self.obj = obj
        self.choices = choices

    @property
    def name(self) -> str:
        return self.obj.name

    def unavailable(self) -> list[SignalChoice]:
        return [c for c in self.choices.values() if c.chosen is None]

    def close(self) -> None:
        self.obj.close()

    def __enter__(self) -> LoadedObject:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _signals(programs: Iterable[ProgramInfo]) -> dict[str, dict[str, list[str]]]:
    """signal -> form family -> program names, families in preference order."""
    out: dict[str, dict[str, list[str]]] = {}
    for info in programs:
        if info.signal is None:
            continue
        out.setdefault(info.signal, {}).setdefault(info.family, []).append(info.name)
    return {sig: dict(sorted(fams.items(), key=lambda kv: _rank(kv[0]))) for sig, fams in out.items()}


def load_object(
    source: Path | bytes,
    name: str,
    support: Support,
    *,
    ring: RingBuffer | None = None,
    globals_: Mapping[str, int] | None = None,
    optional_signals: Iterable[str] = (),
    cgroup_fd: int | None = None,
    configure: Callable[[BpfObject], None] | None = None,
    isolated: bool | None = None,
) -> LoadedObject:
    """Open, configure, load and attach ``source`` with the best forms.

    ``globals_`` are set before load (missing names are an error);
    ``configure`` may adjust the object further before each load attempt.
    Raises NotSupported when a required signal has no working form, and
    BpfLoadError/AttachError for failures no fallback can explain.

    ``isolated`` (default :data:`ISOLATED`): do the loading in a forked child
    that hands the fds back (isolate.py), so that libbpf's copies of the
    kernel BTF never count in this process's peak memory.  The object is then
    opened again here, with the child's choices, and adopts the fds; it cannot
    attach more programs afterwards.
    """
    if isinstance(source, Path):
        data = read_object_file(source)
    else:
        data = source
        check_object_bytes(data, name)
    optional = set(optional_signals)
    if not (ISOLATED if isolated is None else isolated):
        return _load_here(data, name, support, ring, globals_, optional, cgroup_fd, configure)

    def job() -> tuple[object, list[int]]:
        loaded = _load_here(data, name, support, ring, globals_, optional, cgroup_fd, configure, adopt=False)
        obj = loaded.obj
        autoload = {program: obj.autoload(program) for program in obj.programs}
        choices = [(c.signal, c.forms, c.chosen, c.rejected) for c in loaded.choices.values()]
        names, fds = obj.handover()
        return (autoload, choices, names), fds

    value, fds = isolate.run(job, f"loading {name}")
    autoload, frozen_choices, names = value
    try:
        obj = BpfObject(data, name)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    try:
        for program, on in autoload.items():
            obj.set_autoload(program, on)
        obj.adopt(names, fds)
        if ring is not None:
            ring.adopt(obj)
    except BaseException:
        obj.close()
        raise
    choices = {
        sig: SignalChoice(sig, list(forms), chosen, dict(rejected)) for sig, forms, chosen, rejected in frozen_choices
    }
    for choice in choices.values():
        if choice.rejected:
            log.debug("%s: %s", name, choice.describe())
    return LoadedObject(obj, choices)


def _load_here(
    data: bytes,
    name: str,
    support: Support,
    ring: RingBuffer | None,
    globals_: Mapping[str, int] | None,
    optional: set[str],
    cgroup_fd: int | None,
    configure: Callable[[BpfObject], None] | None,
    adopt: bool = True,
) -> LoadedObject:
    """The form chain in this process.  ``adopt``: let ``ring`` keep the
    shared maps this object created (not in a loading child: the parent does)."""
    dead: dict[tuple[str, str], str] = {}

    for _attempt in range(MAX_ATTEMPTS):
        obj = BpfObject(data, name)
        try:
            choices = _plan(obj, support, dead)
            missing = [c for c in choices.values() if c.chosen is None and c.signal not in optional]
            if missing:
                raise NotSupported(f"{name} signal {missing[0].signal}", missing[0].describe())
            for info in obj.programs.values():
                if info.signal is None and not support.works(info.kind):
                    raise NotSupported(f"{name} program {info.name}", f"{info.kind}: {support.why_not(info.kind)}")
            if ring is not None:
                ring.prepare(obj)
            for gname, value in (globals_ or {}).items():
                obj.set_global(gname, value)
            if configure is not None:
                configure(obj)
            try:
                obj.load()
            except BpfLoadError as exc:
                key = _form_of(obj, exc.program)
                if key is None:
                    raise
                dead[key] = "rejected at load: " + load_reason(exc)
                log.debug("%s: %s form of %s rejected at load, trying the next form", name, key[1], key[0])
                obj.close()
                continue
            if ring is not None and adopt:
                ring.adopt(obj)
            failed = _attach_all(obj, cgroup_fd)
            if failed is not None:
                program, error = failed
                key = _form_of(obj, program)
                if key is None:
                    raise error
                dead[key] = f"attach refused: {error.short()}"
                log.debug("%s: %s form of %s cannot attach, trying the next form", name, key[1], key[0])
                obj.close()
                continue
            for choice in choices.values():
                if choice.chosen is None:
                    log.debug("%s: optional signal %s", name, choice.describe())
            return LoadedObject(obj, choices)
        except BaseException:
            obj.close()
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


def _form_of(obj: BpfObject, program: str | None) -> tuple[str, str] | None:
    if program is None or program not in obj.programs:
        return None
    info = obj.programs[program]
    return None if info.signal is None else (info.signal, info.family)


def _plan(obj: BpfObject, support: Support, dead: Mapping[tuple[str, str], str]) -> dict[str, SignalChoice]:
    """Choose a form per signal and set every program's autoload to match."""
    choices: dict[str, SignalChoice] = {}
    for signal, families in _signals(obj.programs.values()).items():
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


def _attach_all(obj: BpfObject, cgroup_fd: int | None) -> tuple[str, AttachError] | None:
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
