"""Property: no built-in tuner ever proposes a value outside its tunable's
declared bounds (lower, upper and the memory cap, Tunable.ceiling).

Every tuner in pybpftune/tuners is driven with random events (every payload
field a random value of its C type, taken from the shared header through
cffi, with edge values favoured), random current sysctl values, a random
host memory size and random inputs on its seams (counters, the globals and
correlation sums of a synthetic BPF object, clocks).  Its rules
(``decide``) must return proposals within bounds, and so must everything
``handle_event`` and ``tick`` hand to the store, before the store's own
clamp; and the examples must reach the rules behind those seams (MUST_REACH).

The examples are the same on every run (CI stays deterministic) and
nothing is written to disk; PYBPFTUNE_PROPERTY_EXPLORE=1 draws new ones
each run, to look further.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pybpftune.tuners
from pybpftune import libbpf
from pybpftune import store as store_mod
from pybpftune._libbpf import ffi
from pybpftune.bindings import (
    CorrKey,
    IpFragScenario,
    NeighTableStats,
    TcpBufferHold,
    TcpBufferHoldKey,
    TcpBufferScenario,
    TcpBufferTunable,
)
from pybpftune.corr import CorrSums
from pybpftune.events import Event
from pybpftune.hostmem import HostMemory
from pybpftune.netns import Namespaces
from pybpftune.store import TunableStore
from pybpftune.testing import SyntheticObject, TunerHarness
from pybpftune.tuner import INT_MAX, Proposal, Tuner
from pybpftune.tuners import tcp_buffer
from pybpftune.tuners.ip_frag import IPV4, IPV6, IpFragTuner
from pybpftune.tuners.neigh_table import FAMILIES, MemoryNeigh, NeighTableTuner, Table
from pybpftune.tuners.net_buffer import NetBufferTuner
from pybpftune.tuners.tcp_buffer import TcpBufferTuner
from pybpftune.tuners.tcp_buffer.holds import HOLD_MAP

NS = 4242
TUNER_ID = 5
# Examples per tuner: the whole property stays well under 20 s.  Tuners
# with no numeric tunable to bound get fewer.
EXAMPLES = 150
FEW_EXAMPLES = 40
EXPLORE = os.environ.get("PYBPFTUNE_PROPERTY_EXPLORE") == "1"

# The payload each tuner's events carry (None: text or nothing in particular).
PAYLOADS: dict[str, str | None] = {
    "tcp_buffer": "struct tcp_buffer_event",
    "tcp_conn": "struct tcp_conn_event",
    "net_buffer": "struct net_buffer_obs",
    "neigh_table": "struct neigh_table_stats",
    "route_table": "struct bpftunable_update",
    "ip_frag": "struct ip_frag_obs",
    "udp_buffer": "struct udp_buffer_obs",
    "sysctl": None,
    "netns": None,
}
# handle_event of these reaches outside the process (the netns tuner opens
# namespaces of the pid an event names): their rules are driven through
# decide() only.
DECIDE_ONLY = {"netns"}


def builtin_tuners() -> dict[str, type[Tuner]]:
    out: dict[str, type[Tuner]] = {}
    for info in pkgutil.iter_modules(pybpftune.tuners.__path__):
        module = importlib.import_module(f"pybpftune.tuners.{info.name}")
        cls = getattr(module, "TUNER", None)
        if cls is not None:
            out[cls.name] = cls
    return out


TUNERS = builtin_tuners()


def test_every_builtin_tuner_is_driven() -> None:
    assert set(TUNERS) == set(PAYLOADS)


# --- strategies -----------------------------------------------------------------------------


def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Integers in [lo, hi], edges and small values favoured."""
    edges = [v for v in (0, 1, 2, 8, 128, 1000, 1024, 4096, 65536, 1 << 20, 1 << 30) if lo <= v <= hi]
    edges += [lo, hi, max(lo, hi - 1), min(hi, INT_MAX), min(hi, INT_MAX + 1), max(lo, -1)]
    small = [st.integers(max(lo, 0), min(hi, 5000))] if max(lo, 0) <= min(hi, 5000) else []
    return st.one_of(st.sampled_from(sorted(set(edges))), *small, st.integers(lo, hi))


def c_value(ctype: Any) -> st.SearchStrategy[Any]:
    """A random value of a cffi type: the struct's fields, recursively."""
    if ctype.kind == "primitive":
        if ctype.cname == "char":
            return st.binary(min_size=1, max_size=1)
        if ctype.cname == "_Bool":
            return st.booleans()
        bits = 8 * ffi.sizeof(ctype)
        unsigned = ctype.cname.startswith(("u", "unsigned")) or ctype.cname in ("size_t",)
        return ints(0, (1 << bits) - 1) if unsigned else ints(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    if ctype.kind == "enum":
        return ints(-(1 << 31), (1 << 31) - 1)
    if ctype.kind == "array":
        return st.lists(c_value(ctype.item), min_size=ctype.length, max_size=ctype.length)
    if ctype.kind == "struct":
        return st.fixed_dictionaries({name: c_value(field.type) for name, field in ctype.fields})
    if ctype.kind == "union":
        name, field = ctype.fields[0]
        return st.fixed_dictionaries({name: c_value(field.type)})
    raise AssertionError(f"no strategy for {ctype.cname}")


def c_fill(obj: Any, ctype: Any, value: dict[str, Any]) -> None:
    for name, field in ctype.fields:
        if name not in value:
            continue
        ft, v = field.type, value[name]
        if ft.kind in ("struct", "union"):
            c_fill(getattr(obj, name), ft, v)
        elif ft.kind == "array" and ft.item.kind in ("struct", "union"):
            for i, item in enumerate(v):
                c_fill(getattr(obj, name)[i], ft.item, item)
        elif ft.kind == "array" and ft.item.cname == "char":
            setattr(obj, name, b"".join(v))
        elif ft.kind == "array":
            arr = getattr(obj, name)
            for i, item in enumerate(v):
                arr[i] = item
        else:
            setattr(obj, name, v)


def payload_bytes(type_name: str, value: dict[str, Any]) -> bytes:
    ctype = ffi.typeof(type_name)
    size = libbpf.struct_size(type_name)
    view = libbpf.struct_view(type_name, bytearray(size))
    c_fill(view, ctype, value)
    return libbpf.struct_bytes(view, size)


def events(tuner_cls: type[Tuner], cookies: list[int]) -> st.SearchStrategy[list[Event]]:
    type_name = PAYLOADS[tuner_cls.name]
    scenario = st.one_of(st.sampled_from(range(len(tuner_cls.scenarios) + 3)), ints(0, (1 << 32) - 1))
    routes = ROUTES.get(tuner_cls.name, [])
    route = st.one_of(st.none(), st.sampled_from(routes)) if routes else st.none()
    if type_name is None:
        raw: st.SearchStrategy[Any] = st.binary(max_size=libbpf.MAX_STR)
    else:
        raw = c_value(ffi.typeof(type_name))

    def event(s: int, c: int, p: int, r: Any, via: tuple[int, int] | None) -> Event:
        if type_name is None:
            return Event.build(TUNER_ID, s, c, pid=p, raw=r)
        if via is not None:  # the scenario, and the tunable the update names
            s, r = via[0], {**r, "update": {**r["update"], "id": via[1]}}
        return Event.build(TUNER_ID, s, c, pid=p, raw=payload_bytes(type_name, r))

    one = st.builds(event, scenario, st.sampled_from(cookies), ints(0, 1 << 22), raw, route)
    return st.lists(one, min_size=1, max_size=4)


# (scenario, tunable) pairs a tuner's rules dispatch on: half the events
# take one (random ids almost never name a pair).
ROUTES: dict[str, list[tuple[int, int]]] = {
    "tcp_buffer": [
        (TcpBufferScenario.MEM_PRESSURE, TcpBufferTunable.TCP_MEM),
        (TcpBufferScenario.MEM_EXHAUSTION, TcpBufferTunable.TCP_MEM),
        (TcpBufferScenario.INCREASE, TcpBufferTunable.TCP_RMEM),
        (TcpBufferScenario.INCREASE, TcpBufferTunable.TCP_WMEM),
        (TcpBufferScenario.SYN_BACKLOG_INCREASE, TcpBufferTunable.TCP_MAX_SYN_BACKLOG),
    ],
}


def host_memory() -> st.SearchStrategy[HostMemory]:
    return st.builds(
        HostMemory,
        total_bytes=st.one_of(st.sampled_from([16 << 20, 1 << 30, 8 << 30, 1 << 40]), ints(1 << 20, 1 << 44)),
        zone_pages=st.one_of(st.just(0), ints(0, 1 << 32)),
        page_size=st.sampled_from([4096, 16384, 65536]),
        cpus=st.one_of(st.sampled_from([1, 2, 64]), st.integers(1, 1024)),
    )


def sysctl_values(tuner_cls: type[Tuner]) -> st.SearchStrategy[dict[str, tuple[int, ...]]]:
    fields: dict[str, st.SearchStrategy[tuple[int, ...]]] = {}
    for t in tuner_cls.tunables:
        if t.kind == "sysctl":
            fields[t.name] = st.tuples(*[ints(0, INT_MAX)] * t.num_values)
    return st.fixed_dictionaries(fields)


def texts(tuner_cls: type[Tuner]) -> dict[str, str]:
    out = {}
    for t in tuner_cls.tunables:
        if t.kind == "string":
            out[t.name] = "0" if "bitmap" in t.name else "reno cubic"
    return out


# --- the harness ----------------------------------------------------------------------------


class RecordingStore(TunableStore):
    """Keeps every proposal a tuner hands to the store, before it clamps."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.proposals: list[tuple[store_mod.Tuner, Proposal]] = []

    def apply(self, tuner: store_mod.Tuner, proposal: Proposal) -> tuple[int, ...] | None:
        self.proposals.append((tuner, proposal))
        return super().apply(tuner, proposal)


def within_bounds(tuner: Tuner, proposal: Proposal) -> None:
    t = tuner.tunable(proposal.tunable)
    assert len(proposal.new) == t.num_values, proposal
    top = tuner.highest(proposal.tunable)
    for v in proposal.new:
        assert t.lower is None or v >= t.lower, f"{t.name}: {proposal.new} below {t.lower} ({proposal.reason})"
        assert v <= top, f"{t.name}: {proposal.new} above {top} on {tuner.host_memory} ({proposal.reason})"


def seams(h: TunerHarness[Tuner], data: st.DataObject) -> None:
    """Random inputs where each tuner reads the world: protocol counters
    (snmp, netstat, sockstat) in both namespaces; ip_frag's trend of
    thresholds and failures (its back-off rule's input)."""
    tuner = h.tuner
    counters = data.draw(st.dictionaries(st.sampled_from(COUNTER_NAMES), ints(0, 1 << 40), max_size=8))
    for cookie in (h.global_cookie, NS):
        h.namespaces.set_counters(cookie, **counters)
    if isinstance(tuner, IpFragTuner) and data.draw(st.booleans()):
        for cookie in (h.global_cookie, NS):
            for tid in (IPV4, IPV6):
                tuner.trend(cookie, tid).extend((float(i), float(i)) for i in range(20))


def bpf_object(cls: type[Tuner], data: st.DataObject, glob: int) -> SyntheticObject | None:
    """The BPF object's side of the seams: tcp_buffer's memory flags and the
    correlation sums (latency for the buffers, connections established for
    the SYN backlog) of each tunable in both namespaces."""
    if cls is not TcpBufferTuner:
        return None
    flags = {name: int(data.draw(st.booleans())) for name in ("near_memory_pressure", "near_memory_exhaustion")}
    bpf = SyntheticObject(globals=flags, maps={HOLD_MAP: (TcpBufferHoldKey, TcpBufferHold)}, name="tcp_buffer_tuner")
    corr = bpf.map("bpftune_corr", CorrKey, CorrSums)
    for cookie in (glob, NS):
        for tid in (TcpBufferTunable.TCP_RMEM, TcpBufferTunable.TCP_WMEM, TcpBufferTunable.TCP_MAX_SYN_BACKLOG):
            samples = data.draw(st.sampled_from(CORRELATIONS))
            if samples:
                corr[CorrKey(tuner_id=TUNER_ID, id=tid, netns_cookie=cookie)] = CorrSums.of(samples)
    return bpf


# No sums, correlated and anti-correlated ones (the fields are unsigned).
CORRELATIONS: list[list[tuple[int, int]]] = [[], [(i, 10 * i) for i in range(20)], [(i, 100 - i) for i in range(20)]]
# The counters the tuners read, by the names procnet gives them: snmp
# (ip_frag, udp_buffer), netstat (tcp_buffer's syncookies rule), sockstat
# (tcp_buffer's allocated pages, read to leave the low-memory state).
COUNTER_NAMES = [
    "Ip.ReasmReqds",
    "Ip.ReasmFails",
    "Ip6ReasmReqds",
    "Ip6ReasmFails",
    "Udp.InDatagrams",
    "Udp.RcvbufErrors",
    tcp_buffer.synflood.SYNCOOKIES_FAILED,
    tcp_buffer.synflood.SYNCOOKIES_RECV,
    tcp_buffer.SOCKSTAT_TCP_PAGES,
]
# Scenarios the examples must propose at least once (the derandomized ones;
# not checked with PYBPFTUNE_PROPERTY_EXPLORE=1): the paths behind the seams
# (tcp_mem, the low-memory state, the SYN backlog's correlation, netstat's
# syncookies counters) are driven.  Leaving the low-memory state (sockstat)
# is reached in some runs only; test_tcp_buffer_tuner drives it.
# ip_frag's back-off needs an observation near a threshold it raised in
# the same example: test_ip_frag_tuner drives it.
MUST_REACH: dict[str, set[int]] = {
    "tcp_buffer": {
        TcpBufferScenario.MEM_PRESSURE,
        TcpBufferScenario.MEM_EXHAUSTION,
        TcpBufferScenario.LOW_MEM_ENTER,
        TcpBufferScenario.SYN_BACKLOG_INCREASE,
        TcpBufferScenario.SYN_BACKLOG_DECREASE,
        TcpBufferScenario.SYNCOOKIES_DISABLE,
    },
    "ip_frag": {IpFragScenario.INCREASE},
}


def neigh_backend(data: st.DataObject, evs: list[Event], glob: int) -> MemoryNeigh:
    tables = {}
    for family, fam in FAMILIES.items():
        if data.draw(st.booleans()):
            thresholds = data.draw(st.tuples(ints(0, INT_MAX), ints(0, INT_MAX), ints(0, INT_MAX)))
            tables[family] = Table(fam.table, family, thresholds, data.draw(ints(0, INT_MAX)))
    addresses = {}
    for ev in evs:
        stats = NeighTableStats.unpack(ev.raw)
        for cookie in (ev.netns_cookie, glob):
            prefixes = data.draw(st.lists(st.integers(-1, 130), max_size=4))
            addresses[(cookie, stats.ifindex, stats.family)] = prefixes
    return MemoryNeigh(tables, addresses)


class Waits:
    """Scheduler wait percentages handed out one per sample (net_buffer)."""

    def __init__(self, values: list[float | None]) -> None:
        self.values = values

    def sample(self) -> float | None:
        return self.values.pop(0) if self.values else None


def collaborators(cls: type[Tuner], data: st.DataObject, evs: list[Event], glob: int) -> dict[str, Any]:
    """Random stand-ins for what a tuner's constructor takes."""
    if cls is NeighTableTuner:
        return {"backend": neigh_backend(data, evs, glob)}
    if cls is NetBufferTuner:
        waits = data.draw(st.lists(st.one_of(st.none(), st.floats(0, 1000)), max_size=40))
        release = data.draw(st.sampled_from(["5.10.0", "6.1.0", "garbage"]))
        return {"sched_wait": Waits(list(waits)), "kernel_release": release}
    return {}


def build(cls: type[Tuner], data: st.DataObject, evs: list[Event], glob: int) -> TunerHarness[Tuner]:
    h = TunerHarness.build(
        cls,
        data.draw(sysctl_values(cls)),
        texts(cls),
        tuner_id=TUNER_ID,
        rate=data.draw(st.integers(0, 4)),
        store_class=RecordingStore,
        bpf=bpf_object(cls, data, glob),
        **collaborators(cls, data, evs, glob),
    )
    h.tuner.memory = data.draw(host_memory())
    seams(h, data)
    return h


def numeric(cls: type[Tuner]) -> bool:
    return any(t.kind in ("sysctl", "other") and t.num_values and t.name != "network_namespace" for t in cls.tunables)


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_no_proposal_leaves_its_tunables_bounds(name: str) -> None:
    examples = EXAMPLES if numeric(TUNERS[name]) else FEW_EXAMPLES
    proposed: set[int] = set()
    run = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=not EXPLORE,
        suppress_health_check=[HealthCheck.too_slow],
    )(given(data=st.data())(lambda data: proposed.update(drive(name, data))))
    run()
    missing = MUST_REACH.get(name, set()) - proposed
    assert EXPLORE or not missing, f"{name}: no example proposed scenarios {sorted(missing)}"


def drive(name: str, data: st.DataObject) -> set[int]:
    """One example; the scenarios of what was proposed."""
    cls = TUNERS[name]
    glob = Namespaces().global_cookie
    evs = data.draw(events(cls, [glob, NS]))
    h = build(cls, data, evs, glob)
    tuner, store, clock = h.tuner, h.store, h.clock
    assert isinstance(store, RecordingStore)
    proposed: set[int] = set()
    for ev in evs:
        for proposal in tuner.decide(ev):
            within_bounds(tuner, proposal)
            proposed.add(proposal.scenario)
        if name not in DECIDE_ONLY:
            tuner.handle_event(ev)
        clock.advance(data.draw(st.sampled_from([0.0, 0.3, 1.0, 5.0])))
    if name not in DECIDE_ONLY and type(tuner).tick is not Tuner.tick:
        for _ in range(3):
            tuner.tick(clock.now)
            clock.advance(2.0)
    for t, proposal in store.proposals:
        assert isinstance(t, Tuner)
        within_bounds(t, proposal)
    return proposed | {p.scenario for _t, p in store.proposals}
