"""tcp_buffer rules, driven by synthetic events over in-memory sysctls."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random

import pytest

from pybpftune import procnet
from pybpftune.bindings import (
    TCP_BUFFER_NUM_TUNABLES,
    BpftunableUpdate,
    CorrKey,
    TcpBufferConn,
    TcpBufferEvent,
    TcpBufferHold,
    TcpBufferHoldKey,
)
from pybpftune.bindings import TcpBufferConnFlag as Flag
from pybpftune.bindings import TcpBufferScenario as Scenario
from pybpftune.bindings import TcpBufferTunable as Tunable
from pybpftune.corr import CorrSums, corr_key, corr_value, read_corr
from pybpftune.declarations import MapUpdate
from pybpftune.events import Event
from pybpftune.hostmem import HostMemory, parse_zone_pages
from pybpftune.sysctl import MemorySysctl
from pybpftune.testing import SyntheticClock, SyntheticNamespaces, SyntheticObject, TunerHarness
from pybpftune.tuner import INT_MAX, Proposal, Steps
from pybpftune.tuners import tcp_buffer as tb
from pybpftune.tuners.tcp_buffer import Conn, TcpBufferTuner
from pybpftune.tuners.tcp_buffer.conn import STRUCT_FIELDS
from pybpftune.tuners.tcp_buffer.holds import HOLD_MAP

TUNER_ID = 2
NS = 4242  # a non-global namespace cookie
F = 1_000_000  # free buffer pages: tcp_mem caps 62500 / 125000 / 250000
MB = 1 << 20

DEFAULTS: dict[str, tuple[int, ...]] = {
    "net.ipv4.tcp_wmem": (4096, 65536, 131072),
    "net.ipv4.tcp_rmem": (4096, 65536, 131072),
    "net.ipv4.tcp_mem": (40000, 60000, 90000),
    "net.ipv4.tcp_moderate_rcvbuf": (0,),
    "net.ipv4.tcp_no_metrics_save": (0,),
    "net.ipv4.tcp_no_ssthresh_metrics_save": (0,),
    "net.core.high_order_alloc_disable": (0,),
    "net.ipv4.tcp_syncookies": (1,),
    "net.ipv4.tcp_max_syn_backlog": (1024,),
    "net.ipv4.tcp_max_orphans": (65536,),
}


# F buffer-usable pages of 4 KiB, MemTotal as much.
HOST = HostMemory(F * 4096, F, 4096, 4)
Clock = SyntheticClock


def tcp_buffer_object() -> SyntheticObject:
    """The object's memory flags (clear) and hold-off map, and the shared correlation map."""
    return SyntheticObject(
        globals={"near_memory_pressure": 0, "near_memory_exhaustion": 0},
        maps={HOLD_MAP: (TcpBufferHoldKey, TcpBufferHold)},
        name=TcpBufferTuner.bpf_name or "",
    )


def make_tuner(
    rate: int = 4, values: dict[str, tuple[int, ...]] | None = None
) -> tuple[TcpBufferTuner, MemorySysctl, SyntheticClock]:
    h = TunerHarness.build(
        TcpBufferTuner,
        {**DEFAULTS, **(values or {})},
        tuner_id=TUNER_ID,
        rate=rate,
        memory=HOST,
        bpf=tcp_buffer_object(),
    )
    return h.tuner, h.sysctls, h.clock


def namespaces(tuner: TcpBufferTuner) -> SyntheticNamespaces:
    ns = tuner.ctx.namespaces
    assert isinstance(ns, SyntheticNamespaces)
    return ns


def bpf(tuner: TcpBufferTuner) -> SyntheticObject:
    assert isinstance(tuner.loaded, SyntheticObject)
    return tuner.loaded


def memory_short(tuner: TcpBufferTuner, *, pressure: bool = True, exhaustion: bool = False) -> None:
    """The BPF side's flags: TCP memory near tcp_mem[1] / tcp_mem[2]."""
    bpf(tuner).set_global("near_memory_pressure", int(pressure))
    bpf(tuner).set_global("near_memory_exhaustion", int(exhaustion))


def correlate(tuner: TcpBufferTuner, tunable: int, sums: CorrSums, cookie: int = NS) -> None:
    """The sums the BPF side keeps in bpftune_corr for a tunable in a namespace."""
    corr = bpf(tuner).map("bpftune_corr", CorrKey, CorrSums)
    corr[CorrKey(tuner_id=TUNER_ID, id=tunable, netns_cookie=cookie)] = sums


def set_allocated(tuner: TcpBufferTuner, pages: int | None) -> None:
    """TCP's allocated pages as /proc/net/sockstat gives them (None: unreadable)."""
    ns = namespaces(tuner)
    counters = ns.counter_values.setdefault(ns.global_cookie, {})
    if pages is None:
        counters.pop("TCP.mem", None)
    else:
        counters["TCP.mem"] = pages


def conn_event(
    tunable: int,
    conn: Conn,
    old: tuple[int, ...],
    cookie: int = NS,
    scenario: int = Scenario.INCREASE,
) -> Event:
    """The event the BPF side sends for a pressing connection."""
    update = BpftunableUpdate(id=tunable, old=tuple(old[:3]), new=(old[0], old[1], old[2] + (old[2] >> 2)))
    payload = TcpBufferConn(**{name: getattr(conn, name) for name in STRUCT_FIELDS})
    return Event.build(TUNER_ID, scenario, cookie, raw=TcpBufferEvent(update, payload).pack())


def update_event(tunable: int, scenario: int, old: tuple[int, int, int], cookie: int = NS) -> Event:
    from pybpftune.events import Update

    return Event.build(TUNER_ID, scenario, cookie, updates=[Update(tunable, old, old)])


def receiver(
    limit: int,
    *,
    rtt_us: int = 50_000,
    min_rtt_us: int = 50_000,
    wscale_cap: int = 1 << 30,
    rate: float | None = None,
    first: bool = False,
) -> Conn:
    """A receiver whose buffer sits at ``limit`` (window = half the buffer,
    as with tcp_adv_win_scale 1) reading its whole usable window per RTT,
    or ``rate`` bytes/s when given; its goodput measured across samples,
    unless ``first`` (its first samples: no goodput measured yet)."""
    window = limit // 2
    usable = min(window, wscale_cap)
    delivered = usable if rate is None else int(rate * rtt_us / 1e6)
    flags = Flag.F_RCV | Flag.F_LIMIT
    if window > wscale_cap:
        flags |= Flag.F_WSCALE
    measured = 0.0 if first else delivered * 1e6 / rtt_us
    return Conn(
        flags, rtt_us, min_rtt_us, 1448, limit, 0, window, wscale_cap, delivered, rtt_us, measured_rate=measured
    )


def sender(limit: int, *, rtt_us: int = 50_000, min_rtt_us: int = 50_000, inflight: int | None = None) -> Conn:
    """A sender limited by a send buffer at ``limit``: its whole buffer in flight."""
    flight = limit * 9 // 10 if inflight is None else inflight
    segs = flight // 1448
    return Conn(Flag.F_SND | Flag.F_LIMIT, rtt_us, min_rtt_us, 1448, limit, limit, flight, 4 * MB, segs, rtt_us, segs)


# --- declarations ---------------------------------------------------------------------------


def test_every_id_of_the_header_is_declared() -> None:
    assert [t.id for t in TcpBufferTuner.tunables] == list(range(TCP_BUFFER_NUM_TUNABLES))
    assert [s.id for s in TcpBufferTuner.scenarios] == sorted(Scenario)


def test_namespaced_tunables_follow_the_kernel() -> None:
    by_name = {t.name: t for t in TcpBufferTuner.tunables}
    for name in ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem", "net.ipv4.tcp_syncookies", "net.ipv4.tcp_max_syn_backlog"):
        assert by_name[name].namespaced
    for name in ("net.ipv4.tcp_mem", "net.core.high_order_alloc_disable", "net.ipv4.tcp_max_orphans"):
        assert not by_name[name].namespaced
    assert all(t.upper == INT_MAX for t in TcpBufferTuner.tunables)


def test_syncookies_is_a_readable_sysctl() -> None:
    """Upstream OR-ed OPTIONAL into the type field: tcp_syncookies was never
    read (current value always 0) and the rule disabling it never fired."""
    tuner, _backend, _clock = make_tuner(values={"net.ipv4.tcp_syncookies": (1,)})
    t = tuner.tunable(Tunable.TCP_SYNCOOKIES)
    assert t.kind == "sysctl" and t.is_sysctl and t.optional
    assert tuner.ctx.store.original(tuner, Tunable.TCP_SYNCOOKIES) == (1,)


def test_conn_payload_round_trips_through_the_event() -> None:
    conn = receiver(131072, wscale_cap=262140, first=True)  # the event carries no measured goodput
    event = conn_event(Tunable.TCP_RMEM, conn, (4096, 65536, 131072))
    assert Conn.from_event(event) == conn
    assert event.update(0).old == (4096, 65536, 131072)


# --- the need of a connection ---------------------------------------------------------------


def test_window_limited_receiver_without_a_queue_is_probed_by_the_largest_step() -> None:
    conn = receiver(131072)
    assert conn.window_limited() and not conn.queueing()
    # window 65536, x4 at learning rate 4, buffer/window 2.
    assert conn.need(Steps(4)) == 4 * 65536 * 2
    assert conn.need(Steps(2)) == int(1.75 * 65536 * 2)


def test_a_receiver_pressing_its_first_limit_gets_room_up_to_its_window_scale_cap() -> None:
    """The first connection of the efficacy scenario: 131072 limit, window
    scale 2 (cap 262140), in slow start: its rate (4.3 Mbit/s averaged over
    the ramp) says nothing yet, so it gets room for its cap, in one step."""
    slow_start = receiver(131072, wscale_cap=262140, rate=4.3e6 / 8, first=True)
    assert not slow_start.window_limited() and not slow_start.queueing()
    assert slow_start.need(Steps(4), first_limit=True) == 262140 * 2
    assert tb.grow_max(131072, slow_start.need(Steps(4), first_limit=True), Steps(4)) == 262140 * 2  # one step
    # Once the tuner has grown the limit, a new connection's scale follows it: need-based again.
    assert slow_start.need(Steps(4)) == slow_start.full_need() < 262140
    # Once goodput is measured, the need is need-based again (here: app-limited).
    later = receiver(131072, wscale_cap=262140, rate=4.3e6 / 8)
    assert later.need(Steps(4)) == later.full_need() < 262140
    # Not with a queue, not at the cap already, not for senders.
    queued = receiver(131072, wscale_cap=262140, rtt_us=80_000, rate=1e6, first=True)
    assert queued.queueing() and queued.need(Steps(4), first_limit=True) == queued.full_need() < 262140
    assert receiver(1048576, wscale_cap=262140, first=True).first_press_need() == 0
    assert sender(131072).first_press_need() == 0


def test_queueing_receiver_wants_twice_its_bdp() -> None:
    # 200 Mbit/s with 80 ms RTT over a 50 ms path: a queue is forming.
    conn = receiver(8 * MB, rtt_us=80_000, min_rtt_us=50_000, rate=25e6)
    assert conn.queueing()
    bdp = 25e6 * 0.050
    assert conn.need(Steps(4)) == int(2 * bdp * 2)


def test_app_limited_receiver_asks_only_for_its_bdp() -> None:
    # The reader takes 1 MB/s while its 512 KiB window would allow 10 MB/s.
    conn = receiver(MB, rate=1e6)
    assert not conn.window_limited()
    assert conn.need(Steps(4)) == int(2 * 1e6 * 0.05 * 2)


def test_a_receiver_reading_part_of_its_window_is_not_window_limited() -> None:
    # 1.25 MB per RTT through a 2 MB window: something else sets the pace.
    conn = receiver(4 * MB, rate=25e6)
    assert not conn.window_limited()
    assert receiver(4 * MB, rate=2 * MB / 0.05).window_limited()


def test_window_limited_uses_goodput_when_measured() -> None:
    """The kernel's bytes-per-RTT figure (rcvq_space.space) only grows; a
    connection whose goodput fell below its window is not window-limited."""
    conn = receiver(4 * MB)
    assert conn.window_limited()
    slowed = dataclasses.replace(conn, measured_rate=10e6)  # 0.5 MB per 50 ms RTT, window 2 MB
    assert not slowed.window_limited()
    assert slowed.need(Steps(4)) == int(2 * 10e6 * 0.05 * 2)


def test_queue_detection_uses_the_smallest_rtt_the_connection_showed() -> None:
    """A receiver's kernel minimum comes from the handshake (57 ms on a slow
    host); its data samples show 51 ms.  64 ms is a queue on this path."""
    tuner, _backend, _clock = make_tuner()
    first = dataclasses.replace(receiver(MB, rtt_us=51_000, min_rtt_us=57_000), conn=77)
    assert tuner.remember(NS, first).min_rtt_us == 51_000
    later = dataclasses.replace(receiver(MB, rtt_us=64_000, min_rtt_us=57_000), conn=77)
    assert not later.queueing()
    assert tuner.remember(NS, later).queueing()
    other = dataclasses.replace(later, conn=78)
    assert tuner.remember(NS, other).min_rtt_us == 57_000, "per connection"


def test_goodput_is_measured_between_samples_of_one_connection() -> None:
    """The kernel's per-RTT estimate (here 90 Mbit/s) is replaced by the
    bytes the connection moved between samples at least two RTTs apart."""
    tuner, _backend, _clock = make_tuner()
    base = dataclasses.replace(receiver(MB, rate=90e6 / 8), conn=9, bytes=10_000_000, ts_ns=1_000_000_000)
    assert tuner.remember(NS, base).measured_rate == 0.0
    too_soon = dataclasses.replace(base, bytes=10_500_000, ts_ns=1_050_000_000)
    assert tuner.remember(NS, too_soon).measured_rate == 0.0
    later = dataclasses.replace(base, bytes=12_500_000, ts_ns=1_200_000_000)
    measured = tuner.remember(NS, later)
    assert measured.measured_rate == pytest.approx(12.5e6)
    assert measured.rate() == pytest.approx(12.5e6)
    # A sample more than 5 s after the anchor starts over.
    stale = dataclasses.replace(base, bytes=99_000_000, ts_ns=9_000_000_000)
    assert tuner.remember(NS, stale).measured_rate == 0.0


def test_scheduling_noise_on_a_tiny_rtt_is_not_a_queue() -> None:
    conn = receiver(131072, rtt_us=60, min_rtt_us=10)
    assert not conn.queueing()


def test_sender_need_counts_unsent_data_and_truesize() -> None:
    conn = sender(131072, inflight=100_000)
    per_window = 2 * 131072 / 100_000
    assert conn.buffer_per_window() == pytest.approx(per_window)
    assert conn.need(Steps(4)) == int(4 * 100_000 * per_window)


def test_a_sender_with_data_waiting_is_not_sndbuf_limited() -> None:
    """Half its buffer written but unsent: the congestion window, not the
    buffer, holds it back; it asks only for twice its BDP."""
    conn = dataclasses.replace(sender(2 * MB, inflight=MB), unsent=MB)
    assert not conn.window_limited()
    assert conn.buffer_per_window() == pytest.approx(2 * 2 * MB / (2 * MB))
    assert conn.need(Steps(4)) == int(2 * conn.bdp() * 2)


def test_a_sender_in_slow_start_asks_for_room_for_its_congestion_window() -> None:
    """cwnd-limited on an empty path: buffer for the window and as much
    unsent again; once a queue forms the inflated window counts for nothing."""
    conn = dataclasses.replace(sender(2 * MB, inflight=MB), unsent=MB, cwnd=2000)
    per_window = conn.buffer_per_window()
    assert conn.need(Steps(4)) == int(2000 * 1448 * per_window) > conn.full_need()
    queued = dataclasses.replace(conn, rtt_us=90_000)
    assert queued.queueing()
    assert queued.need(Steps(4)) == queued.full_need()


# --- step bounds ------------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "factor"), [(0, 1.1875), (1, 1.375), (2, 1.75), (3, 2.5), (4, 4.0)])
def test_the_learning_rate_bounds_each_step(rate: int, factor: float) -> None:
    steps = Steps(rate)
    assert tb.max_step_factor(steps) == factor
    assert tb.grow_max(1 << 20, 1 << 30, steps) == int((1 << 20) * factor)


def test_a_need_within_one_reference_step_changes_nothing() -> None:
    steps = Steps(4)
    assert tb.grow_max(100_000, 124_999, steps) is None
    assert tb.grow_max(100_000, 125_000, steps) == 125_000
    assert tb.grow_max(100_000, 300_000, steps) == 300_000
    assert tb.grow_max(100_000, 90_000, steps) is None


def test_never_above_int_max_or_the_memory_cap() -> None:
    steps = Steps(4)
    assert tb.grow_max(INT_MAX - 10, INT_MAX * 4, steps) == INT_MAX
    assert tb.grow_max(INT_MAX, INT_MAX * 4, steps) is None
    cap = tb.buffer_cap((100, 200, 8000), page_size=4096)
    assert cap == 8000 * 4096 // 8
    assert tb.grow_max(2 * MB, 100 * MB, steps, cap) == cap
    assert tb.grow_max(cap, 100 * MB, steps, cap) is None


# --- buffer growth through the tuner -----------------------------------------------------------


def test_starved_receiver_raises_tcp_rmem_and_enables_moderate_rcvbuf(caplog: pytest.LogCaptureFixture) -> None:
    tuner, backend, _clock = make_tuner()
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        tuner.handle_event(conn_event(Tunable.TCP_RMEM, receiver(131072), (4096, 65536, 131072)))
    assert backend.read("net.ipv4.tcp_rmem", NS) == (4096, 65536, 524288)
    assert backend.read("net.ipv4.tcp_moderate_rcvbuf", NS) == (1,)
    assert backend.read("net.ipv4.tcp_rmem") == (4096, 65536, 131072), "global namespace untouched"
    text = caplog.text
    assert (
        "Scenario 'need to increase TCP buffer size(s)' occurred for tunable 'net.ipv4.tcp_rmem' in non-global ns"
        in text
    )
    assert "Due to need to increase max buffer size to maximize throughput" in text
    assert "change net.ipv4.tcp_rmem(min default max) from (4096 65536 131072) -> (4096 65536 524288)" in text
    assert "change net.ipv4.tcp_moderate_rcvbuf from (0) -> (1)" in text


def test_starved_sender_raises_tcp_wmem() -> None:
    tuner, backend, _clock = make_tuner()
    tuner.handle_event(conn_event(Tunable.TCP_WMEM, sender(131072), (4096, 65536, 131072)))
    assert backend.read("net.ipv4.tcp_wmem", NS) == (4096, 65536, 4 * 131072)
    assert backend.read("net.ipv4.tcp_moderate_rcvbuf", NS) == (0,), "only tcp_rmem changes need it"


def test_changes_are_spaced_by_a_few_rtts_and_stale_events_ignored() -> None:
    tuner, backend, clock = make_tuner()
    tuner.handle_event(conn_event(Tunable.TCP_RMEM, receiver(131072), (4096, 65536, 131072)))
    assert backend.read("net.ipv4.tcp_rmem", NS)[2] == 524288
    # Pressing at the new limit, but within 3 RTTs of the change.
    clock.now += 0.1
    tuner.handle_event(conn_event(Tunable.TCP_RMEM, receiver(524288), (4096, 65536, 524288)))
    assert backend.read("net.ipv4.tcp_rmem", NS)[2] == 524288
    # Queued before the change (old max 131072): stale even after the cooldown.
    clock.now += 1
    tuner.handle_event(conn_event(Tunable.TCP_RMEM, receiver(131072), (4096, 65536, 131072)))
    assert backend.read("net.ipv4.tcp_rmem", NS)[2] == 524288
    tuner.handle_event(conn_event(Tunable.TCP_RMEM, receiver(524288), (4096, 65536, 524288)))
    assert backend.read("net.ipv4.tcp_rmem", NS)[2] == 4 * 524288


def test_only_the_first_growth_in_a_namespace_sizes_for_the_window_scale_cap() -> None:
    """The efficacy scenario's first connection gets room for its cap at its
    first press; a later connection in slow start (whose scale follows the
    grown limit: cap 4 MiB here) is sized by need, not by its cap."""
    tuner, backend, clock = make_tuner()
    first = receiver(131072, wscale_cap=262140, rate=4.3e6 / 8, first=True)
    tuner.handle_event(conn_event(Tunable.TCP_RMEM, first, (4096, 65536, 131072)))
    assert backend.read("net.ipv4.tcp_rmem", NS)[2] == 2 * 262140
    clock.now += 2
    later = receiver(2 * 262140, wscale_cap=4 * MB, rate=4.3e6 / 8, first=True)
    tuner.handle_event(conn_event(Tunable.TCP_RMEM, later, (4096, 65536, 2 * 262140)))
    assert backend.read("net.ipv4.tcp_rmem", NS)[2] == 2 * 262140, "need-based: a slow reader needs no more"


def test_a_window_scale_capped_connection_cannot_run_the_limit_away() -> None:
    """The first connection's window scale is fixed at its handshake: it
    presses forever.  Its evidence justifies one target, not endless steps."""
    tuner, backend, clock = make_tuner()
    cap = 262140  # window scale 2
    for _ in range(50):
        limit = backend.read("net.ipv4.tcp_rmem", NS)[2]
        # The kernel grows the buffer to what the capped flow uses (~2x cap).
        buf = min(limit, 3 * cap)
        conn = Conn(Flag.F_RCV | Flag.F_WSCALE, 50_000, 50_000, 1448, buf, 0, buf // 2, cap, cap, 50_000)
        tuner.handle_event(conn_event(Tunable.TCP_RMEM, conn, (4096, 65536, limit)))
        clock.now += 1
    final = backend.read("net.ipv4.tcp_rmem", NS)[2]
    assert final == 4 * cap * 2, "x4 the capped window, at 2 buffer bytes per window byte"


def simulate_path(
    tuner: TcpBufferTuner,
    backend: MemorySysctl,
    clock: Clock,
    seconds: float,
    *,
    bdp: int = 1_250_000,
    rtt_us: int = 50_000,
    side: str = "rcv",
) -> list[tuple[float, int]]:
    """A 200 Mbit/s, 50 ms path (1.25 MB BDP, 1000-packet queue) with one
    bulk connection whose buffer autotuning follows the limit at once.
    Returns (time, limit) after each RTT."""
    name = "net.ipv4.tcp_rmem" if side == "rcv" else "net.ipv4.tcp_wmem"
    history = []
    t = 0.0
    while t < seconds:
        limit = backend.read(name, NS)[2]
        window = limit // 2  # buffer per window byte: 2 for both sides here
        queue = max(0, window - bdp)
        queue_us = min(queue, 1000 * 1448) * 8 / 200e6 * 1e6
        rtt = int(rtt_us + queue_us)
        rate = min(window / (rtt / 1e6), 25e6)
        if side == "rcv":
            delivered = int(rate * rtt / 1e6)
            conn = Conn(Flag.F_RCV | Flag.F_LIMIT, rtt, rtt_us, 1448, limit, 0, window, 1 << 30, delivered, rtt)
        else:
            segs = int(rate * rtt / 1e6 / 1448)
            conn = Conn(Flag.F_SND | Flag.F_LIMIT, rtt, rtt_us, 1448, limit, limit, window, 1 << 30, segs, rtt, segs)
        tid = Tunable.TCP_RMEM if side == "rcv" else Tunable.TCP_WMEM
        tuner.handle_event(conn_event(tid, conn, backend.read(name, NS)))
        t += rtt / 1e6
        history.append((t, backend.read(name, NS)[2]))
        clock.now += rtt / 1e6
    return history


@pytest.mark.parametrize("side", ["rcv", "snd"])
def test_growth_reaches_the_need_fast_and_stops_near_it(side: str) -> None:
    """From 128 KiB on a 1.25 MB BDP path: past the BDP within 2 s, and
    never beyond 4x what a full pipe needs (the reference ran to 85-145 MB)."""
    tuner, backend, clock = make_tuner()
    history = simulate_path(tuner, backend, clock, 30.0, side=side)
    per_window = 2
    need = 1_250_000 * per_window
    reached = next(t for t, v in history if v >= need)
    assert reached < 2.0
    assert history[-1][1] >= need
    assert max(v for _, v in history) <= 4 * need
    # It settled: nothing changed during the last 20 s.
    assert len({v for t, v in history if t > 10}) == 1


def test_a_sufficient_limit_holds_off_the_connections_events_longer_each_time() -> None:
    """Once the limit covers a connection's need, the BPF side is told to
    stop sending that connection's events for this tunable (while the limit
    stays and it shows no more than one step beyond now), for 0.25 s, then
    0.5, 1, 2 s at most: handling "enough" a dozen times a second cost the
    daemon ~40 % of an emulated CPU.  Another connection is not held."""
    tuner, backend, clock = make_tuner(values={"net.ipv4.tcp_rmem": (4096, 65536, 8 * MB)})
    conn = dataclasses.replace(receiver(8 * MB, rate=25e6, rtt_us=80_000), conn=77)  # needs far less than 8 MB
    held = []
    for _ in range(6):
        tuner.handle_event(conn_event(Tunable.TCP_RMEM, conn, (4096, 65536, 8 * MB)))
        hold = tuner.holds[(NS, Tunable.TCP_RMEM, 77)]
        assert hold.limit == 8 * MB
        assert hold.metric == tuner.steps.grow(conn.delivered)
        held.append(round(hold.until - clock.now, 3))
        clock.now = hold.until
    assert held == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert backend.read("net.ipv4.tcp_rmem", NS)[2] == 8 * MB
    assert tuner.outcomes["enough"] == 6
    assert list(tuner.holds) == [(NS, Tunable.TCP_RMEM, 77)], "only that connection is held"
    other = dataclasses.replace(conn, conn=78)
    tuner.handle_event(conn_event(Tunable.TCP_RMEM, other, (4096, 65536, 8 * MB)))
    assert tuner.holds[(NS, Tunable.TCP_RMEM, 78)].until == pytest.approx(clock.now + 0.25)
    # A connection the BPF side cannot tell apart (no hash) is never held.
    tuner.handle_event(conn_event(Tunable.TCP_RMEM, dataclasses.replace(conn, conn=0), (4096, 65536, 8 * MB)))
    assert (NS, Tunable.TCP_RMEM, 0) not in tuner.holds


def test_growth_holds_the_namespace_through_its_cooldown_and_restarts_the_hold_offs() -> None:
    tuner, backend, clock = make_tuner()
    c = dataclasses.replace(receiver(131072), conn=5)
    tuner.handle_event(conn_event(Tunable.TCP_RMEM, c, (4096, 65536, 131072)))
    assert backend.read("net.ipv4.tcp_rmem", NS)[2] == 524288
    hold = tuner.holds[(NS, Tunable.TCP_RMEM, 0)]
    # Every connection waits for the new limit for 3 RTTs (150 ms here).
    assert (hold.limit, hold.metric) == (524288, 2**64 - 1)
    assert hold.until == pytest.approx(clock.now + 0.15)
    # Sufficient at a larger limit three times in a row: 1 s hold-off.
    big = 8 * MB
    assert tuner.apply(Proposal(Tunable.TCP_RMEM, Scenario.INCREASE, NS, (4096, 65536, big), "test"))
    settled = dataclasses.replace(receiver(big, rate=25e6, rtt_us=80_000), conn=5)
    for _ in range(3):
        clock.now += 5
        tuner.handle_event(conn_event(Tunable.TCP_RMEM, settled, (4096, 65536, big)))
    assert tuner.holds[(NS, Tunable.TCP_RMEM, 5)].until == pytest.approx(clock.now + 1.0)
    # A growth (here after an administrator-free shrink to 512 KiB) restarts it.
    assert tuner.apply(Proposal(Tunable.TCP_RMEM, Scenario.DECREASE, NS, (4096, 65536, big // 16), "test"))
    clock.now += 5
    tuner.handle_event(
        conn_event(Tunable.TCP_RMEM, dataclasses.replace(receiver(big // 16), conn=5), (4096, 65536, big // 16))
    )
    assert backend.read("net.ipv4.tcp_rmem", NS)[2] == big // 4
    clock.now += 5
    slow = dataclasses.replace(receiver(big // 4, rate=5e6, rtt_us=80_000), conn=5)
    tuner.handle_event(conn_event(Tunable.TCP_RMEM, slow, (4096, 65536, big // 4)))
    assert tuner.holds[(NS, Tunable.TCP_RMEM, 5)].until == pytest.approx(clock.now + 0.25)


def test_a_hold_off_is_a_map_update_the_bpf_side_reads() -> None:
    """decide writes no map: the hold comes back as an effect, laid out as
    the shared header's struct tcp_buffer_hold_key / tcp_buffer_hold."""
    tuner, _backend, clock = make_tuner(values={"net.ipv4.tcp_rmem": (4096, 65536, 8 * MB)})
    conn = dataclasses.replace(receiver(8 * MB, rate=25e6, rtt_us=80_000), conn=77)
    decision = tuner.decide(conn_event(Tunable.TCP_RMEM, conn, (4096, 65536, 8 * MB)))
    assert not decision.proposals
    (update,) = decision.effects
    assert isinstance(update, MapUpdate) and update.map == "bpftune_hold" and update.value is not None
    assert TcpBufferHoldKey.unpack(update.key) == TcpBufferHoldKey(netns_cookie=NS, tunable=Tunable.TCP_RMEM, conn=77)
    until_ns = int((clock.now + tb.HOLD_MIN_S) * 1e9)
    assert TcpBufferHold.unpack(update.value) == TcpBufferHold(until_ns, 8 * MB, tuner.steps.grow(conn.delivered))


def test_a_senders_hold_metric_is_its_flight_and_unsent_data() -> None:
    conn = dataclasses.replace(sender(4 * MB, inflight=2 * MB), unsent=300_000)
    assert tb.hold_metric(conn) == 2 * MB + 300_000
    assert tb.hold_metric(receiver(4 * MB, rate=25e6)) == int(25e6 * 0.05)


def test_low_learning_rate_is_gentler() -> None:
    fast, fb, fc = make_tuner(rate=4)
    slow, sb, sc = make_tuner(rate=0)
    hf = [v for _, v in simulate_path(fast, fb, fc, 2.0)]
    hs = [v for _, v in simulate_path(slow, sb, sc, 2.0)]
    assert hs[-1] < hf[-1]
    steps = [b / a for a, b in itertools.pairwise(hs) if b != a]
    assert steps and max(steps) <= 1.1875 + 1e-9


def test_no_buffer_growth_while_memory_is_short() -> None:
    tuner, backend, _clock = make_tuner()
    memory_short(tuner)
    tuner.handle_event(conn_event(Tunable.TCP_RMEM, receiver(131072), (4096, 65536, 131072)))
    assert backend.read("net.ipv4.tcp_rmem", NS)[2] == 131072


def test_an_administrators_namespace_is_left_alone() -> None:
    tuner, backend, _clock = make_tuner()
    tuner.ctx.store.disable(tuner, NS, "pid 1, cmd 'sysctl' modified sysctl 'net.ipv4.tcp_rmem'")
    tuner.handle_event(conn_event(Tunable.TCP_RMEM, receiver(131072), (4096, 65536, 131072)))
    assert backend.read("net.ipv4.tcp_rmem", NS)[2] == 131072


# --- latency correlation ------------------------------------------------------------------------


def test_latency_correlated_growth_backs_off_toward_a_full_pipe() -> None:
    """Buffer growth came with rising RTT: step down, but not below what
    keeps the pipe full (2 x BDP) nor below the value before we grew it."""
    tuner, backend, clock = make_tuner()
    # Earlier growth took the namespace from 128 KiB to 8 MiB.
    assert tuner.apply(Proposal(Tunable.TCP_RMEM, Scenario.INCREASE, NS, (4096, 65536, 8 * MB), "earlier growth"))
    rising = CorrSums.of([(MB * (i + 1), 50_000 + 3000 * i) for i in range(12)])
    corr = bpf(tuner).map("bpftune_corr", CorrKey, CorrSums)
    for _ in range(10):
        # The BPF side keeps seeing latency rise with the buffer (each
        # back-off deletes the sums it acted on).
        correlate(tuner, Tunable.TCP_RMEM, rising)
        clock.now += 1
        limit = backend.read("net.ipv4.tcp_rmem", NS)
        # 200 Mbit/s over a 50 ms path, 30 ms of queue.
        conn = receiver(limit[2], rtt_us=80_000, min_rtt_us=50_000, rate=25e6)
        tuner.handle_event(conn_event(Tunable.TCP_RMEM, conn, limit))
    full = int(2 * 25e6 * 0.05 * 2)
    assert backend.read("net.ipv4.tcp_rmem", NS)[2] == full
    assert not corr, "acted on: deleted"
    # Acting on the correlation starts it over: its sums are deleted.
    correlate(tuner, Tunable.TCP_RMEM, rising)
    clock.now += 1
    limit = backend.read("net.ipv4.tcp_rmem", NS)
    decision = tuner.decide(conn_event(Tunable.TCP_RMEM, receiver(limit[2], rtt_us=80_000, rate=25e6), limit))
    assert MapUpdate("bpftune_corr", corr_key(TUNER_ID, Tunable.TCP_RMEM, NS), None) in decision.effects
    counts = tuner.ctx.store.scenario_counts(tuner, Tunable.TCP_RMEM)
    assert counts[(Scenario.DECREASE_LATENCY, False)] == 2


def test_latency_back_off_never_goes_below_the_initial_value() -> None:
    """Nor below a connection's recent need (30 s); and only for connections
    that sit in a queue."""
    tuner, backend, clock = make_tuner()
    tuner.handle_event(conn_event(Tunable.TCP_RMEM, receiver(131072), (4096, 65536, 131072)))
    assert backend.read("net.ipv4.tcp_rmem", NS)[2] == 524288
    rising = CorrSums.of([(131072 * (i + 1), 50_000 + 3000 * i) for i in range(12)])
    # Within 30 s the first connection's need (262144) still protects the limit.
    correlate(tuner, Tunable.TCP_RMEM, rising)
    clock.now += 1
    limit = backend.read("net.ipv4.tcp_rmem", NS)
    conn = receiver(limit[2], rtt_us=80_000, min_rtt_us=50_000, rate=1e5)
    tuner.handle_event(conn_event(Tunable.TCP_RMEM, conn, limit))
    assert backend.read("net.ipv4.tcp_rmem", NS)[2] == 393216
    correlate(tuner, Tunable.TCP_RMEM, rising)
    clock.now += 1
    tuner.handle_event(
        conn_event(Tunable.TCP_RMEM, receiver(393216, rtt_us=80_000, min_rtt_us=50_000, rate=1e5), limit)
    )
    assert backend.read("net.ipv4.tcp_rmem", NS)[2] == 393216, "stale: seen before the change"
    clock.now += 30
    for _ in range(5):
        correlate(tuner, Tunable.TCP_RMEM, rising)
        clock.now += 1
        limit = backend.read("net.ipv4.tcp_rmem", NS)
        conn = receiver(limit[2], rtt_us=80_000, min_rtt_us=50_000, rate=1e5)
        tuner.handle_event(conn_event(Tunable.TCP_RMEM, conn, limit))
    assert backend.read("net.ipv4.tcp_rmem", NS)[2] == 131072


def test_uncorrelated_latency_does_not_back_off() -> None:
    tuner, backend, _clock = make_tuner()
    flat = CorrSums.of([(131072 * (i + 1), 50_000 + (i % 2) * 100) for i in range(20)])
    correlate(tuner, Tunable.TCP_RMEM, flat)
    tuner.handle_event(conn_event(Tunable.TCP_RMEM, receiver(131072), (4096, 65536, 131072)))
    assert backend.read("net.ipv4.tcp_rmem", NS)[2] == 524288


def test_correlation_keys_name_the_tuner() -> None:
    """Upstream keyed corr_map by tunable id only: tcp_buffer's tcp_rmem (1)
    and ip_frag's tunable 1 shared their sums.  The key names the tuner."""
    assert corr_key(2, 1, NS) != corr_key(7, 1, NS)
    shared_map = {
        corr_key(2, 1, NS): corr_value(CorrSums.of([(i, 2 * i) for i in range(12)])),
        corr_key(7, 1, NS): corr_value(CorrSums.of([(i, 100 - i) for i in range(12)])),
    }
    assert read_corr(shared_map, 2, 1, NS).coefficient() == pytest.approx(1.0)
    assert read_corr(shared_map, 7, 1, NS).coefficient() == pytest.approx(-1.0)
    assert read_corr(shared_map, 3, 1, NS) == CorrSums()


def test_pearson_coefficient() -> None:
    assert CorrSums.of([(1, 5)] * 12).coefficient() == 0.0
    assert not CorrSums.of([(i, i) for i in range(9)]).significant(), "fewer than 10 samples"
    assert CorrSums.of([(i, i) for i in range(10)]).significant()


# --- TCP memory ------------------------------------------------------------------------------------


def test_pressure_grows_tcp_mem_within_fractions_of_free_pages() -> None:
    steps = Steps(4)
    assert tb.tcp_mem_pressure((40000, 60000, 90000), F, steps) == (50000, 75000, 112500)
    # At the caps: [0] stays at/above F/16, [1] above F/8, [2] at most F/4.
    assert tb.tcp_mem_pressure((70000, 130000, 240000), F, steps) == (70000, 130000, 250000)
    assert tb.tcp_mem_pressure((70000, 130000, 250000), F, steps) is None
    # Above F/4, which no memory can back: brought down to it (as the reference does).
    assert tb.tcp_mem_pressure((70000, 130000, 400000), F, steps) == (70000, 130000, 250000)
    # Every value, keeping the order.
    assert tb.tcp_mem_pressure((300000, 300000, 400000), F, steps) == (250000, 250000, 250000)


def test_pressure_event_writes_tcp_mem_in_the_global_namespace() -> None:
    tuner, backend, _clock = make_tuner()
    tuner.handle_event(update_event(Tunable.TCP_MEM, Scenario.MEM_PRESSURE, (40000, 60000, 90000)))
    assert backend.read("net.ipv4.tcp_mem") == (50000, 75000, 112500)


def test_tcp_mem_is_capped_from_memtotal_when_the_zones_give_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """No Normal or DMA32 zone in /proc/zoneinfo: F comes from MemTotal
    (F * 4 KiB here), so 42 pressure events stop at F/4 instead of taking
    tcp_mem to INT_MAX pages."""
    tuner, backend, clock = make_tuner()
    tuner.memory = dataclasses.replace(tuner.host_memory, zone_pages=0)  # the zones give nothing
    assert tuner.host_memory.buffer_estimated
    assert tuner.free_pages == F
    caplog.set_level(logging.DEBUG, logger="pybpftune.tuner.tcp_buffer")
    tuner.start()
    assert "estimated from MemTotal" in caplog.text
    for _ in range(42):
        mem = backend.read("net.ipv4.tcp_mem")
        tuner.handle_event(update_event(Tunable.TCP_MEM, Scenario.MEM_PRESSURE, (mem[0], mem[1], mem[2])))
        clock.now += tb.MEM_COOLDOWN_S
    cap = F // 4
    final = backend.read("net.ipv4.tcp_mem")
    assert final[2] == cap
    assert max(final) <= cap
    assert all(max(values) <= cap for _c, name, values in backend.writes if name == "net.ipv4.tcp_mem")


def test_a_tcp_mem_max_no_memory_can_back_is_brought_down_the_first_time() -> None:
    """The reference's mem_pressure test: tcp_mem "50 100 2000000000" and
    pressure grow the first two values and bring the max down to F/4."""
    tuner, backend, _clock = make_tuner(values={"net.ipv4.tcp_mem": (50, 100, 2_000_000_000)})
    tuner.handle_event(update_event(Tunable.TCP_MEM, Scenario.MEM_PRESSURE, (50, 100, 2_000_000_000)))
    assert backend.read("net.ipv4.tcp_mem") == (62, 125, F // 4)
    change = tuner.ctx.store.history.changes[-1]
    assert "brought down to a quarter of the 1000000 buffer-usable pages" in change.reason


def test_exhaustion_also_brings_the_tcp_mem_max_down_to_its_cap() -> None:
    tuner, backend, _clock = make_tuner(values={"net.ipv4.tcp_mem": (50, 100, 2_000_000_000)})
    tuner.handle_event(update_event(Tunable.TCP_MEM, Scenario.MEM_EXHAUSTION, (50, 100, 2_000_000_000)))
    assert backend.read("net.ipv4.tcp_mem") == (50, 100, F // 4)


def test_the_store_holds_any_tcp_mem_proposal_within_the_memory_cap() -> None:
    """Whatever a rule proposes, the store's one clamp path applies the cap
    declared on the tunable (Tunable.ceiling), for every value."""
    tuner, backend, _clock = make_tuner()
    glob = tuner.ctx.namespaces.global_cookie
    assert tuner.ceiling(Tunable.TCP_MEM) == F // 4
    tuner.apply(Proposal(Tunable.TCP_MEM, Scenario.MEM_PRESSURE, glob, (INT_MAX, INT_MAX, INT_MAX), "test"))
    assert backend.read("net.ipv4.tcp_mem") == (F // 4, F // 4, F // 4)


def test_syn_backlog_growth_stops_at_its_memory_cap(caplog: pytest.LogCaptureFixture) -> None:
    """1 GiB: 1/256 of it in 512-byte request sockets is 8192."""
    tuner, backend, clock = make_tuner(values={"net.ipv4.tcp_max_syn_backlog": (8000,)})
    tuner.memory = HostMemory(1 << 30, 0)
    assert tuner.ceiling(Tunable.TCP_MAX_SYN_BACKLOG) == 8192
    correlate(tuner, Tunable.TCP_MAX_SYN_BACKLOG, CorrSums.of([(i, 10 * i) for i in range(20)]))
    caplog.set_level(logging.INFO)
    for _ in range(3):
        tuner.handle_event(update_event(Tunable.TCP_MAX_SYN_BACKLOG, Scenario.SYN_BACKLOG_INCREASE, (8000, 0, 0)))
        clock.now += tb.SYN_COOLDOWN_S
    assert backend.read("net.ipv4.tcp_max_syn_backlog", NS) == (8192,)
    assert caplog.text.count("its memory cap 8192") == 1
    assert tb.syn_backlog_cap(HostMemory(8 << 30)) == 65536
    assert tb.syn_backlog_cap(HostMemory(1 << 20)) == tb.SYN_BACKLOG_MIN


def test_a_backlog_beyond_its_cap_is_not_restored_on_leaving_the_low_memory_state() -> None:
    tuner, backend, clock = make_tuner(values={"net.ipv4.tcp_max_syn_backlog": (10**9,)})
    cap = tuner.ceiling(Tunable.TCP_MAX_SYN_BACKLOG)
    assert cap is not None and cap < 10**9
    set_allocated(tuner, 0)
    tuner.handle_event(update_event(Tunable.TCP_MEM, Scenario.MEM_EXHAUSTION, (40000, 60000, 90000)))
    assert backend.read("net.ipv4.tcp_max_syn_backlog", NS) == (cap,)
    tuner.tick(clock.now)
    clock.now += tb.RECOVERY_S
    tuner.tick(clock.now)
    assert not tuner.low_memory.active
    assert backend.read("net.ipv4.tcp_max_syn_backlog", NS) == (cap,)


def test_exhaustion_grows_tcp_mem_and_enters_the_low_memory_state() -> None:
    """Exhaustion switches the optional consumers off in the namespace that
    hit the limit and in the host's (TCP memory is one pool); they come back
    once TCP's allocated pages have stayed clear of tcp_mem[1] for
    RECOVERY_S, whatever the BPF side's (stale) flags say."""
    tuner, backend, clock = make_tuner()
    set_allocated(tuner, 89000)
    memory_short(tuner, exhaustion=True)
    tuner.handle_event(update_event(Tunable.TCP_MEM, Scenario.MEM_EXHAUSTION, (40000, 60000, 90000)))
    assert backend.read("net.ipv4.tcp_mem") == (40000, 60000, 112500)
    glob = tuner.ctx.namespaces.global_cookie
    for cookie in (NS, glob):
        assert backend.read("net.ipv4.tcp_no_metrics_save", cookie) == (1,)
        assert backend.read("net.ipv4.tcp_no_ssthresh_metrics_save", cookie) == (1,)
        assert backend.read("net.ipv4.tcp_max_syn_backlog", cookie) == (768,)
    assert backend.read("net.core.high_order_alloc_disable") == (1,)
    assert [w for w in backend.writes if w[1] == "net.core.high_order_alloc_disable"] == [
        (glob, "net.core.high_order_alloc_disable", (1,))
    ]
    # Still short, or unknown: nothing changes, however long.
    for now in range(10):
        clock.now += 1
        set_allocated(tuner, 50000 if now % 2 else None)  # nearly full of tcp_mem[1] (60000), or unreadable
        tuner.tick(clock.now)
    assert backend.read("net.ipv4.tcp_no_metrics_save", NS) == (1,)
    # Memory recovers (the BPF flags still say short: they are not asked).
    set_allocated(tuner, 10000)
    tuner.tick(clock.now)
    clock.now += tb.RECOVERY_S - 0.5
    tuner.tick(clock.now)
    assert backend.read("net.ipv4.tcp_no_metrics_save", NS) == (1,), "recovered for less than RECOVERY_S"
    clock.now += 0.5
    tuner.tick(clock.now)
    for cookie in (NS, glob):
        assert backend.read("net.ipv4.tcp_no_metrics_save", cookie) == (0,)
        assert backend.read("net.ipv4.tcp_no_ssthresh_metrics_save", cookie) == (0,)
        assert backend.read("net.ipv4.tcp_max_syn_backlog", cookie) == (1024,)
    assert backend.read("net.core.high_order_alloc_disable") == (0,)
    counts = tuner.ctx.store.scenario_counts(tuner, Tunable.TCP_NO_METRICS_SAVE)
    assert counts[(Scenario.LOW_MEM_ENTER, False)] == 1 and counts[(Scenario.LOW_MEM_LEAVE, False)] == 1
    assert counts[(Scenario.LOW_MEM_ENTER, True)] == 1 and counts[(Scenario.LOW_MEM_LEAVE, True)] == 1


def test_exhaustion_enters_the_low_memory_state_even_while_tcp_mem_cools_down() -> None:
    """A pressure event just grew tcp_mem; an exhaustion event right after
    (within the tcp_mem cooldown) must still enter the low-memory state."""
    tuner, backend, clock = make_tuner()
    tuner.handle_event(update_event(Tunable.TCP_MEM, Scenario.MEM_PRESSURE, (40000, 60000, 90000)))
    clock.now += tb.MEM_COOLDOWN_S / 2
    tuner.handle_event(update_event(Tunable.TCP_MEM, Scenario.MEM_EXHAUSTION, (50000, 75000, 112500)))
    assert backend.read("net.ipv4.tcp_mem") == (50000, 75000, 112500), "tcp_mem waits for its cooldown"
    assert backend.read("net.ipv4.tcp_no_metrics_save", NS) == (1,)
    assert backend.read("net.ipv4.tcp_no_metrics_save") == (1,)


def test_the_low_memory_state_keeps_its_ticks_and_stops_them_when_left() -> None:
    """Ticks run only when due: outside the low-memory state tick() asks for
    none; entering asks for one within LOW_MEMORY_CHECK_S, each tick in the
    state asks for the next, and leaving it stops them."""
    requested: list[float] = []
    tuner, _backend, clock = make_tuner()
    tuner.ctx.request_tick = lambda _tuner, when: requested.append(when)
    set_allocated(tuner, 89000)
    assert tuner.tick(clock.now) == math.inf
    before = clock.now
    tuner.handle_event(update_event(Tunable.TCP_MEM, Scenario.MEM_EXHAUSTION, (40000, 60000, 90000)))
    assert requested and before < requested[-1] <= clock.now + tb.LOW_MEMORY_CHECK_S
    assert tuner.tick(clock.now) == clock.now + tb.LOW_MEMORY_CHECK_S
    set_allocated(tuner, 10000)
    for _ in range(int(tb.RECOVERY_S / tb.LOW_MEMORY_CHECK_S)):  # recovered at the first, left RECOVERY_S later
        assert tuner.tick(clock.now) == clock.now + tb.LOW_MEMORY_CHECK_S
        clock.now += tb.LOW_MEMORY_CHECK_S
    assert tuner.tick(clock.now) == math.inf
    assert tuner.ctx.store.scenario_counts(tuner, Tunable.TCP_NO_METRICS_SAVE)[(Scenario.LOW_MEM_LEAVE, True)] == 1


def test_no_buffer_growth_in_the_low_memory_state_and_the_first_growth_waits() -> None:
    """In the low-memory state no limit grows, whatever the BPF flags say,
    not even a namespace's first growth (room up to the window-scale cap);
    once the state is left, that first growth still gets the cap rule."""
    tuner, backend, clock = make_tuner()
    set_allocated(tuner, 89000)
    tuner.handle_event(update_event(Tunable.TCP_MEM, Scenario.MEM_EXHAUSTION, (40000, 60000, 90000)))
    assert not (tuner.near_pressure or tuner.near_exhaustion)  # the BPF flags say memory is fine
    first = receiver(131072, wscale_cap=262140, rate=4.3e6 / 8, first=True)
    tuner.handle_event(conn_event(Tunable.TCP_RMEM, first, (4096, 65536, 131072)))
    assert backend.read("net.ipv4.tcp_rmem", NS)[2] == 131072
    set_allocated(tuner, 10000)
    for _ in range(int(tb.RECOVERY_S) + 2):
        tuner.tick(clock.now)
        clock.now += 1
    assert not tuner.low_memory.active
    tuner.handle_event(conn_event(Tunable.TCP_RMEM, first, (4096, 65536, 131072)))
    assert backend.read("net.ipv4.tcp_rmem", NS)[2] == 2 * 262140


@pytest.mark.parametrize(
    ("text", "pages"),
    [
        ("sockets: used 5\nTCP: inuse 0 orphan 0 tw 0 alloc 1 mem 191\nUDP: inuse 0 mem 0\n", 191),
        ("TCP: inuse 3 orphan 0 tw 2 alloc 7 mem 0\n", 0),
        ("TCP: inuse 3 mem\n", None),
        ("TCP: inuse 3 mem -4\n", None),
        ("TCP: inuse 3 mem 12x\n", None),
        ("UDP: inuse 0 mem 9\n", None),
        ("", None),
    ],
)
def test_tcp_allocated_pages_from_sockstat(text: str, pages: int | None) -> None:
    assert procnet.parse_sockstat(text).get(tb.SOCKSTAT_TCP_PAGES) == pages


def test_sockstat_garbage_is_never_an_error() -> None:
    rnd = random.Random(15)
    alphabet = "TCP: memin0123456789-\n\t x\x00"
    for _ in range(2000):
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randrange(60)))
        got = procnet.parse_sockstat(text).get(tb.SOCKSTAT_TCP_PAGES)
        assert got is None or got >= 0


def test_memory_recovered_is_below_three_quarters_of_the_pressure_threshold() -> None:
    steps = Steps(4)
    assert tb.memory_recovered(44999, (40000, 60000, 90000), steps)
    assert not tb.memory_recovered(45000, (40000, 60000, 90000), steps)
    assert not tb.memory_recovered(191, (31, 77, 1722), steps)


def test_exhaustion_with_tcp_mem_at_its_cap_shrinks_the_buffers() -> None:
    """Upstream's fallback (shrink tcp_[rw]mem when tcp_mem[2] cannot grow)
    was dead code: its guard compared min(F/4, x) <= F/4, always true."""
    tuner, backend, clock = make_tuner(
        values={
            "net.ipv4.tcp_mem": (60000, 120000, F // 4),
            "net.ipv4.tcp_rmem": (4096, 131072, 6291456),
            "net.ipv4.tcp_wmem": (4096, 16384, 4194304),
        }
    )
    memory_short(tuner, exhaustion=True)
    tuner.handle_event(update_event(Tunable.TCP_MEM, Scenario.MEM_EXHAUSTION, (60000, 120000, F // 4)))
    assert backend.read("net.ipv4.tcp_mem") == (60000, 120000, F // 4)
    assert backend.read("net.ipv4.tcp_rmem", NS) == (4096, 131072, 4718592)
    assert backend.read("net.ipv4.tcp_wmem", NS) == (4096, 16384, 3145728)
    # Repeated exhaustion never takes a maximum below its default value.
    for _ in range(30):
        clock.now += 1
        tuner.handle_event(update_event(Tunable.TCP_MEM, Scenario.MEM_EXHAUSTION, (60000, 120000, F // 4)))
    assert backend.read("net.ipv4.tcp_rmem", NS) == (4096, 131072, 131072)
    assert backend.read("net.ipv4.tcp_wmem", NS) == (4096, 16384, 16384)


def test_free_buffer_pages_from_zoneinfo() -> None:
    zoneinfo = """Node 0, zone      DMA
  pages free     3840
        high     45
        managed  3840
Node 0, zone    DMA32
        high     9381
        managed  772917
Node 0, zone   Normal
        high     15912
        managed  1310720
Node 0, zone  Movable
        high     32
        managed  0
"""
    assert parse_zone_pages(zoneinfo) == 1310720 - 15912
    small = zoneinfo.replace("managed  1310720", "managed  0").replace("high     15912", "high     0")
    assert parse_zone_pages(small) == 772917 - 9381


# --- SYN backlog and syncookies ---------------------------------------------------------------


def test_good_syn_flood_grows_the_backlog_attack_shrinks_it() -> None:
    steps = Steps(4)
    # Floods come with connections established: load, grow.
    good = CorrSums.of([(i, 10 * i) for i in range(20)])
    assert tb.syn_backlog_rule(1024, good, steps) == (Scenario.SYN_BACKLOG_INCREASE, 1280)
    # Floods without established connections: an attack, shrink, not below 128.
    attack = CorrSums.of([(i, 5) for i in range(20)])
    assert tb.syn_backlog_rule(1024, attack, steps) == (Scenario.SYN_BACKLOG_DECREASE, 768)
    assert tb.syn_backlog_rule(128, attack, steps) is None


def test_established_counter_that_stays_zero_looks_like_an_attack() -> None:
    """Upstream's tcp_init_transfer hook compared the op with
    BPF_TCP_ESTABLISHED (1) while the kernel passes the sockops callbacks
    (4/5): established stayed 0, every flood looked like an attack and the
    backlog shrank even under real load.  With a counter that counts, the
    same floods grow it (the BPF side counts ESTABLISHED transitions; see
    tests/kernel/test_tcp_buffer_tuner.py for the kernel half)."""
    floods = list(range(1, 21))
    broken = CorrSums.of([(f, 0) for f in floods])
    counting = CorrSums.of([(f, 3 * f + 1) for f in floods])
    assert tb.syn_backlog_rule(1024, broken, Steps(4)) == (Scenario.SYN_BACKLOG_DECREASE, 768)
    assert tb.syn_backlog_rule(1024, counting, Steps(4)) == (Scenario.SYN_BACKLOG_INCREASE, 1280)


def test_syn_flood_event_applies_the_backlog_rule() -> None:
    tuner, backend, _clock = make_tuner()
    correlate(tuner, Tunable.TCP_MAX_SYN_BACKLOG, CorrSums.of([(i, 10 * i) for i in range(20)]))
    tuner.handle_event(update_event(Tunable.TCP_MAX_SYN_BACKLOG, Scenario.SYN_BACKLOG_INCREASE, (1024, 0, 0)))
    assert backend.read("net.ipv4.tcp_max_syn_backlog", NS) == (1280,)


def test_syncookies_failing_without_valid_ones_are_switched_off() -> None:
    tuner, backend, _clock = make_tuner(values={"net.ipv4.tcp_syncookies": (1,)})
    namespaces(tuner).set_counters(NS, **{"TcpExt.SyncookiesFailed": 5000, "TcpExt.SyncookiesRecv": 0})
    tuner.handle_event(update_event(Tunable.TCP_MAX_SYN_BACKLOG, Scenario.SYN_BACKLOG_INCREASE, (1024, 0, 0)))
    assert backend.read("net.ipv4.tcp_syncookies", NS) == (0,)
    assert tb.syncookies_rule(1, {"TcpExt.SyncookiesFailed": 5000, "TcpExt.SyncookiesRecv": 3}, False) is None


def test_syncookies_switched_on_when_memory_is_short() -> None:
    tuner, backend, _clock = make_tuner(values={"net.ipv4.tcp_syncookies": (0,)})
    memory_short(tuner)
    tuner.handle_event(update_event(Tunable.TCP_MAX_SYN_BACKLOG, Scenario.SYN_BACKLOG_INCREASE, (1024, 0, 0)))
    assert backend.read("net.ipv4.tcp_syncookies", NS) == (1,)


def test_netstat_parsing() -> None:
    text = "TcpExt: SyncookiesSent SyncookiesRecv SyncookiesFailed\nTcpExt: 10 2 3\nIpExt: InNoRoutes\nIpExt: 0\n"
    assert procnet.parse_counters(text) == {
        "TcpExt.SyncookiesSent": 10,
        "TcpExt.SyncookiesRecv": 2,
        "TcpExt.SyncookiesFailed": 3,
        "IpExt.InNoRoutes": 0,
    }


def test_unknown_events_are_ignored() -> None:
    tuner, backend, _clock = make_tuner()
    before = dict(backend.values)
    tuner.handle_event(update_event(Tunable.TCP_MAX_ORPHANS, Scenario.MAX_ORPHANS_INCREASE, (65536, 0, 0)))
    assert backend.values == before
