"""ip_frag rules, driven by synthetic observations over in-memory sysctls."""

from __future__ import annotations

import logging

import pytest

from pybpftune import _libbpf
from pybpftune.corr import CORR_MIN_SAMPLES
from pybpftune.netns import Namespaces
from pybpftune.procnet import Counters
from pybpftune.store import TunableStore
from pybpftune.sysctl import MemorySysctl
from pybpftune.tuner import Steps, TunerContext
from pybpftune.tuners import ip_frag as fr
from pybpftune.tuners.common import pearson
from pybpftune.tuners.ip_frag import FragObservation, IpFragTuner

lib = _libbpf.lib
NS = 4242  # a non-global namespace cookie
V4, V6 = "net.ipv4.ipfrag_high_thresh", "net.ipv6.ip6frag_high_thresh"


class Counting:
    """Reassembly counters of one namespace that tests move forward."""

    def __init__(self) -> None:
        self.values: Counters = {"Ip.ReasmReqds": 0, "Ip.ReasmFails": 0, "Ip6ReasmReqds": 0, "Ip6ReasmFails": 0}

    def __call__(self, cookie: int) -> Counters | None:
        return dict(self.values)

    def add(self, reqds: int, fails: int, v6: bool = False) -> None:
        prefix = "Ip6" if v6 else "Ip."
        self.values[f"{prefix}ReasmReqds"] += reqds
        self.values[f"{prefix}ReasmFails"] += fails


def make_tuner(v4: int = 8192, v6: int = 8192) -> tuple[IpFragTuner, MemorySysctl, Counting]:
    ns = Namespaces()
    backend = MemorySysctl({V4: (v4,), V6: (v6,)}, global_cookie=ns.global_cookie)
    store = TunableStore(backend, ns)
    tuner = IpFragTuner(TunerContext(store, ns, Steps(4)), 7)
    store.register(tuner)
    counting = Counting()
    tuner.counters = counting
    tuner.mem_total = 8 << 30
    return tuner, backend, counting


def near(mem: int, high: int = 8192, v6: bool = False) -> FragObservation:
    return FragObservation(fr.AF_INET6 if v6 else fr.AF_INET, mem, high, 4096)


def test_ids_match_the_shared_header() -> None:
    assert (fr.IPV4_HIGH_THRESH, fr.IPV6_HIGH_THRESH) == (lib.IP_FRAG_IPV4_HIGH_THRESH, lib.IP_FRAG_IPV6_HIGH_THRESH)
    assert (fr.INCREASE, fr.DECREASE) == (lib.IP_FRAG_INCREASE, lib.IP_FRAG_DECREASE)
    assert fr.OBS_NEAR_THRESH == lib.IP_FRAG_OBS_NEAR_THRESH


def test_observation_round_trips_through_the_event_layout() -> None:
    obs = near(7000, v6=True)
    assert FragObservation.from_event(obs.event(7, NS)) == obs


def test_memory_near_threshold_raises_it_in_that_namespace_only(caplog: pytest.LogCaptureFixture) -> None:
    tuner, backend, _ = make_tuner()
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        tuner.handle_event(near(7000).event(7, NS))
    assert backend.read(V4, NS) == (10240,)
    assert backend.read(V4) == (8192,)
    assert (
        "Due to approaching fragmentation maximum threshold change net.ipv4.ipfrag_high_thresh from (8192) -> (10240)"
        in caplog.text
    )
    assert "in non-global ns" in caplog.text


def test_ipv6_observation_raises_the_ipv6_threshold() -> None:
    tuner, backend, _ = make_tuner()
    tuner.handle_event(near(8000, v6=True).event(7, NS))
    assert backend.read(V6, NS) == (10240,)
    assert backend.read(V4, NS) == (8192,)


def test_no_reassemblies_yet_is_not_a_division_by_zero() -> None:
    """UPSTREAM BUG: bpftune computes ReasmFails * 100 / ReasmReqds with no
    zero check; a namespace that has reassembled nothing yet crashed it."""
    tuner, backend, counting = make_tuner()
    assert counting.values["Ip.ReasmReqds"] == 0
    tuner.handle_event(near(7000).event(7, NS))
    assert backend.read(V4, NS) == (10240,)
    assert tuner.failure_percent(NS, fr.IPV4_HIGH_THRESH) == 0.0


def test_failure_percent_uses_counts_since_the_last_look() -> None:
    tuner, _, counting = make_tuner()
    counting.add(100, 50)
    assert tuner.failure_percent(NS, fr.IPV4_HIGH_THRESH) == 50.0
    counting.add(100, 10)
    assert tuner.failure_percent(NS, fr.IPV4_HIGH_THRESH) == 10.0
    assert tuner.failure_percent(NS, fr.IPV4_HIGH_THRESH) == 0.0


def test_stale_observation_after_an_increase_is_ignored() -> None:
    tuner, backend, _ = make_tuner(v4=65536)
    assert not tuner.decide(near(7000, high=8192).event(7, NS))
    assert backend.writes == []


def test_increases_that_go_with_more_failures_are_backed_off(caplog: pytest.LogCaptureFixture) -> None:
    tuner, backend, counting = make_tuner()
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        for i in range(CORR_MIN_SAMPLES):
            counting.add(100, 5 * (i + 1))  # the failure share rises with every increase
            current = backend.read(V4, NS)[0]
            tuner.handle_event(near(current).event(7, NS))
        grown_to = backend.read(V4, NS)[0]
        assert grown_to > 8192
        counting.add(100, 60)
        tuner.handle_event(near(grown_to).event(7, NS))
    assert backend.read(V4, NS) == (grown_to - grown_to // 4,)
    assert "Due to reassembly failures rising with the fragmentation threshold (correlation" in caplog.text
    assert "Scenario 'need to decrease fragmentation high threshold'" in caplog.text


def test_increases_without_more_failures_continue() -> None:
    tuner, backend, counting = make_tuner()
    for _ in range(CORR_MIN_SAMPLES + 2):
        counting.add(100, 0)
        tuner.handle_event(near(backend.read(V4, NS)[0]).event(7, NS))
    counts = tuner.ctx.store.scenario_counts(tuner, fr.IPV4_HIGH_THRESH)
    assert sum(n for (scenario, _g), n in counts.items() if scenario == fr.DECREASE) == 0


def test_backing_off_never_goes_below_the_original_value() -> None:
    tuner, _backend, counting = make_tuner()
    tuner.handle_event(near(7000).event(7, NS))  # 8192 -> 10240, original recorded
    key = (NS, fr.IPV4_HIGH_THRESH)
    tuner._samples[key].clear()
    tuner._samples[key].extend((float(x), float(x)) for x in range(20))  # perfectly correlated
    counting.add(10, 1)
    props = tuner.decide(near(10000, high=10240).event(7, NS))
    assert [(p.scenario, p.new) for p in props] == [(fr.DECREASE, (8192,))]


def test_threshold_stops_at_a_32nd_of_memory(caplog: pytest.LogCaptureFixture) -> None:
    tuner, backend, _ = make_tuner(v4=30 << 20)
    tuner.mem_total = 1 << 30  # ceiling 32 MiB
    tuner.handle_event(near(29 << 20, high=30 << 20).event(7, NS))
    assert backend.read(V4, NS) == (32 << 20,)
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        for _ in range(2):
            tuner.handle_event(near(32 << 20, high=32 << 20).event(7, NS))
    assert backend.read(V4, NS) == (32 << 20,)
    assert caplog.text.count("not increasing it further") == 1


def test_thresholds_of_all_namespaces_add_up_to_a_16th_of_memory(caplog: pytest.LogCaptureFixture) -> None:
    """Fragment memory is accounted per namespace: with 1 GiB, each threshold
    stops at 32 MiB, and all the thresholds raised add up to at most 64 MiB."""
    tuner, backend, _ = make_tuner(v4=24 << 20, v6=24 << 20)
    tuner.mem_total = 1 << 30
    assert tuner.total_budget == 64 << 20
    for cookie in (NS, NS + 1):
        tuner.handle_event(near(24 << 20, high=24 << 20).event(7, cookie))
        assert backend.read(V4, cookie) == (30 << 20,)
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        # 4 MiB left: a third namespace's 24 MiB cannot grow.
        for _ in range(2):
            tuner.handle_event(near(24 << 20, high=24 << 20).event(7, NS + 2))
        assert backend.read(V4, NS + 2) == (24 << 20,)
        # A namespace already raised still grows to its own cap (62 MiB in all).
        tuner.handle_event(near(30 << 20, high=30 << 20).event(7, NS))
        assert backend.read(V4, NS) == (32 << 20,)
    raised = sum(v[0] for name, _t, _c, v in tuner.ctx.store.namespace_values() if name == tuner.name)
    assert raised == 62 << 20
    assert caplog.text.count("add up to 1/16 of memory") == 1
    # A namespace that is gone gives its share back.
    tuner.ctx.store.mark_gone(NS + 1, "test")
    tuner.handle_event(near(24 << 20, high=24 << 20).event(7, NS + 2))
    assert backend.read(V4, NS + 2) == (30 << 20,)


def test_mem_total_parses_meminfo() -> None:
    assert fr.mem_total_bytes("MemTotal:       24576000 kB\nMemFree: 1 kB\n") == 24576000 * 1024


def test_pearson() -> None:
    assert pearson([(1, 2), (2, 4), (3, 6)]) == pytest.approx(1.0)
    assert pearson([(1, 6), (2, 4), (3, 2)]) == pytest.approx(-1.0)
    assert pearson([(1, 1), (2, 1)]) == 0.0
    assert pearson([(1, 1)]) == 0.0
