"""udp_buffer rules, driven by synthetic observations over in-memory sysctls."""

from __future__ import annotations

import logging

import pytest

from pybpftune import _libbpf
from pybpftune.netns import Namespaces
from pybpftune.store import TunableStore
from pybpftune.sysctl import MemorySysctl
from pybpftune.tuner import Steps, TunerContext
from pybpftune.tuners import udp_buffer as ub
from pybpftune.tuners.udp_buffer import UdpBufferTuner, UdpObservation

lib = _libbpf.lib
KIB = 1024
FREE = 1_600_000  # buffer-usable pages: caps 100000 / 200000 / 400000


def make_tuner(
    rmem_max: int = 16 * KIB, rmem_default: int = 16 * KIB, udp_mem: tuple[int, int, int] = (20000, 40000, 80000)
) -> tuple[UdpBufferTuner, MemorySysctl]:
    ns = Namespaces()
    backend = MemorySysctl(
        {"net.ipv4.udp_mem": udp_mem, "net.core.rmem_max": (rmem_max,), "net.core.rmem_default": (rmem_default,)},
        global_cookie=ns.global_cookie,
    )
    store = TunableStore(backend, ns)
    tuner = UdpBufferTuner(TunerContext(store, ns, Steps(4)), 3)
    store.register(tuner)
    tuner.free_pages = FREE
    tuner.counters = lambda cookie: {"Udp.InDatagrams": 900, "Udp.RcvbufErrors": 100}
    return tuner, backend


def rcvbuf_full(sk_rcvbuf: int, locked: bool = False) -> UdpObservation:
    return UdpObservation(
        ub.OBS_RCVBUF_FULL, ub.SRC_FAIL_QUEUE, -12, 2, 2 if locked else 0, sk_rcvbuf, sk_rcvbuf, 50, (0, 0, 0)
    )


def mem_limit(allocated: int, mem: tuple[int, int, int]) -> UdpObservation:
    return UdpObservation(ub.OBS_MEM_LIMIT, ub.SRC_FAIL_QUEUE, -ub.ENOBUFS, 2, 0, 212992, 0, allocated, mem)


def values(backend: MemorySysctl, name: str) -> tuple[int, ...]:
    return backend.read(name)


def test_ids_match_the_shared_header() -> None:
    assert (ub.UDP_MEM, ub.RMEM_MAX, ub.RMEM_DEFAULT) == (
        lib.UDP_BUFFER_UDP_MEM,
        lib.UDP_BUFFER_RMEM_MAX,
        lib.UDP_BUFFER_RMEM_DEFAULT,
    )
    assert (ub.INCREASE, ub.DECREASE, ub.MEM_PRESSURE, ub.MEM_EXHAUSTION) == (
        lib.UDP_BUFFER_INCREASE,
        lib.UDP_BUFFER_DECREASE,
        lib.UDP_BUFFER_MEM_PRESSURE,
        lib.UDP_BUFFER_MEM_EXHAUSTION,
    )
    assert (ub.OBS_RCVBUF_FULL, ub.OBS_MEM_LIMIT) == (lib.UDP_BUFFER_OBS_RCVBUF_FULL, lib.UDP_BUFFER_OBS_MEM_LIMIT)
    assert (ub.SRC_FAIL_QUEUE, ub.SRC_RCVQUEUE_FULL, ub.SRC_EXCEED_BUF) == (
        lib.UDP_BUFFER_SRC_FAIL_QUEUE,
        lib.UDP_BUFFER_SRC_RCVQUEUE_FULL,
        lib.UDP_BUFFER_SRC_EXCEED_BUF,
    )
    assert [t.id for t in UdpBufferTuner.tunables] == [0, 1, 2]


def test_observation_round_trips_through_the_event_layout() -> None:
    obs = mem_limit(123, (1, 2, 3))
    assert UdpObservation.from_event(obs.event(5, 77)) == obs


def test_default_sized_socket_overflowing_grows_rmem_default_and_keeps_max_above(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tuner, backend = make_tuner()
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        tuner.handle_event(rcvbuf_full(16 * KIB).event(3))
    assert values(backend, "net.core.rmem_default") == (20480,)
    assert values(backend, "net.core.rmem_max") == (20480,)
    text = caplog.text
    assert (
        "Due to receive queue overflow of a socket using the default buffer size (16384 bytes) "
        "change net.core.rmem_default from (16384) -> (20480)" in text
    )
    assert "drops 100 drop rate 100.0 per mille" in text


def test_rmem_max_already_above_the_new_default_is_left_alone() -> None:
    tuner, backend = make_tuner(rmem_max=1 << 20)
    tuner.handle_event(rcvbuf_full(16 * KIB).event(3))
    assert values(backend, "net.core.rmem_default") == (20480,)
    assert values(backend, "net.core.rmem_max") == (1 << 20,)


def test_socket_created_before_the_last_increase_does_not_push_further() -> None:
    tuner, backend = make_tuner(rmem_max=64 * KIB, rmem_default=64 * KIB)
    assert tuner.decide(rcvbuf_full(16 * KIB).event(3)).proposals == ()
    assert backend.writes == []


def test_locked_socket_capped_by_rmem_max_grows_only_rmem_max() -> None:
    tuner, _backend = make_tuner()
    props = tuner.decide(rcvbuf_full(32 * KIB, locked=True).event(3))
    assert [(p.tunable, p.scenario, p.new) for p in props] == [(ub.RMEM_MAX, ub.INCREASE, (20480,))]


def test_locked_socket_below_the_cap_changes_nothing() -> None:
    """It chose its size: neither a larger rmem_max nor rmem_default helps it."""
    tuner, _ = make_tuner()
    assert tuner.decide(rcvbuf_full(8 * KIB, locked=True).event(3)).proposals == ()


def test_values_stay_below_256_mib(caplog: pytest.LogCaptureFixture) -> None:
    big = 250 * 1024 * 1024
    tuner, backend = make_tuner(rmem_max=big, rmem_default=big)
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        for _ in range(3):
            tuner.handle_event(rcvbuf_full(big).event(3))
    assert backend.writes == []
    assert caplog.text.count("not increasing it further") == 1


def test_pressure_grows_udp_mem_within_memory_caps() -> None:
    tuner, backend = make_tuner(udp_mem=(20000, 40000, 80000))
    tuner.handle_event(mem_limit(39000, (20000, 40000, 80000)).event(3))
    assert values(backend, "net.ipv4.udp_mem") == (25000, 50000, 100000)
    counts = tuner.ctx.store.scenario_counts(tuner, ub.UDP_MEM)
    assert sum(n for (scenario, _g), n in counts.items() if scenario == ub.MEM_PRESSURE) == 1


def test_exhaustion_keeps_values_that_do_not_grow() -> None:
    """UPSTREAM BUG: bpftune sent udp_mem[0]/[1] as 0 when they were already
    above their caps, and the handler wrote the zeros."""
    mem = (150000, 300000, 320000)  # [0] and [1] above F/16 and F/8
    tuner, _backend = make_tuner(udp_mem=mem)
    props = tuner.decide(mem_limit(320000, mem).event(3))
    assert [(p.tunable, p.scenario, p.new) for p in props] == [
        (ub.UDP_MEM, ub.MEM_EXHAUSTION, (150000, 300000, 400000))
    ]


def test_exhaustion_at_the_cap_gives_back_receive_buffer_growth() -> None:
    """UPSTREAM BUGs: the shrink branch was dead code, and it labelled the
    rmem_default decrease with the rmem_max id."""
    mem = (100000, 200000, 400000)  # all at their caps
    tuner, backend = make_tuner(rmem_max=16 * KIB, rmem_default=16 * KIB, udp_mem=mem)
    backend.write("net.core.rmem_max", (64 * KIB,))  # grown since start
    backend.write("net.core.rmem_default", (48 * KIB,))
    props = tuner.decide(mem_limit(400000, mem).event(3))
    assert [(p.tunable, p.scenario, p.new) for p in props] == [
        (ub.RMEM_MAX, ub.DECREASE, (48 * KIB,)),
        (ub.RMEM_DEFAULT, ub.DECREASE, (36 * KIB,)),
    ]
    for p in props:
        tuner.apply(p)
    assert values(backend, "net.core.rmem_max") == (48 * KIB,)
    assert values(backend, "net.core.rmem_default") == (36 * KIB,)


def test_shrinking_stops_at_the_original_values() -> None:
    mem = (100000, 200000, 400000)
    tuner, _backend = make_tuner(rmem_max=16 * KIB, rmem_default=16 * KIB, udp_mem=mem)
    assert tuner.decide(mem_limit(400000, mem).event(3)).proposals == ()


def test_pressure_at_the_cap_does_nothing() -> None:
    mem = (100000, 200000, 400000)
    tuner, _ = make_tuner(udp_mem=mem)
    assert tuner.decide(mem_limit(200000, mem).event(3)).proposals == ()


def test_udp_mem_beyond_what_memory_can_back_comes_down_to_a_quarter() -> None:
    """As tcp_mem: a udp_mem max above F/4 is not kept once the tuner acts."""
    mem = (20000, 40000, 2_000_000_000)
    tuner, backend = make_tuner(udp_mem=mem)
    tuner.handle_event(mem_limit(39000, mem).event(3))
    assert values(backend, "net.ipv4.udp_mem") == (25000, 50000, FREE // 4)
    assert ub.grow_udp_mem((10**9, 10**9, 10**9), FREE, Steps(4).grow) == (FREE // 4,) * 3


def test_without_usable_zones_udp_mem_is_capped_from_memtotal() -> None:
    tuner, backend = make_tuner(udp_mem=(20000, 40000, 380000))
    tuner.free_pages = 0
    assert tuner.free_pages == FREE  # MemTotal: what the zones would have said here
    tuner.handle_event(mem_limit(39000, (20000, 40000, 380000)).event(3))
    assert values(backend, "net.ipv4.udp_mem") == (25000, 50000, FREE // 4)


def test_refusal_just_above_udp_mem_min_is_pressure() -> None:
    """UDP has no memory-pressure state: above udp_mem[0] the kernel refuses
    every socket holding more than udp_rmem_min (5.10 drops at 21 pages with
    udp_mem 20 45 50).  bpftune waited for udp_mem[1] and never grew it."""
    tuner, _ = make_tuner(udp_mem=(20, 45, 50))
    props = tuner.decide(mem_limit(21, (20, 45, 50)).event(3))
    assert [(p.tunable, p.scenario, p.new) for p in props] == [(ub.UDP_MEM, ub.MEM_PRESSURE, (25, 56, 62))]


def test_refusal_below_udp_mem_min_is_not_udp_mem() -> None:
    """A memory cgroup's limit refuses too; a larger udp_mem cannot help."""
    tuner, _ = make_tuner(udp_mem=(20000, 40000, 80000))
    assert tuner.decide(mem_limit(19000, (20000, 40000, 80000)).event(3)).proposals == ()


def test_memory_well_below_pressure_is_ignored() -> None:
    tuner, _ = make_tuner()
    assert tuner.decide(mem_limit(100, (20000, 40000, 80000)).event(3)).proposals == ()


def test_unknown_memory_size_grows_nothing() -> None:
    assert ub.grow_udp_mem((1, 2, 3), 0, Steps(4).grow) == (1, 2, 3)


def test_drop_rate_without_traffic_is_zero() -> None:
    """UPSTREAM BUG: bpftune divides by InDatagrams, which may be 0."""
    assert ub.udp_drop_rate({}) == (0, 0, 0.0)
    assert ub.udp_drop_rate({"Udp.InDatagrams": 0, "Udp.RcvbufErrors": 0}) == (0, 0, 0.0)
    assert ub.udp_drop_rate({"Udp6InDatagrams": 0, "Udp6RcvbufErrors": 7}, v6=True) == (0, 7, 1000.0)


def test_drop_rate_log_survives_a_namespace_without_counters() -> None:
    tuner, backend = make_tuner()
    tuner.counters = lambda cookie: None
    tuner.handle_event(rcvbuf_full(16 * KIB).event(3))
    assert values(backend, "net.core.rmem_default") == (20480,)


ZONEINFO = """Node 0, zone      DMA
  pages free     3840
        min      10
        high     16
        managed  3840
Node 0, zone    DMA32
  pages free     400000
        high     1000
        managed  500000
Node 0, zone   Normal
  pages free     5000000
        min      10000
        high     20000
        managed  6000000
      nr_free_pages 5000000
Node 1, zone   Normal
  pages free     5000000
        high     20000
        managed  1000000
"""


def test_free_buffer_pages_sum_normal_zones() -> None:
    assert ub.nr_free_buffer_pages(ZONEINFO) == (6000000 - 20000) + (1000000 - 20000)


def test_free_buffer_pages_fall_back_to_dma32() -> None:
    no_normal = ZONEINFO.split("Node 0, zone   Normal")[0]
    assert ub.nr_free_buffer_pages(no_normal) == 500000 - 1000
