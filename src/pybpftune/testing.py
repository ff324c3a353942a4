"""A harness for unit-testing a tuner's rules without a kernel.

Builds any tuner over in-memory sysctls, a synthetic clock and a namespace
registry whose protocol counters the test sets, with the real tunable store
in between (so bounds, caps, the journal-free write path, advice and
back-off all behave as in the daemon)::

    h = TunerHarness.build(RouteTableTuner, sysctls={"net.ipv6.route.max_size": (4096,)})
    h.feed(Event.build(h.tuner.id, Scenarios.FULL, h.global_cookie, updates=[...]))
    assert h.sysctls.values[(h.global_cookie, "net.ipv6.route.max_size")] == (5120,)

Outside tuners can use it as pybpftune's own tests do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .declarations import Decision, Steps
from .events import Event
from .hostmem import HostMemory
from .netns import Namespaces
from .procnet import Counters
from .store import TunableStore
from .sysctl import MemorySysctl
from .tuner import Tuner, TunerContext

T = TypeVar("T", bound=Tuner)


class SyntheticClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class SyntheticNamespaces(Namespaces):
    """The real registry (the daemon's own namespace is the global one), with
    protocol counters the test sets per namespace instead of reading
    /proc/net; a namespace without counters reads as one that is gone."""

    def __init__(self) -> None:
        super().__init__()
        self.counter_values: dict[int, Counters] = {}

    def set_counters(self, cookie: int, **counters: int) -> None:
        """Set (or move forward) counters: ``set_counters(c, **{"Udp.InErrors": 3})``."""
        self.counter_values.setdefault(cookie, {}).update(counters)

    def counters(self, cookie: int, files: tuple[str, ...] = ("snmp", "snmp6")) -> Counters | None:
        values = self.counter_values.get(cookie)
        return None if values is None else dict(values)


@dataclass
class TunerHarness(Generic[T]):
    tuner: T
    sysctls: MemorySysctl
    store: TunableStore
    namespaces: SyntheticNamespaces
    clock: SyntheticClock

    @classmethod
    def build(
        cls,
        tuner_class: type[T],
        sysctls: Mapping[str, tuple[int, ...]] | None = None,
        texts: Mapping[str, str] | None = None,
        *,
        tuner_id: int = 0,
        rate: int = 4,
        memory: HostMemory | None = None,
        register: bool = True,
        store_class: type[TunableStore] = TunableStore,
        **collaborators: Any,
    ) -> TunerHarness[T]:
        """``sysctls``/``texts``: the global namespace's values by name;
        ``memory``: the host the memory caps are computed from (None: the
        process's, which tests usually pin with hostmem.override);
        ``store_class``: a store subclass that records what it is handed;
        ``collaborators``: keyword arguments of the tuner's constructor (the
        fakes it takes for what it reads of the world)."""
        namespaces = SyntheticNamespaces()
        backend = MemorySysctl(dict(sysctls or {}), global_cookie=namespaces.global_cookie, texts=dict(texts or {}))
        store = store_class(backend, namespaces)
        clock = SyntheticClock()
        tuner = tuner_class(TunerContext(store, namespaces, Steps(rate), clock=clock), tuner_id, **collaborators)
        if memory is not None:
            tuner.memory = memory
        if register:
            store.register(tuner)
        return cls(tuner, backend, store, namespaces, clock)

    @property
    def global_cookie(self) -> int:
        return self.namespaces.global_cookie

    def value(self, name: str, cookie: int | None = None) -> tuple[int, ...]:
        """A sysctl's value now (global namespace by default)."""
        return self.sysctls.read(name, self.global_cookie if cookie is None else cookie)

    def decide(self, event: Event) -> Decision:
        return self.tuner.decide(event)

    def feed(self, *events: Event) -> None:
        """Each event through the whole pipeline, as the daemon does."""
        for event in events:
            self.tuner.handle_event(event)
