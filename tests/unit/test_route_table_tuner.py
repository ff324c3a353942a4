"""route_table rules, driven by synthetic events over in-memory sysctls (no root)."""

from __future__ import annotations

import logging

import pytest

from pybpftune import libbpf
from pybpftune.errors import NotSupported
from pybpftune.events import Event, Update
from pybpftune.objects import SignalChoice
from pybpftune.testing import TunerHarness
from pybpftune.tuner import INT_MAX, Steps
from pybpftune.tuners.route_table import FULL, MAX_SIZE, RouteTableTuner, grown_max_size, require_a_signal

STEPS = Steps(4)
NS = 777  # a namespace cookie other than the daemon's
MAX_SIZE_NAME = "net.ipv6.route.max_size"
Harness = TunerHarness[RouteTableTuner]


@pytest.fixture
def h(harness: type[Harness]) -> Harness:
    return harness.build(RouteTableTuner, sysctls={MAX_SIZE_NAME: (32,)}, tuner_id=6)


def full_event(max_size: int, count: int, cookie: int = NS) -> Event:
    update = Update(MAX_SIZE, (max_size, count, 0), (STEPS.grow(max_size), count, 0))
    return Event.build(6, FULL, netns_cookie=cookie, updates=[update])


def test_grows_until_no_longer_nearly_full() -> None:
    assert grown_max_size(40, 32, STEPS) == 62  # 32 -> 40 -> 50 -> 62
    assert grown_max_size(24, 32, STEPS) == 40  # nearly full: one step
    assert grown_max_size(23, 32, STEPS) is None  # 23 + 8 < 32


def test_never_past_int_max() -> None:
    assert grown_max_size(INT_MAX, INT_MAX - 3, STEPS) == INT_MAX
    assert grown_max_size(INT_MAX, INT_MAX, STEPS) is None


def test_tiny_values_still_make_progress() -> None:
    assert grown_max_size(5, 1, STEPS) == 7


def test_event_writes_in_its_namespace_with_bpftunes_line(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    h.feed(full_event(32, 40))
    assert h.sysctls.writes == [(NS, MAX_SIZE_NAME, (62,))]
    assert h.value(MAX_SIZE_NAME) == (32,), "the global namespace is untouched"
    assert "Due to dst table filling up, change net.ipv6.route.max_size from (32) -> (62)" in caplog.text
    assert "in non-global ns" in caplog.text


def test_stale_event_changes_nothing(h: Harness) -> None:
    h.feed(full_event(32, 40))
    h.feed(full_event(32, 40))  # a second event from before the write
    assert len(h.sysctls.writes) == 1


def test_unknown_namespace_is_ignored(h: Harness) -> None:
    assert not h.decide(full_event(32, 40, cookie=libbpf.NETNS_UNKNOWN))


def test_ipv6_off_the_tuner_runs_idle(harness: type[Harness], caplog: pytest.LogCaptureFixture) -> None:
    h = harness.build(RouteTableTuner, sysctls={}, tuner_id=6)
    caplog.set_level(logging.INFO)
    h.tuner.start()
    assert "IPv6 is off" in caplog.text
    h.feed(full_event(32, 40))
    assert h.sysctls.writes == []


def test_either_signal_suffices_but_one_is_needed() -> None:
    """dst_table (lookups) and dst_gc (the garbage collector) are both
    optional; a kernel where neither has a form refuses the tuner, naming
    both and why."""
    gc_only = {
        "dst_table": SignalChoice("dst_table", ["tp_btf"], None, {"tp_btf": "no such tracepoint"}),
        "dst_gc": SignalChoice("dst_gc", ["fentry", "kprobe"], "fentry"),
    }
    require_a_signal(gc_only)
    neither = {
        "dst_table": gc_only["dst_table"],
        "dst_gc": SignalChoice("dst_gc", ["fentry", "kprobe"], None, {"fentry": "EPERM", "kprobe": "ENOENT"}),
    }
    with pytest.raises(NotSupported) as err:
        require_a_signal(neither)
    assert "dst_table: unavailable (tp_btf: no such tracepoint)" in str(err.value)
    assert "dst_gc: unavailable (fentry: EPERM; kprobe: ENOENT)" in str(err.value)
