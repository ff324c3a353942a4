"""The tuner framework: the Tuner base and the one event pipeline.

A tuner reads as a declaration::

    class RouteTableTuner(Tuner):
        name = "route_table"
        bpf_name = "route_table_tuner"
        tunables = (Tunable(RouteTableTunable.IPV6_MAX_SIZE, "net.ipv6.route.max_size", ...),)
        scenarios = (Scenario(RouteTableScenario.FULL, "destination table nearly full", "..."),)

        def decide(self, event: Event) -> Decision:   # plain rules, unit-testable

Every event goes the same way (:meth:`Tuner.handle_event`, never
overridden): ``decide`` returns a :class:`Decision`, and the framework
carries it out: the effects (BPF globals and maps, backing off), then each
proposal through the tunable store's single write path (which knows the
original value, the bounds, the namespace and the reason, logs the "what"
and "why", counts it for the summary, journals the original and honours
advice mode), then the tick it asks for.  docs/writing-a-tuner.md walks through one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, final

from . import hostmem
from .declarations import (
    INT_MAX,
    NOTHING,
    AdminWrite,
    Decision,
    Disable,
    Effect,
    MapUpdate,
    NamespaceGone,
    Noted,
    Proposal,
    Scenario,
    SetGlobal,
    Setter,
    Steps,
    TextProposal,
    Tunable,
    known_tunables,
)
from .errors import PybpftuneError, TunerError
from .hostmem import HostMemory

if TYPE_CHECKING:
    from .eventloop import EventLoop
    from .events import Event
    from .netns import Namespaces
    from .objects import BpfObject
    from .store import TunableStore
    from .support import Support

# Re-exported: outside tuners import their vocabulary from here.
__all__ = [
    "INT_MAX",
    "NOTHING",
    "AdminWrite",
    "Decision",
    "Disable",
    "Effect",
    "MapUpdate",
    "NamespaceGone",
    "Noted",
    "Proposal",
    "Scenario",
    "SetGlobal",
    "Setter",
    "Steps",
    "TextProposal",
    "Tunable",
    "Tuner",
    "TunerContext",
    "known_tunables",
]


@dataclass
class TunerContext:
    """What the daemon gives every tuner."""

    store: TunableStore
    namespaces: Namespaces
    steps: Steps
    support: Support | None = None
    variant: str = "full"
    debug: bool = False
    # An administrator wrote a sysctl: the daemon backs off every tuner that
    # manages it (tuners never walk each other).
    admin_wrote: Callable[[AdminWrite], None] = lambda write: None
    # -R: tuners that change things outside the store (netlink) restore them in stop().
    rollback: bool = False
    # The daemon's event loop (None in unit tests): a tuner may watch an fd there.
    loop: EventLoop | None = None
    # Ask for a tick at this monotonic time (earlier than the one planned); see Tuner.tick.
    request_tick: Callable[[Tuner, float], None] = lambda tuner, when: None
    # The rules' clock (monotonic seconds); tests give a synthetic one.
    clock: Callable[[], float] = time.monotonic


class Tuner:
    """Base class: subclasses declare, then implement ``decide``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # Object name (without .bpf.o); None: no BPF object.
    bpf_name: ClassVar[str | None] = None
    # Where <bpf_name>.bpf.o and <bpf_name>.bpf.legacy.o are: None for
    # pybpftune's own objects; an outside tuner names its own directory
    # (usually Path(__file__).parent).
    bpf_dir: ClassVar[Path | None] = None
    tunables: ClassVar[tuple[Tunable, ...]] = ()
    scenarios: ClassVar[tuple[Scenario, ...]] = ()
    # Signals the tuner can live without (the rest must have a working form).
    optional_signals: ClassVar[frozenset[str]] = frozenset()
    # Form families to try before the loader's own order (tracepoints first):
    # for a tuner whose trampoline or kprobe form fires far less often.
    preferred_forms: ClassVar[tuple[str, ...]] = ()
    # Forms the kernel may refuse for more than their program kind: a missing
    # tracepoint argument, enum value or kernel symbol.  Program name -> what
    # it needs.  The loader falls back from them like from any refused form;
    # the verifier test accepts their refusal but nobody else's.
    kernel_dependent_forms: ClassVar[Mapping[str, str]] = {}
    # Program names to attach to the root cgroup (cgroup/sysctl, sockops).
    cgroup_programs: ClassVar[tuple[str, ...]] = ()
    # Needs at least this support level ("legacy" or "full") to start.
    requires_cookies: ClassVar[bool] = False
    # The memory the caps (Tunable.ceiling) are computed from; None: the
    # host's, read once per process (tests give a tuner its own).
    memory: HostMemory | None = None

    def __init__(self, ctx: TunerContext, tuner_id: int) -> None:
        self.ctx = ctx
        self.id = tuner_id
        # The daemon's LoadedObject once started; a SyntheticObject in unit tests.
        self.loaded: BpfObject | None = None
        self.handling_s = 0.0  # seconds spent in handle_event
        self.log = logging.getLogger(f"pybpftune.tuner.{self.name}")
        ids = [t.id for t in self.tunables]
        if ids != list(range(len(ids))):
            raise TunerError(f"tuner {self.name}: tunable ids must be 0..n-1 in order, got {ids}")

    # --- declarations -----------------------------------------------------------

    def tunable(self, tunable_id: int) -> Tunable:
        return self.tunables[tunable_id]

    def scenario(self, scenario_id: int) -> Scenario:
        for s in self.scenarios:
            if s.id == scenario_id:
                return s
        raise TunerError(f"tuner {self.name}: unknown scenario {scenario_id}")

    @property
    def steps(self) -> Steps:
        return self.ctx.steps

    @property
    def host_memory(self) -> HostMemory:
        return self.memory if self.memory is not None else hostmem.host_memory()

    @property
    def free_pages(self) -> int:
        """F, the buffer-usable pages tcp_mem and udp_mem are capped by (never
        0: estimated from MemTotal when /proc/zoneinfo has no usable zone)."""
        return self.host_memory.buffer_pages

    def ceiling(self, tunable_id: int) -> int | None:
        """The memory cap of a tunable on this host (never below its lower
        bound); None when it declares none."""
        t = self.tunable(tunable_id)
        if t.ceiling is None:
            return None
        return max(t.ceiling(self.host_memory), t.lower if t.lower is not None else 0)

    def highest(self, tunable_id: int) -> int:
        """The largest value any rule may propose for a tunable: its upper
        bound and its memory cap, INT_MAX without either."""
        t = self.tunable(tunable_id)
        caps = [c for c in (t.upper, self.ceiling(tunable_id)) if c is not None]
        return min(caps) if caps else INT_MAX

    # --- hooks the daemon calls -------------------------------------------------------

    def bpf_globals(self) -> Mapping[str, int]:
        """Tuner-specific BPF globals to set before load."""
        return {}

    def start(self) -> None:
        """After the object is loaded and attached (and tunables read)."""

    def decide(self, event: Event) -> Decision:
        """Turn one event into a decision.  Rules read (sysctls, counters,
        their own model of what they saw) and may update that model; every
        effect outside the tuner goes in the decision."""
        return NOTHING

    @final
    def handle_event(self, event: Event) -> None:
        """The one pipeline: decide, then carry the decision out (timed: the
        summary can say what handling events cost)."""
        t0 = time.perf_counter()
        self.carry_out(self.decide(event))
        self.handling_s += time.perf_counter() - t0

    @final
    def carry_out(self, decision: Decision | Sequence[Proposal]) -> None:
        """Effects (they describe the world the rules saw), then proposals
        through the store (whose :meth:`applied` sees what was written),
        then the tick asked for.  (A plain list of proposals is taken too: older outside tuners.)"""
        if not isinstance(decision, Decision):
            decision = Decision(tuple(decision))
        for effect in decision.effects:
            self._carry_out_effect(effect)
        for proposal in decision.proposals:
            if self.apply(proposal) and proposal.announce:
                self.log.info("%s", proposal.announce)
        for text in decision.texts:
            self.ctx.store.apply_text(self, text)
        if decision.check_at is not None:
            self.tick_at(decision.check_at)

    def _carry_out_effect(self, effect: Effect) -> None:
        if isinstance(effect, SetGlobal):
            self.set_bpf_global(effect.name, effect.value)
        elif isinstance(effect, MapUpdate):
            self._update_map(effect)
        elif isinstance(effect, Disable):
            self.ctx.store.disable(self, effect.netns_cookie, effect.reason)
        elif isinstance(effect, AdminWrite):
            self.ctx.admin_wrote(effect)
        elif isinstance(effect, NamespaceGone):
            self.ctx.store.mark_gone(effect.netns_cookie, effect.why)
        elif isinstance(effect, Noted):
            self.ctx.store.note(self, effect)

    def _update_map(self, update: MapUpdate) -> None:
        if self.loaded is None:
            return
        bpf_map = self.loaded.map(update.map)
        try:
            if update.value is not None:
                bpf_map[update.key] = update.value
            else:
                del bpf_map[update.key]
        except KeyError:
            pass  # already gone: the BPF side deletes stale elements too
        except PybpftuneError as exc:
            # Maps tuners write from user space hold hints (hold-offs, per-namespace
            # switches) the BPF side can live without: one lost write is not worth
            # stopping the tuner for.
            self.log.debug("%s: cannot update map %s: %s", self.name, update.map, exc)

    @property
    def clock(self) -> Callable[[], float]:
        """The rules' clock: monotonic seconds (synthetic in unit tests)."""
        return self.ctx.clock

    @final
    def apply(self, proposal: Proposal) -> bool:
        written = self.ctx.store.apply(self, proposal)
        if written is None:
            return False
        # What was written, which bounds and configured caps may have made
        # smaller than what was proposed.
        self.applied(replace(proposal, new=written))
        return True

    def applied(self, proposal: Proposal) -> None:
        """A proposal took effect (e.g. mirror the new value into BPF);
        ``proposal.new`` is what was written."""

    def tick(self, now: float) -> float | None:
        """Time-based rules.  Return when the next tick is due (a
        ``time.monotonic()`` value; ``math.inf``: none until asked for with
        :meth:`tick_at`), or None for one second from now.  The daemon wakes
        only for ticks that are due, so an idle tuner should not ask for a
        tick it does not need.  Only tuners that override this get ticks."""
        return None

    def tick_at(self, when: float) -> None:
        """Have :meth:`tick` called no later than ``when`` (monotonic seconds),
        e.g. after an event started something that must be checked on later."""
        self.ctx.request_tick(self, when)

    def advice_changed(self, advice: bool) -> None:
        """A reload switched advice mode; the store already honours it, so
        only a tuner that acts by other means (BPF setting sockets) cares."""

    def netns_disabled(self, netns_cookie: int) -> None:
        """The store turned this tuner off in a namespace (an administrator
        took over there); e.g. tell the BPF side to leave it alone."""

    def command(self, tunable: Tunable, values: tuple[int | str, ...]) -> str | None:
        """The shell command that sets ``tunable`` to ``values`` (in the
        namespace the caller enters): advice, and the `changes` request.
        Sysctls by default; a tuner that changes things by other means
        (netlink) says how, and per-connection settings have none."""
        if not tunable.is_sysctl:
            return None
        text = " ".join(str(v) for v in values)
        if all(c.isalnum() or c in " _.-" for c in text):
            return f'sysctl -w {tunable.name}="{text}"'
        import shlex  # only here: most values need no quoting, and start-up needs none

        return f"sysctl -w {shlex.quote(f'{tunable.name}={text}')}"

    def summary_lines(self) -> list[str]:
        """Extra lines for the exit summary."""
        return []

    def stop(self) -> None:
        """Before the object is closed."""

    # --- helpers for subclasses ---------------------------------------------------------

    def set_bpf_global(self, name: str, value: int) -> None:
        """Update a global in the loaded object (no-op without one)."""
        if self.loaded is not None:
            self.loaded.set_global(name, value)

    def current(self, tunable_id: int, netns_cookie: int | None = None) -> tuple[int, ...]:
        """Current values of a tunable (in a namespace for namespaced ones)."""
        return self.ctx.store.current(self, tunable_id, netns_cookie)
