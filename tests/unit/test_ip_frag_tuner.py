"""ip_frag rules, driven by synthetic observations over in-memory sysctls."""

from __future__ import annotations

import logging
import socket

import pytest

from pybpftune import hostmem
from pybpftune.bindings import IpFragObs, IpFragObservation
from pybpftune.corr import CORR_MIN_SAMPLES
from pybpftune.events import Event
from pybpftune.hostmem import HostMemory
from pybpftune.testing import TunerHarness
from pybpftune.tuners.common import pearson
from pybpftune.tuners.ip_frag import DECREASE, IPV4, IpFragTuner

NS = 4242  # a non-global namespace cookie
V4, V6 = "net.ipv4.ipfrag_high_thresh", "net.ipv6.ip6frag_high_thresh"
REASM = ("Ip.ReasmReqds", "Ip.ReasmFails", "Ip6ReasmReqds", "Ip6ReasmFails")
Harness = TunerHarness[IpFragTuner]


def make(v4: int = 8192, v6: int = 8192, mem_total: int = 8 << 30) -> Harness:
    """The tuner on a host with ``mem_total`` bytes, its reassembly counters
    at 0 in the namespaces the tests use."""
    h = TunerHarness.build(
        IpFragTuner, sysctls={V4: (v4,), V6: (v6,)}, tuner_id=7, memory=HostMemory(mem_total, 0, 4096, 4)
    )
    for cookie in (NS, NS + 1, NS + 2):
        h.namespaces.set_counters(cookie, **dict.fromkeys(REASM, 0))
    return h


def add(h: Harness, reqds: int, fails: int, v6: bool = False) -> None:
    """Move the namespace's reassembly counters forward."""
    prefix = "Ip6" if v6 else "Ip."
    counters = h.namespaces.counter_values[NS]
    h.namespaces.set_counters(
        NS,
        **{
            f"{prefix}ReasmReqds": counters[f"{prefix}ReasmReqds"] + reqds,
            f"{prefix}ReasmFails": counters[f"{prefix}ReasmFails"] + fails,
        },
    )


def near(mem: int, high: int = 8192, v6: bool = False, cookie: int = NS) -> Event:
    """The BPF side's report: fragment memory ``mem`` near ``high``."""
    obs = IpFragObs(family=socket.AF_INET6 if v6 else socket.AF_INET, mem=mem, high_thresh=high, low_thresh=4096)
    return Event.build(7, IpFragObservation.OBS_NEAR_THRESH, cookie, raw=obs.pack())


def test_memory_near_threshold_raises_it_in_that_namespace_only(caplog: pytest.LogCaptureFixture) -> None:
    h = make()
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        h.feed(near(7000))
    assert h.value(V4, NS) == (10240,)
    assert h.value(V4) == (8192,)
    assert (
        "Due to approaching fragmentation maximum threshold change net.ipv4.ipfrag_high_thresh from (8192) -> (10240)"
        in caplog.text
    )
    assert "in non-global ns" in caplog.text


def test_ipv6_observation_raises_the_ipv6_threshold() -> None:
    h = make()
    h.feed(near(8000, v6=True))
    assert h.value(V6, NS) == (10240,)
    assert h.value(V4, NS) == (8192,)


def test_no_reassemblies_yet_is_not_a_division_by_zero() -> None:
    """UPSTREAM BUG: bpftune computes ReasmFails * 100 / ReasmReqds with no
    zero check; a namespace that has reassembled nothing yet crashed it."""
    h = make()
    assert h.namespaces.counter_values[NS]["Ip.ReasmReqds"] == 0
    h.feed(near(7000))
    assert h.value(V4, NS) == (10240,)
    assert h.tuner.failure_percent(NS, IPV4) == 0.0


def test_failure_percent_uses_counts_since_the_last_look() -> None:
    h = make()
    add(h, 100, 50)
    assert h.tuner.failure_percent(NS, IPV4) == 50.0
    add(h, 100, 10)
    assert h.tuner.failure_percent(NS, IPV4) == 10.0
    assert h.tuner.failure_percent(NS, IPV4) == 0.0


def test_stale_observation_after_an_increase_is_ignored() -> None:
    h = make(v4=65536)
    assert not h.decide(near(7000, high=8192))
    assert h.sysctls.writes == []


def test_increases_that_go_with_more_failures_are_backed_off(caplog: pytest.LogCaptureFixture) -> None:
    h = make()
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        for i in range(CORR_MIN_SAMPLES):
            add(h, 100, 5 * (i + 1))  # the failure share rises with every increase
            current = h.value(V4, NS)[0]
            h.feed(near(current))
        grown_to = h.value(V4, NS)[0]
        assert grown_to > 8192
        add(h, 100, 60)
        h.feed(near(grown_to))
    assert h.value(V4, NS) == (grown_to - grown_to // 4,)
    assert "Due to reassembly failures rising with the fragmentation threshold (correlation" in caplog.text
    assert "Scenario 'need to decrease fragmentation high threshold'" in caplog.text


def test_increases_without_more_failures_continue() -> None:
    h = make()
    for _ in range(CORR_MIN_SAMPLES + 2):
        add(h, 100, 0)
        h.feed(near(h.value(V4, NS)[0]))
    counts = h.store.scenario_counts(h.tuner, IPV4)
    assert sum(n for (scenario, _g), n in counts.items() if scenario == DECREASE) == 0


def test_backing_off_never_goes_below_the_original_value() -> None:
    h = make()
    h.feed(near(7000))  # 8192 -> 10240, original recorded
    trend = h.tuner.trend(NS, IPV4)
    trend.clear()
    trend.extend((float(x), float(x)) for x in range(20))  # perfectly correlated
    add(h, 10, 1)
    props = h.decide(near(10000, high=10240))
    assert [(p.scenario, p.new) for p in props] == [(DECREASE, (8192,))]


def test_threshold_stops_at_a_32nd_of_memory(caplog: pytest.LogCaptureFixture) -> None:
    h = make(v4=30 << 20, mem_total=1 << 30)  # ceiling 32 MiB
    h.feed(near(29 << 20, high=30 << 20))
    assert h.value(V4, NS) == (32 << 20,)
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        for _ in range(2):
            h.feed(near(32 << 20, high=32 << 20))
    assert h.value(V4, NS) == (32 << 20,)
    assert caplog.text.count("not increasing it further") == 1


def test_thresholds_of_all_namespaces_add_up_to_a_16th_of_memory(caplog: pytest.LogCaptureFixture) -> None:
    """Fragment memory is accounted per namespace: with 1 GiB, each threshold
    stops at 32 MiB, and all the thresholds raised add up to at most 64 MiB."""
    h = make(v4=24 << 20, v6=24 << 20, mem_total=1 << 30)
    assert h.tuner.total_budget == 64 << 20
    for cookie in (NS, NS + 1):
        h.feed(near(24 << 20, high=24 << 20, cookie=cookie))
        assert h.value(V4, cookie) == (30 << 20,)
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        # 4 MiB left: a third namespace's 24 MiB cannot grow.
        for _ in range(2):
            h.feed(near(24 << 20, high=24 << 20, cookie=NS + 2))
        assert h.value(V4, NS + 2) == (24 << 20,)
        # A namespace already raised still grows to its own cap (62 MiB in all).
        h.feed(near(30 << 20, high=30 << 20))
        assert h.value(V4, NS) == (32 << 20,)
    raised = sum(v[0] for name, _t, _c, v in h.store.namespace_values() if name == h.tuner.name)
    assert raised == 62 << 20
    assert caplog.text.count("add up to 1/16 of memory") == 1
    # A namespace that is gone gives its share back.
    h.store.mark_gone(NS + 1, "test")
    h.feed(near(24 << 20, high=24 << 20, cookie=NS + 2))
    assert h.value(V4, NS + 2) == (30 << 20,)


def test_mem_total_parses_meminfo() -> None:
    assert hostmem.parse_mem_total("MemTotal:       24576000 kB\nMemFree: 1 kB\n") == 24576000 * 1024


def test_pearson() -> None:
    assert pearson([(1, 2), (2, 4), (3, 6)]) == pytest.approx(1.0)
    assert pearson([(1, 6), (2, 4), (3, 2)]) == pytest.approx(-1.0)
    assert pearson([(1, 1), (2, 1)]) == 0.0
    assert pearson([(1, 1)]) == 0.0
