"""A harness for unit-testing a tuner's rules without a kernel.

Builds any tuner over in-memory sysctls, a synthetic clock and a namespace
registry whose protocol counters the test sets, with the real tunable store
in between (so bounds, caps, the journal-free write path, advice and
back-off all behave as in the daemon)::

    h = TunerHarness.build(RouteTableTuner, sysctls={"net.ipv6.route.max_size": (4096,)})
    full = Update(RouteTableTunable.IPV6_MAX_SIZE, (4096, 4000, 0), (5120, 4000, 0))
    h.feed(Event.build(h.tuner.id, RouteTableScenario.FULL, h.global_cookie, updates=[full]))
    assert h.value("net.ipv6.route.max_size") == (6400,)  # grown until 4000 is not nearly full

A tuner that reads its BPF object gets a :class:`SyntheticObject` (globals
and maps in memory, read and written as the loaded object's are)::

    h = TunerHarness.build(TcpBufferTuner, ..., bpf=SyntheticObject(globals={"near_memory_pressure": 1}))
    h.bpf.map("bpftune_corr", CorrKey, Corr)[key] = CorrSums.of(samples)

Outside tuners can use it as pybpftune's own tests do.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from . import bindings
from .declarations import Decision, Steps
from .errors import LayoutError, PybpftuneError
from .events import Event
from .hostmem import HostMemory
from .netns import Namespaces
from .objects import K, Layout, MapView, ProgramInfo, SignalChoice, TypedMap, V, map_view
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


class SyntheticMap(MapView):
    """A map held in a dict of raw bytes (``data``), sizes checked as a
    loaded map's are: what a tuner's MapUpdate effects write lands here."""

    def __init__(self, name: str, key: type[Layout], value: type[Layout]) -> None:
        super().__init__(name, -1, key.SIZE, value.SIZE)
        self.data: dict[bytes, bytes] = {}

    def __getitem__(self, key: bytes) -> bytes:
        return self.data[self._key(key)]

    def __setitem__(self, key: bytes, value: bytes) -> None:
        if len(value) != self.value_size:
            raise LayoutError(f"map {self.name}: value is {len(value)} bytes, expected {self.value_size}")
        self.data[self._key(key)] = value

    def __delitem__(self, key: bytes) -> None:
        del self.data[self._key(key)]

    def __iter__(self) -> Iterator[bytes]:
        return iter(list(self.data))

    def __len__(self) -> int:
        return len(self.data)


# Maps every object has: the correlation map all objects share (ringbuf.SharedMaps).
SHARED_MAPS: dict[str, tuple[type[Layout], type[Layout]]] = {"bpftune_corr": (bindings.CorrKey, bindings.Corr)}


class SyntheticObject:
    """A stand-in for a tuner's loaded BPF object (objects.BpfObject):
    integer and struct globals and maps in memory.  Only what is declared
    exists, as in the object itself: ``globals`` by name (an int, or a
    binding for a struct global such as ``bindings.BpftuneSample``),
    ``maps`` by name with their key and value bindings (the shared
    ``bpftune_corr`` is always there); anything else is a PybpftuneError."""

    def __init__(
        self,
        globals: Mapping[str, int | Layout] | None = None,
        maps: Mapping[str, tuple[type[Layout], type[Layout]]] | None = None,
        choices: Mapping[str, SignalChoice] | None = None,
        name: str = "synthetic",
    ) -> None:
        self.name = name
        self.globals: dict[str, int | Layout] = dict(globals or {})
        self.maps = {n: SyntheticMap(n, k, v) for n, (k, v) in {**SHARED_MAPS, **(maps or {})}.items()}
        self.choices: dict[str, SignalChoice] = dict(choices or {})
        self.programs: dict[str, ProgramInfo] = {}
        self.closed = False

    def _global(self, name: str) -> int | Layout:
        if self.closed:
            raise PybpftuneError(f"BPF object {self.name} is closed")
        try:
            return self.globals[name]
        except KeyError:
            raise PybpftuneError(f"{self.name} has no global variable {name!r}") from None

    def has_global(self, name: str) -> bool:
        return name in self.globals

    def get_global(self, name: str, signed: bool = False) -> int:
        value = self._global(name)
        if not isinstance(value, int):
            raise LayoutError(f"global {name} is a {type(value).__name__}, not an integer")
        return value

    def set_global(self, name: str, value: int) -> None:
        self.get_global(name)  # it must exist, and be an integer
        self.globals[name] = value

    def global_struct(self, name: str, layout: type[V]) -> V:
        value = self._global(name)
        if not isinstance(value, layout):
            raise LayoutError(f"global {name} is a {type(value).__name__}, not a {layout.__name__}")
        return value

    @overload
    def map(self, name: str) -> SyntheticMap: ...

    @overload
    def map(self, name: str, key: type[K], value: type[V]) -> TypedMap[K, V]: ...

    def map(self, name: str, key: type[K] | None = None, value: type[V] | None = None) -> MapView | TypedMap[K, V]:
        if self.closed:
            raise PybpftuneError(f"BPF object {self.name} is closed")
        try:
            raw = self.maps[name]
        except KeyError:
            raise PybpftuneError(f"{self.name} has no map {name!r}") from None
        return map_view(raw, key, value)

    def autoload(self, program: str) -> bool:
        return False  # no programs

    def unavailable(self) -> list[SignalChoice]:
        return [c for c in self.choices.values() if c.chosen is None]

    def close(self) -> None:
        self.closed = True


@dataclass
class TunerHarness(Generic[T]):
    tuner: T
    sysctls: MemorySysctl
    store: TunableStore
    namespaces: SyntheticNamespaces
    clock: SyntheticClock
    # The tuner's object (tuner.loaded) when one was given.
    bpf: SyntheticObject | None = None

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
        bpf: SyntheticObject | None = None,
        **collaborators: Any,
    ) -> TunerHarness[T]:
        """``sysctls``/``texts``: the global namespace's values by name;
        ``memory``: the host the memory caps are computed from (None: the
        process's, which tests usually pin with hostmem.override);
        ``store_class``: a store subclass that records what it is handed;
        ``bpf``: the tuner's loaded object (None: none, as before start);
        ``collaborators``: keyword arguments of the tuner's constructor (the
        fakes it takes for what it reads of the world)."""
        namespaces = SyntheticNamespaces()
        backend = MemorySysctl(dict(sysctls or {}), global_cookie=namespaces.global_cookie, texts=dict(texts or {}))
        store = store_class(backend, namespaces)
        clock = SyntheticClock()
        tuner = tuner_class(TunerContext(store, namespaces, Steps(rate), clock=clock), tuner_id, **collaborators)
        if memory is not None:
            tuner.memory = memory
        tuner.loaded = bpf
        if register:
            store.register(tuner)
        return cls(tuner, backend, store, namespaces, clock, bpf)

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
