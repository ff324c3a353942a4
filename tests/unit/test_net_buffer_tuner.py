"""net_buffer rules, driven by synthetic observations over in-memory sysctls."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from pybpftune.bindings import NetBufferObs, NetBufferObservation, NetBufferTunable
from pybpftune.corr import CORR_MIN_SAMPLES
from pybpftune.events import Event
from pybpftune.hostmem import HostMemory
from pybpftune.sysctl import MemorySysctl
from pybpftune.testing import SyntheticClock, TunerHarness
from pybpftune.tuners import net_buffer as nb
from pybpftune.tuners.net_buffer import NetBufferTuner, SchedWait

BACKLOG, BITMAP, BUDGET, USECS, HIGH_ORDER = (
    "net.core.netdev_max_backlog",
    "net.core.flow_limit_cpu_bitmap",
    "net.core.netdev_budget",
    "net.core.netdev_budget_usecs",
    "net.core.high_order_alloc_disable",
)
TUNER_ID = 4


class Waits:
    """Scheduler wait percentages handed out one per sample."""

    def __init__(self, values: list[float | None]) -> None:
        self.values = values

    def sample(self) -> float | None:
        return self.values.pop(0) if self.values else None


def make_tuner(
    backlog: int = 1000,
    budget: int = 300,
    usecs: int = 8000,
    high_order: int = 0,
    bitmap: str = "0",
    waits: list[float | None] | None = None,
    read_softnet: Callable[[], str | None] | None = None,
    kernel_release: str = "6.1.0",
) -> tuple[NetBufferTuner, MemorySysctl, SyntheticClock]:
    h = TunerHarness.build(
        NetBufferTuner,
        sysctls={BACKLOG: (backlog,), BUDGET: (budget,), USECS: (usecs,), HIGH_ORDER: (high_order,)},
        texts={BITMAP: bitmap},
        tuner_id=TUNER_ID,
        sched_wait=Waits(waits or []),
        read_softnet=read_softnet,
        kernel_release=kernel_release,
    )
    return h.tuner, h.sysctls, h.clock


def drops(n: int, cpu: int = 1, backlog: int = 1000) -> Event:
    obs = NetBufferObs(cpu=cpu, drops=n, window_ns=5_000_000_000, max_backlog=backlog)
    return Event.build(TUNER_ID, NetBufferObservation.OBS_BACKLOG_DROPS, raw=obs.pack())


def squeeze(cpu: int = 0, new: int = 12, old: int = 10) -> Event:
    obs = NetBufferObs(cpu=cpu, time_squeeze=new, prev_time_squeeze=old)
    return Event.build(TUNER_ID, NetBufferObservation.OBS_TIME_SQUEEZE, raw=obs.pack())


def test_a_32nd_of_the_backlog_dropped_grows_it_and_sets_the_cpu_bit(caplog: pytest.LogCaptureFixture) -> None:
    tuner, backend, _ = make_tuner(backlog=1000)
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        tuner.handle_event(drops(30, cpu=1))
        assert backend.writes == []  # 30 < 1000/32
        tuner.handle_event(drops(32, cpu=1))
    assert backend.read(BACKLOG) == (1250,)
    assert backend.read_text(BITMAP) == "2"
    assert (
        "Due to 32 packet(s) dropped from full per-cpu backlog queues change net.core.netdev_max_backlog "
        "from (1000) -> (1250)" in caplog.text
    )
    assert "Due to backlog drops on cpu 1 change net.core.flow_limit_cpu_bitmap from (0) -> (2)" in caplog.text


def test_bits_accumulate_in_the_kernel_cpumask_format() -> None:
    tuner, backend, _ = make_tuner(bitmap="00000000,00000001")
    tuner.handle_event(drops(100, cpu=33))
    assert backend.read_text(BITMAP) == "2,00000001"
    tuner.handle_event(drops(2000, cpu=33, backlog=1250))
    assert backend.text_writes[-1][2] == "2,00000001"  # bit already set: not rewritten


def test_a_garbled_cpu_number_sets_no_bit() -> None:
    """Found by the bounds property test: cpu 2**32 - 1 built a 4-billion-bit
    mask and formatted it word by word (minutes of CPU)."""
    tuner, backend, _ = make_tuner()
    tuner.handle_event(drops(100, cpu=2**32 - 1))
    assert backend.read(BACKLOG) == (1250,)
    assert backend.text_writes == []


def test_tiny_backlog_grows_on_a_single_drop() -> None:
    tuner, backend, _ = make_tuner(backlog=8)
    tuner.handle_event(drops(1, backlog=8))
    assert backend.read(BACKLOG) == (10,)


def test_backlog_growth_stops_at_its_memory_cap(caplog: pytest.LogCaptureFixture) -> None:
    """1 GiB and 2 cpus: every cpu's backlog full of 2 KiB packets within
    1/16 of memory is 16384 packets per cpu, not INT_MAX."""
    tuner, backend, _ = make_tuner(backlog=16000)
    tuner.memory = HostMemory(1 << 30, 0, 4096, cpus=2)
    assert tuner.ceiling(NetBufferTunable.MAX_BACKLOG) == 16384
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        tuner.handle_event(drops(1000, backlog=16000))
        assert backend.read(BACKLOG) == (16384,)
        for _ in range(3):
            tuner.handle_event(drops(1000, backlog=16384))
    assert backend.read(BACKLOG) == (16384,)
    assert caplog.text.count("its memory cap 16384") == 1
    # More cpus, smaller queues; never below the kernel's default.
    assert nb.backlog_cap(HostMemory(1 << 30, cpus=8)) == 4096
    assert nb.backlog_cap(HostMemory(64 << 20, cpus=64)) == nb.BACKLOG_DEFAULT


def test_drops_counted_against_an_older_setting_are_ignored() -> None:
    tuner, _backend, _ = make_tuner(backlog=1250)
    assert tuner.decide(drops(500, backlog=1000)).proposals == ()


def test_time_squeeze_grows_budget_and_usecs_once_a_second(caplog: pytest.LogCaptureFixture) -> None:
    tuner, backend, clock = make_tuner(budget=300, usecs=8000)
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        tuner.handle_event(squeeze())
        tuner.handle_event(squeeze())  # within the hold-off
    assert backend.read(BUDGET) == (375,)
    assert backend.read(USECS) == (10000,)
    assert (
        "Due to 2 time squeeze(s) on cpu 0 (softirq ran out of budget with work left) change "
        "net.core.netdev_budget from (300) -> (375)" in caplog.text
    )
    clock.advance(1.5)
    tuner.handle_event(squeeze())
    assert backend.read(BUDGET) == (468,)


def test_budget_usecs_stops_at_50ms(caplog: pytest.LogCaptureFixture) -> None:
    tuner, backend, _ = make_tuner(budget=300, usecs=45000)
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        tuner.handle_event(squeeze())
    assert backend.writes == []
    assert "netdev_budget_usecs would exceed 50000 us" in caplog.text


def test_budget_increases_that_go_with_scheduler_wait_are_backed_off(caplog: pytest.LogCaptureFixture) -> None:
    tuner, backend, clock = make_tuner(budget=300, usecs=2000, waits=[None] + [float(5 * i) for i in range(1, 12)])
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        for _ in range(CORR_MIN_SAMPLES + 1):
            tuner.handle_event(squeeze())
            clock.advance(2)
    assert "Scenario 'need to decrease # of packets processed per NAPI poll'" in caplog.text
    assert "Due to scheduler wait rising with the budget (correlation 0.9" in caplog.text
    assert "would exceed" not in caplog.text
    written = [values[0] for _cookie, name, values in backend.writes if name == BUDGET]
    assert written[-1] < max(written)
    assert backend.read(BUDGET)[0] >= 300


def test_backing_off_never_goes_below_the_original_budget() -> None:
    tuner, backend, _ = make_tuner(budget=300, usecs=8000, waits=[10.0])
    tuner._budget_samples.extend((30.0 * i, float(i)) for i in range(CORR_MIN_SAMPLES))
    props = tuner.decide(squeeze())
    assert props.proposals == ()  # shrink would go below 300 / 8000: nothing to do
    assert backend.writes == []


def test_high_order_allocations_re_enabled_from_5_14() -> None:
    old, backend, _ = make_tuner(high_order=1, kernel_release="5.10.0-32-amd64")
    assert not old.enable_high_order_alloc()
    tuner, backend, _ = make_tuner(high_order=1, kernel_release="6.1.0-56-amd64")
    assert tuner.enable_high_order_alloc()
    assert backend.read(HIGH_ORDER) == (0,)
    assert not tuner.enable_high_order_alloc()


SOFTNET_1 = (
    "00000010 00000000 00000001 0 0 0 0 0 0 0 0 0 00000000\n00000020 00000005 00000000 0 0 0 0 0 0 0 0 0 00000001\n"
)
SOFTNET_2 = (
    "00000090 00000000 00000004 0 0 0 0 0 0 0 0 0 00000000\n000000a0 0000002a 00000000 0 0 0 0 0 0 0 0 0 00000001\n"
)


def test_procfs_fallback_sees_drops_and_squeezes() -> None:
    texts = [SOFTNET_1, SOFTNET_2]
    tuner, backend, _ = make_tuner(backlog=32, budget=10, usecs=8000, read_softnet=lambda: texts.pop(0))
    tuner.poll_backlog = tuner.poll_squeeze = True
    tuner.tick(1.0)
    assert backend.writes == []  # first reading: a baseline
    tuner.tick(2.0)
    assert backend.read(BACKLOG) == (40,)  # 0x2a - 5 = 37 drops on cpu 1
    assert backend.read_text(BITMAP) == "2"
    assert backend.read(BUDGET) == (12,)  # cpu 0 squeezed 3 more times


def test_parsers() -> None:
    assert nb.parse_cpumask("0") == 0
    assert nb.parse_cpumask("00000001,00000003\n") == (1 << 32) | 3
    assert nb.format_cpumask(0) == "0"
    assert nb.format_cpumask(5) == "5"
    assert nb.format_cpumask((1 << 32) | 3) == "1,00000003"
    assert nb.parse_softnet_stat(SOFTNET_1) == [(16, 0, 1), (32, 5, 0)]
    assert nb.parse_schedstat("version 15\ntimestamp 1\ncpu0 0 0 0 0 0 0 100 50 3\ncpu1 0 0 0 0 0 0 300 10 3\n") == (
        400,
        60,
    )
    assert nb.parse_schedstat("version 15\n") is None
    assert nb.parse_psi_some_total("some avg10=1.00 avg60=0 avg300=0 total=1234\nfull avg10=0 total=0\n") == 1234
    assert nb.kernel_at_least("6.18.44-fc-v657", 5, 14)
    assert not nb.kernel_at_least("5.10.0-32-amd64", 5, 14)
    assert nb.kernel_at_least("5.14", 5, 14)


def test_sched_wait_from_schedstat_then_psi() -> None:
    files = {"/proc/schedstat": "cpu0 0 0 0 0 0 0 1000 100 1\n"}
    wait = SchedWait(read=files.get, clock=lambda: 0.0)
    assert wait.sample() is None
    files["/proc/schedstat"] = "cpu0 0 0 0 0 0 0 3000 500 1\n"
    assert wait.sample() == pytest.approx(20.0)  # 400 ns waiting per 2000 ns running

    now = [10.0]
    psi = {"/proc/pressure/cpu": "some avg10=0 avg60=0 avg300=0 total=1000000\n"}
    wait = SchedWait(read=psi.get, clock=lambda: now[0])
    assert wait.sample() is None
    now[0] += 2.0
    psi["/proc/pressure/cpu"] = "some avg10=0 avg60=0 avg300=0 total=1500000\n"
    assert wait.sample() == pytest.approx(25.0)  # 0.5 s of stall in 2 s
    assert SchedWait(read=lambda path: None).sample() is None
