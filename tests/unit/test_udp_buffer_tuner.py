"""udp_buffer rules, driven by synthetic observations over in-memory sysctls."""

from __future__ import annotations

import errno
import logging
import socket

import pytest

from pybpftune.bindings import UdpBufferObs, UdpBufferObservation, UdpBufferSource
from pybpftune.events import Event
from pybpftune.hostmem import HostMemory
from pybpftune.testing import TunerHarness
from pybpftune.tuner import SetGlobal, Steps
from pybpftune.tuners import udp_buffer as ub
from pybpftune.tuners.udp_buffer import UdpBufferTuner

KIB = 1024
FREE = 1_600_000  # buffer-usable pages: caps 100000 / 200000 / 400000
COOKIE = 0  # the events' namespace
Harness = TunerHarness[UdpBufferTuner]


def make(
    rmem_max: int = 16 * KIB,
    rmem_default: int = 16 * KIB,
    udp_mem: tuple[int, int, int] = (20000, 40000, 80000),
    zone_pages: int = FREE,
    counters: bool = True,
) -> Harness:
    """The tuner on a host whose zones give ``zone_pages`` buffer-usable
    pages (0: none, MemTotal stands in), its namespace's UDP counters at a
    10% drop rate unless ``counters`` is False."""
    h = TunerHarness.build(
        UdpBufferTuner,
        sysctls={
            "net.ipv4.udp_mem": udp_mem,
            "net.core.rmem_max": (rmem_max,),
            "net.core.rmem_default": (rmem_default,),
        },
        tuner_id=3,
        memory=HostMemory(FREE * 4096, zone_pages, 4096, 4),
    )
    if counters:
        h.namespaces.set_counters(COOKIE, **{"Udp.InDatagrams": 900, "Udp.RcvbufErrors": 100})
    return h


def rcvbuf_full(sk_rcvbuf: int, locked: bool = False) -> Event:
    obs = UdpBufferObs(
        source=UdpBufferSource.SRC_FAIL_QUEUE,
        error=-errno.ENOMEM,
        family=socket.AF_INET,
        userlocks=ub.SOCK_RCVBUF_LOCK if locked else 0,
        sk_rcvbuf=sk_rcvbuf,
        rmem_alloc=sk_rcvbuf,
        mem_allocated=50,
        mem=(0, 0, 0),
    )
    return Event.build(3, UdpBufferObservation.OBS_RCVBUF_FULL, COOKIE, raw=obs.pack())


def mem_limit(allocated: int, mem: tuple[int, int, int]) -> Event:
    obs = UdpBufferObs(
        source=UdpBufferSource.SRC_FAIL_QUEUE,
        error=-errno.ENOBUFS,
        family=socket.AF_INET,
        sk_rcvbuf=212992,
        mem_allocated=allocated,
        mem=mem,
    )
    return Event.build(3, UdpBufferObservation.OBS_MEM_LIMIT, COOKIE, raw=obs.pack())


def test_default_sized_socket_overflowing_grows_rmem_default_and_keeps_max_above(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = make()
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        h.feed(rcvbuf_full(16 * KIB))
    assert h.value("net.core.rmem_default") == (20480,)
    assert h.value("net.core.rmem_max") == (20480,)
    text = caplog.text
    assert (
        "Due to receive queue overflow of a socket using the default buffer size (16384 bytes) "
        "change net.core.rmem_default from (16384) -> (20480)" in text
    )
    assert "drops 100 drop rate 100.0 per mille" in text


def test_every_event_refreshes_the_bpf_copy_of_the_limits() -> None:
    """The pre-filter follows changes made behind the tuner's back."""
    h = make(rmem_max=1 << 20)
    h.sysctls.write("net.core.rmem_default", (64 * KIB,))
    decision = h.decide(rcvbuf_full(16 * KIB))
    assert decision.effects == (SetGlobal("rmem_max", 1 << 20), SetGlobal("rmem_default", 64 * KIB))
    assert decision.proposals == ()


def test_rmem_max_already_above_the_new_default_is_left_alone() -> None:
    h = make(rmem_max=1 << 20)
    h.feed(rcvbuf_full(16 * KIB))
    assert h.value("net.core.rmem_default") == (20480,)
    assert h.value("net.core.rmem_max") == (1 << 20,)


def test_socket_created_before_the_last_increase_does_not_push_further() -> None:
    h = make(rmem_max=64 * KIB, rmem_default=64 * KIB)
    assert h.decide(rcvbuf_full(16 * KIB)).proposals == ()
    assert h.sysctls.writes == []


def test_locked_socket_capped_by_rmem_max_grows_only_rmem_max() -> None:
    h = make()
    props = h.decide(rcvbuf_full(32 * KIB, locked=True))
    assert [(p.tunable, p.scenario, p.new) for p in props] == [(ub.RMEM_MAX, ub.INCREASE, (20480,))]


def test_locked_socket_below_the_cap_changes_nothing() -> None:
    """It chose its size: neither a larger rmem_max nor rmem_default helps it."""
    h = make()
    assert h.decide(rcvbuf_full(8 * KIB, locked=True)).proposals == ()


def test_values_stay_below_256_mib(caplog: pytest.LogCaptureFixture) -> None:
    big = 250 * 1024 * 1024
    h = make(rmem_max=big, rmem_default=big)
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        for _ in range(3):
            h.feed(rcvbuf_full(big))
    assert h.sysctls.writes == []
    assert caplog.text.count("not increasing it further") == 1


def test_pressure_grows_udp_mem_within_memory_caps() -> None:
    h = make(udp_mem=(20000, 40000, 80000))
    h.feed(mem_limit(39000, (20000, 40000, 80000)))
    assert h.value("net.ipv4.udp_mem") == (25000, 50000, 100000)
    counts = h.store.scenario_counts(h.tuner, ub.UDP_MEM)
    assert sum(n for (scenario, _g), n in counts.items() if scenario == ub.MEM_PRESSURE) == 1


def test_exhaustion_keeps_values_that_do_not_grow() -> None:
    """UPSTREAM BUG: bpftune sent udp_mem[0]/[1] as 0 when they were already
    above their caps, and the handler wrote the zeros."""
    mem = (150000, 300000, 320000)  # [0] and [1] above F/16 and F/8
    h = make(udp_mem=mem)
    props = h.decide(mem_limit(320000, mem))
    assert [(p.tunable, p.scenario, p.new) for p in props] == [
        (ub.UDP_MEM, ub.MEM_EXHAUSTION, (150000, 300000, 400000))
    ]


def test_exhaustion_at_the_cap_gives_back_receive_buffer_growth() -> None:
    """UPSTREAM BUGs: the shrink branch was dead code, and it labelled the
    rmem_default decrease with the rmem_max id."""
    mem = (100000, 200000, 400000)  # all at their caps
    h = make(rmem_max=16 * KIB, rmem_default=16 * KIB, udp_mem=mem)
    h.sysctls.write("net.core.rmem_max", (64 * KIB,))  # grown since start
    h.sysctls.write("net.core.rmem_default", (48 * KIB,))
    props = h.decide(mem_limit(400000, mem))
    assert [(p.tunable, p.scenario, p.new) for p in props] == [
        (ub.RMEM_MAX, ub.DECREASE, (48 * KIB,)),
        (ub.RMEM_DEFAULT, ub.DECREASE, (36 * KIB,)),
    ]
    for p in props:
        h.tuner.apply(p)
    assert h.value("net.core.rmem_max") == (48 * KIB,)
    assert h.value("net.core.rmem_default") == (36 * KIB,)


def test_shrinking_stops_at_the_original_values() -> None:
    mem = (100000, 200000, 400000)
    h = make(rmem_max=16 * KIB, rmem_default=16 * KIB, udp_mem=mem)
    assert h.decide(mem_limit(400000, mem)).proposals == ()


def test_pressure_at_the_cap_does_nothing() -> None:
    mem = (100000, 200000, 400000)
    h = make(udp_mem=mem)
    assert h.decide(mem_limit(200000, mem)).proposals == ()


def test_udp_mem_beyond_what_memory_can_back_comes_down_to_a_quarter() -> None:
    """As tcp_mem: a udp_mem max above F/4 is not kept once the tuner acts."""
    mem = (20000, 40000, 2_000_000_000)
    h = make(udp_mem=mem)
    h.feed(mem_limit(39000, mem))
    assert h.value("net.ipv4.udp_mem") == (25000, 50000, FREE // 4)
    assert ub.grow_udp_mem((10**9, 10**9, 10**9), FREE, Steps(4).grow) == (FREE // 4,) * 3


def test_without_usable_zones_udp_mem_is_capped_from_memtotal() -> None:
    h = make(udp_mem=(20000, 40000, 380000), zone_pages=0)
    assert h.tuner.free_pages == FREE  # MemTotal: what the zones would have said here
    h.feed(mem_limit(39000, (20000, 40000, 380000)))
    assert h.value("net.ipv4.udp_mem") == (25000, 50000, FREE // 4)


def test_refusal_just_above_udp_mem_min_is_pressure() -> None:
    """UDP has no memory-pressure state: above udp_mem[0] the kernel refuses
    every socket holding more than udp_rmem_min (5.10 drops at 21 pages with
    udp_mem 20 45 50).  bpftune waited for udp_mem[1] and never grew it."""
    h = make(udp_mem=(20, 45, 50))
    props = h.decide(mem_limit(21, (20, 45, 50)))
    assert [(p.tunable, p.scenario, p.new) for p in props] == [(ub.UDP_MEM, ub.MEM_PRESSURE, (25, 56, 62))]


def test_refusal_below_udp_mem_min_is_not_udp_mem() -> None:
    """A memory cgroup's limit refuses too; a larger udp_mem cannot help."""
    h = make(udp_mem=(20000, 40000, 80000))
    assert h.decide(mem_limit(19000, (20000, 40000, 80000))).proposals == ()


def test_memory_well_below_pressure_is_ignored() -> None:
    h = make()
    assert h.decide(mem_limit(100, (20000, 40000, 80000))).proposals == ()


def test_unknown_memory_size_grows_nothing() -> None:
    assert ub.grow_udp_mem((1, 2, 3), 0, Steps(4).grow) == (1, 2, 3)


def test_drop_rate_without_traffic_is_zero() -> None:
    """UPSTREAM BUG: bpftune divides by InDatagrams, which may be 0."""
    assert ub.udp_drop_rate({}) == (0, 0, 0.0)
    assert ub.udp_drop_rate({"Udp.InDatagrams": 0, "Udp.RcvbufErrors": 0}) == (0, 0, 0.0)
    assert ub.udp_drop_rate({"Udp6InDatagrams": 0, "Udp6RcvbufErrors": 7}, v6=True) == (0, 7, 1000.0)


def test_drop_rate_log_survives_a_namespace_without_counters() -> None:
    h = make(counters=False)
    h.feed(rcvbuf_full(16 * KIB))
    assert h.value("net.core.rmem_default") == (20480,)
