"""route_table rules, driven by synthetic events over in-memory sysctls (no root)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from pybpftune import libbpf
from pybpftune._libbpf import lib
from pybpftune.errors import NotSupported
from pybpftune.events import Event, Update
from pybpftune.netns import Namespaces
from pybpftune.objects import SignalChoice
from pybpftune.store import TunableStore
from pybpftune.sysctl import MemorySysctl
from pybpftune.tuner import INT_MAX, Steps, TunerContext
from pybpftune.tuners import route_table as rt
from pybpftune.tuners.route_table import RouteTableTuner, grown_max_size

STEPS = Steps(4)
NS = 777  # a namespace cookie other than the daemon's
MAX_SIZE = "net.ipv6.route.max_size"


def make_tuner(values: dict[str, tuple[int, ...]] | None = None) -> tuple[RouteTableTuner, MemorySysctl]:
    ns = Namespaces()
    backend = MemorySysctl({MAX_SIZE: (32,)} if values is None else values, ns.global_cookie)
    store = TunableStore(backend, ns)
    tuner = RouteTableTuner(TunerContext(store, ns, STEPS), 6)
    store.register(tuner)
    return tuner, backend


def full_event(max_size: int, count: int, cookie: int = NS) -> Event:
    update = Update(rt.MAX_SIZE, (max_size, count, 0), (STEPS.grow(max_size), count, 0))
    return Event.build(6, rt.FULL, netns_cookie=cookie, updates=[update])


def test_ids_match_the_shared_header() -> None:
    assert rt.MAX_SIZE == lib.ROUTE_TABLE_IPV6_MAX_SIZE
    assert rt.FULL == lib.ROUTE_TABLE_FULL
    assert RouteTableTuner.tunables[lib.ROUTE_TABLE_IPV6_MAX_SIZE].name == MAX_SIZE


def test_grows_until_no_longer_nearly_full() -> None:
    assert grown_max_size(40, 32, STEPS) == 62  # 32 -> 40 -> 50 -> 62
    assert grown_max_size(24, 32, STEPS) == 40  # nearly full: one step
    assert grown_max_size(23, 32, STEPS) is None  # 23 + 8 < 32


def test_never_past_int_max() -> None:
    assert grown_max_size(INT_MAX, INT_MAX - 3, STEPS) == INT_MAX
    assert grown_max_size(INT_MAX, INT_MAX, STEPS) is None


def test_tiny_values_still_make_progress() -> None:
    assert grown_max_size(5, 1, STEPS) == 7


def test_event_writes_in_its_namespace_with_bpftunes_line(caplog: pytest.LogCaptureFixture) -> None:
    tuner, backend = make_tuner()
    caplog.set_level(logging.INFO)
    tuner.handle_event(full_event(32, 40))
    assert backend.writes == [(NS, MAX_SIZE, (62,))]
    assert backend.read(MAX_SIZE) == (32,), "the global namespace is untouched"
    assert "Due to dst table filling up, change net.ipv6.route.max_size from (32) -> (62)" in caplog.text
    assert "in non-global ns" in caplog.text


def test_stale_event_changes_nothing() -> None:
    tuner, backend = make_tuner()
    tuner.handle_event(full_event(32, 40))
    tuner.handle_event(full_event(32, 40))  # a second event from before the write
    assert len(backend.writes) == 1


def test_unknown_namespace_is_ignored() -> None:
    tuner, _ = make_tuner()
    assert not tuner.decide(full_event(32, 40, cookie=libbpf.NETNS_UNKNOWN))


def test_ipv6_off_the_tuner_runs_idle(caplog: pytest.LogCaptureFixture) -> None:
    tuner, backend = make_tuner({})
    caplog.set_level(logging.INFO)
    tuner.start()
    assert "IPv6 is off" in caplog.text
    tuner.handle_event(full_event(32, 40))
    assert backend.writes == []


def test_either_signal_suffices_but_one_is_needed() -> None:
    """dst_table (lookups) and dst_gc (the garbage collector) are both
    optional; a kernel where neither has a form refuses the tuner, naming
    both and why."""
    tuner, _backend = make_tuner()
    gc_only = {
        "dst_table": SignalChoice("dst_table", ["tp_btf"], None, {"tp_btf": "no such tracepoint"}),
        "dst_gc": SignalChoice("dst_gc", ["fentry", "kprobe"], "fentry"),
    }
    tuner.loaded = SimpleNamespace(choices=gc_only)  # type: ignore[assignment]
    tuner.start()
    neither = {
        "dst_table": gc_only["dst_table"],
        "dst_gc": SignalChoice("dst_gc", ["fentry", "kprobe"], None, {"fentry": "EPERM", "kprobe": "ENOENT"}),
    }
    tuner.loaded = SimpleNamespace(choices=neither)  # type: ignore[assignment]
    with pytest.raises(NotSupported) as err:
        tuner.start()
    assert "dst_table: unavailable (tp_btf: no such tracepoint)" in str(err.value)
    assert "dst_gc: unavailable (fentry: EPERM; kprobe: ENOENT)" in str(err.value)
