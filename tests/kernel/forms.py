"""A tuner's fallback forms, loaded with its tracepoint forms ruled out.

Every tuner expresses a signal as a tracepoint first and falls back to
fentry and kprobe forms.  On the host fentry is refused and kprobes cannot
attach, so there the load must fail with an error naming the signal and why
each form cannot work; in the VMs a fallback form must load and fire.
``fallback_forms`` loads the packaged object both ways and says which
happened; the test asserts the one that applies.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pybpftune.bpf import object_path
from pybpftune.errors import NotSupported
from pybpftune.events import Event
from pybpftune.loader import load_object
from pybpftune.netns import current_cookie, current_inode
from pybpftune.objects import LoadedObject
from pybpftune.ringbuf import SharedMaps
from pybpftune.support import KindSupport, Support, probe_support

from .harness import SLOW

RULED_OUT = "ruled out by the test"


def without_tracepoints(real: Support) -> Support:
    """``real`` with tp_btf and raw_tp ruled out: only the fallback forms are left."""
    kinds = dict(real.kinds)
    for kind in ("tp_btf", "raw_tp"):
        kinds[kind] = KindSupport(kind, False, False, RULED_OUT)
    return Support(kinds, real.kernel_btf, real.ringbuf, real.netns_cookie, real.cgroup2, real.memlock)


@dataclass
class FallbackForms:
    """The object as loaded (``loaded``), or the loader's error (``why``);
    the events it sent (with a ``tuner_id``) and the ring they came through."""

    real: Support
    ring: SharedMaps
    loaded: LoadedObject | None = None
    why: str = ""
    events: list[Event] = field(default_factory=list)

    def assert_says_why(self, signal: str, could_work: bool | None = None) -> None:
        """No form of ``signal`` loaded: the error names the signal, the
        ruled-out tracepoints and the kprobe form, and this kernel really
        cannot run a fallback form (``could_work``; default: kprobes work)."""
        assert self.loaded is None
        text = self.why
        assert f"signal {signal}" in text and RULED_OUT in text and "kprobe" in text, text
        assert not (self.real.works("kprobe") if could_work is None else could_work), text

    def assert_chose_fallback(self, signal: str, variant: str, fentry_kind: str = "fentry") -> None:
        """The fentry form where the full variant can run ``fentry_kind``
        programs (fentry or fexit), else the kprobe form."""
        assert self.loaded is not None
        choice = self.loaded.choices[signal]
        expected = "fentry" if variant == "full" and self.real.works(fentry_kind) else "kprobe"
        assert choice.chosen == expected, choice.describe()

    def poll_until(
        self, done: Callable[[], bool], seconds: float, between: Callable[[], None] = lambda: None, ms: int = 100
    ) -> None:
        """Poll the ring (after ``between``, e.g. traffic) until ``done`` or
        ``seconds`` (times SLOW) have passed."""
        deadline = time.monotonic() + seconds * SLOW
        while not done() and time.monotonic() < deadline:
            between()
            self.ring.poll(ms)


@contextmanager
def fallback_forms(
    tuner: str,
    variant: str,
    *,
    tuner_id: int | None = None,
    netns: bool = False,
    globals_: Mapping[str, int] | None = None,
    optional_signals: Iterable[str] = (),
    directory: Path | None = None,
) -> Iterator[FallbackForms]:
    """Load ``<tuner>``'s object of ``variant`` without its tracepoint forms.

    ``tuner_id``: collect its events (and tell the programs this process is
    bpftune); ``netns``: set the namespace globals as the daemon does;
    ``directory``: where the objects are, for an outside tuner's.
    Everything loaded is closed on exit."""
    real = probe_support()
    values = dict(globals_ or {})
    if tuner_id is not None:
        values |= {"tuner_id": tuner_id, "bpftune_pid": os.getpid()}
    if netns:
        values |= {
            "bpftune_netns_cookie_supported": int(current_cookie() is not None),
            "bpftune_init_netns_inum": current_inode(),
        }
    with SharedMaps() as ring:
        forms = FallbackForms(real, ring)
        if tuner_id is not None:
            ring.register(tuner_id, forms.events.append)
        loaded: LoadedObject | None = None
        try:
            loaded = load_object(
                object_path(tuner, legacy=variant == "legacy", directory=directory),
                tuner,
                without_tracepoints(real),
                shared=ring,
                globals_=values,
                optional_signals=optional_signals,
            )
        except NotSupported as exc:
            forms.why = str(exc)
        if loaded is None:
            yield forms
            return
        with loaded:
            forms.loaded = loaded
            yield forms
