"""neigh_table rules, driven by synthetic events over in-memory tables (no root)."""

from __future__ import annotations

import logging
import socket

import pytest

from pybpftune.bindings import NeighTableFlag, NeighTableScenario, NeighTableStats, NeighTableTunable
from pybpftune.errors import NotSupported
from pybpftune.events import Event
from pybpftune.hostmem import HostMemory
from pybpftune.netns import Namespaces
from pybpftune.store import MANUAL
from pybpftune.testing import TunerHarness
from pybpftune.tuner import INT_MAX, Steps
from pybpftune.tuners import neigh_table as nt
from pybpftune.tuners.neigh_table import (
    MemoryNeigh,
    NeighTableTuner,
    Table,
    address_bound,
    grow_thresholds,
    shrink_thresholds,
)

STEPS = Steps(4)
V4 = socket.AF_INET
V6 = socket.AF_INET6
OTHER_NS = 4242  # cookie of a namespace that is not the daemon's


def sysctls(ipv6: bool = True, init_ns: bool = True) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    protos = (["ipv4"] if init_ns else []) + (["ipv6"] if ipv6 and init_ns else [])
    for proto in protos:
        base = f"net.{proto}.neigh.default."
        out |= {
            base + "gc_interval": (30,),
            base + "gc_stale_time": (60,),
            base + "gc_thresh1": (128,),
            base + "gc_thresh2": (512,),
            base + "gc_thresh3": (1024,),
        }
    return out


def make_tuner(neigh: MemoryNeigh, ipv6: bool = True, init_ns: bool = True, advice: bool = False) -> NeighTableTuner:
    h = TunerHarness.build(NeighTableTuner, sysctls(ipv6, init_ns), tuner_id=3, backend=neigh)
    h.store.advice = advice
    return h.tuner


def stats_event(
    scenario: int,
    family: int = V4,
    cookie: int = OTHER_NS,
    ifindex: int = 2,
    dev: str = "veth0",
    entries: int = 0,
    thresholds: tuple[int, int, int] = (128, 512, 1024),
    flags: int = 0,
    inum: int = 0,
) -> Event:
    t1, t2, t3 = thresholds
    stats = NeighTableStats(family, entries, entries, t1, t2, t3, ifindex, dev, flags, inum)
    return Event.build(3, scenario, netns_cookie=cookie, raw=stats.pack())


def arp(thresholds: tuple[int, int, int], entries: int) -> Table:
    return Table("arp_cache", V4, thresholds, entries)


# --- the bound ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefixes", "bits", "bound"),
    [
        ([24], 32, 1024),  # bpftune's doc: one /24 -> 256 * 4
        ([32], 32, 1024),  # a host address still counts a /24's worth
        ([22], 32, 4096),
        ([24, 24, 24, 24], 32, 4096),  # neigh_table_max2: more /24s raise it
        ([], 32, 1024),  # no address of the family: the floor of one
        ([2], 32, INT_MAX),  # 2**30 * 4 overflows an int
        ([64], 128, INT_MAX),  # 64 host bits or more: no bound
        ([120], 128, 1024),
        ([112], 128, 65536 * 4),
    ],
)
def test_address_bound(prefixes: list[int], bits: int, bound: int) -> None:
    assert address_bound(prefixes, bits) == bound


# --- grow -------------------------------------------------------------------------------------


def test_grow_steps_until_no_longer_nearly_full() -> None:
    # 252 entries against 32/64/128: five 25 % steps, each threshold grown alike.
    assert grow_thresholds((32, 64, 128), 252, 1024, STEPS) == (96, 195, 390)
    # bpftune's doc example: one step, 1024 -> 1280.
    assert grow_thresholds((128, 512, 1024), 800, INT_MAX, STEPS) == (160, 640, 1280)


def test_grow_is_clamped_at_the_bound_and_keeps_the_order() -> None:
    assert grow_thresholds((256, 900, 1000), 900, 1024, STEPS) == (320, 1024, 1024)
    assert grow_thresholds((128, 512, 1024), 1000, 1024, STEPS) is None  # already there
    assert grow_thresholds((128, 512, 2000), 1990, 1024, STEPS) is None  # above it (admin)


def test_grow_needs_a_nearly_full_table_or_a_refusal() -> None:
    assert grow_thresholds((128, 512, 1024), 700, INT_MAX, STEPS) is None
    assert grow_thresholds((128, 512, 1024), 700, INT_MAX, STEPS, refused=True) == (160, 640, 1280)


def test_grow_never_passes_int_max() -> None:
    assert grow_thresholds((INT_MAX - 10, INT_MAX - 5, INT_MAX - 1), INT_MAX, INT_MAX, STEPS) == (
        INT_MAX,
        INT_MAX,
        INT_MAX,
    )
    assert grow_thresholds((1, 2, INT_MAX), INT_MAX, INT_MAX, STEPS) is None


def test_grow_makes_progress_from_tiny_thresholds() -> None:
    assert grow_thresholds((0, 0, 1), 1, 1024, STEPS) is not None


def test_learning_rate_sets_the_step() -> None:
    # 1.5625 % steps: 1024 -> 1040 is still nearly full of 1024 entries, 1056 is not.
    assert grow_thresholds((128, 512, 1024), 1024, INT_MAX, Steps(0)) == (132, 528, 1056)


# --- shrink ----------------------------------------------------------------------------------


def test_shrink_one_step_towards_the_defaults() -> None:
    assert shrink_thresholds((512, 2048, 4096), 0, STEPS) == (384, 1536, 3072)
    assert shrink_thresholds((130, 600, 1100), 10, STEPS) == (128, 512, 1024)


def test_shrink_only_large_nearly_empty_tables() -> None:
    assert shrink_thresholds((128, 512, 1024), 0, STEPS) is None  # at the default
    assert shrink_thresholds((512, 2048, 4096), 1025, STEPS) is None  # not nearly empty
    assert shrink_thresholds((512, 2048, 4096), 1024, STEPS) is not None


def test_shrink_never_raises_a_threshold_set_below_its_default() -> None:
    assert shrink_thresholds((32, 2048, 4096), 0, STEPS) == (32, 1536, 3072)


# --- the tuner on events ------------------------------------------------------------------


def test_full_event_grows_over_netlink_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    neigh = MemoryNeigh({V4: arp((32, 64, 128), 252)}, {(OTHER_NS, 2, V4): [24]})
    tuner = make_tuner(neigh)
    caplog.set_level(logging.INFO)
    tuner.handle_event(stats_event(NeighTableScenario.FULL, entries=252, thresholds=(32, 64, 128)))
    # Device in another namespace: its index means nothing in ours, so no NDTA_PARMS.
    assert neigh.writes == [("arp_cache", (96, 195, 390), None)]
    text = caplog.text
    assert "updated thresholds for arp_cache table, dev 'veth0' (ifindex 2) in non-global ns" in text
    assert "from (32 64 128) to (96 195 390), computed max 1024" in text
    assert "change neigh.arp_cache.gc_thresh(gc_thresh1 gc_thresh2 gc_thresh3) from (32 64 128) -> (96 195 390)" in text
    summary = tuner.ctx.store.summary(tuner)
    assert any(
        "'neighbour table nearly full' occurred 1 times for tunable 'neigh.arp_cache.gc_thresh'" in s for s in summary
    )


def test_the_request_names_only_the_table() -> None:
    """bpftune adds NDTA_PARMS with the device's index, which changes nothing
    and fails for a device in another namespace: we name the table only."""
    ns_cookie = Namespaces().global_cookie
    neigh = MemoryNeigh({V4: arp((32, 64, 128), 120)}, {(ns_cookie, 5, V4): [24]})
    tuner = make_tuner(neigh)
    tuner.handle_event(stats_event(NeighTableScenario.FULL, cookie=ns_cookie, ifindex=5, entries=120))
    assert neigh.writes and neigh.writes[0][2] is None


def test_upstream_bug_bound_comes_from_the_devices_own_namespace() -> None:
    """bpftune looked the device's index up in its own namespace: here index 2
    is a /16 there (bound 262144), while the event's device, in another
    namespace, has a /24 (bound 1024).  The thresholds must stop at 1024."""
    glob = Namespaces().global_cookie
    neigh = MemoryNeigh(
        {V4: arp((256, 512, 1000), 990)},
        {(glob, 2, V4): [16], (OTHER_NS, 2, V4): [24]},
    )
    tuner = make_tuner(neigh)
    tuner.handle_event(stats_event(NeighTableScenario.FULL, cookie=OTHER_NS, ifindex=2, entries=990))
    assert neigh.writes == [("arp_cache", (320, 640, 1024), None)]


def test_at_the_bound_it_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    neigh = MemoryNeigh({V4: arp((256, 1024, 1024), 1000)}, {(OTHER_NS, 2, V4): [24]})
    tuner = make_tuner(neigh)
    caplog.set_level(logging.INFO)
    for _ in range(3):
        tuner.handle_event(stats_event(NeighTableScenario.FULL, entries=1000))
    assert neigh.writes == []
    lines = [r.getMessage() for r in caplog.records if "can no longer update thresholds" in r.getMessage()]
    assert len(lines) == 1
    assert "for arp_cache table, dev 'veth0' (ifindex 2)" in lines[0] and "computed max 1024" in lines[0]


def test_unknown_device_changes_nothing() -> None:
    neigh = MemoryNeigh({V4: arp((32, 64, 128), 252)}, {})
    tuner = make_tuner(neigh)
    tuner.handle_event(stats_event(NeighTableScenario.FULL, entries=252))
    assert neigh.writes == []


def test_stale_event_is_rechecked_against_the_live_table() -> None:
    # The event saw 128 but the table has grown since and is not full now.
    neigh = MemoryNeigh({V4: arp((96, 195, 390), 252)}, {(OTHER_NS, 2, V4): [24]})
    tuner = make_tuner(neigh)
    tuner.handle_event(stats_event(NeighTableScenario.FULL, entries=252, thresholds=(32, 64, 128)))
    assert neigh.writes == []


def test_refused_entry_grows_even_if_the_count_looks_fine() -> None:
    neigh = MemoryNeigh({V4: arp((128, 512, 1024), 300)}, {(OTHER_NS, 2, V4): [16]})
    tuner = make_tuner(neigh)
    tuner.handle_event(stats_event(NeighTableScenario.FULL, entries=300, flags=NeighTableFlag.F_REFUSED))
    assert neigh.writes == [("arp_cache", (160, 640, 1280), None)]


def test_empty_event_shrinks_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    neigh = MemoryNeigh({V4: arp((512, 2048, 4096), 3)}, {})
    tuner = make_tuner(neigh)
    caplog.set_level(logging.INFO)
    tuner.handle_event(stats_event(NeighTableScenario.EMPTY, entries=3, thresholds=(512, 2048, 4096)))
    assert neigh.writes == [("arp_cache", (384, 1536, 3072), None)]
    assert "reduced thresholds for arp_cache table, dev 'veth0' (ifindex 2)" in caplog.text


def test_ipv6_off_does_not_break_ipv4() -> None:
    neigh = MemoryNeigh({V4: arp((32, 64, 128), 252)}, {(OTHER_NS, 2, V4): [24]})
    tuner = make_tuner(neigh, ipv6=False)  # no net.ipv6.* sysctls, no ndisc_cache
    tuner.start()
    tuner.handle_event(stats_event(NeighTableScenario.FULL, family=V6, entries=252))
    assert neigh.writes == []
    tuner.handle_event(stats_event(NeighTableScenario.FULL, family=V4, entries=252))
    assert neigh.writes == [("arp_cache", (96, 195, 390), None)]


def test_ipv6_table_grows_without_a_bound_on_a_64() -> None:
    neigh = MemoryNeigh({V6: Table("ndisc_cache", V6, (128, 512, 1024), 1000)}, {(OTHER_NS, 2, V6): [64, 64]})
    tuner = make_tuner(neigh)
    tuner.handle_event(stats_event(NeighTableScenario.FULL, family=V6, entries=1000))
    assert neigh.writes == [("ndisc_cache", (200, 800, 1600), None)]


def test_a_64_on_the_device_is_bounded_by_memory(caplog: pytest.LogCaptureFixture) -> None:
    """A /64 leaves the address bound at INT_MAX; memory bounds the table:
    1 GiB / 128 in 512-byte entries is 16384."""
    neigh = MemoryNeigh({V6: Table("ndisc_cache", V6, (4096, 8192, 16000), 15990)}, {(OTHER_NS, 2, V6): [64]})
    tuner = make_tuner(neigh)
    tuner.memory = HostMemory(1 << 30)
    assert tuner.ceiling(NeighTableTunable.NDISC_THRESHOLDS) == 16384
    caplog.set_level(logging.INFO)
    for _ in range(3):
        entries = neigh.tables[V6].thresholds[2] - 1
        neigh.tables[V6] = Table("ndisc_cache", V6, neigh.tables[V6].thresholds, entries)
        tuner.handle_event(stats_event(NeighTableScenario.FULL, family=V6, entries=entries))
    assert neigh.writes == [("ndisc_cache", (5120, 10240, 16384), None)]
    lines = [r.getMessage() for r in caplog.records if "can no longer update thresholds" in r.getMessage()]
    assert len(lines) == 1 and "computed max 16384 for the host's memory" in lines[0]


def test_the_memory_cap_holds_every_threshold() -> None:
    """Thresholds an administrator set beyond the cap come down to it when
    the tuner next changes the table (the store's clamp), and never below
    the kernel's defaults on a tiny host."""
    neigh = MemoryNeigh({V4: arp((10**8, 10**8, 10**8), 3)}, {})
    tuner = make_tuner(neigh)
    cap = tuner.ceiling(NeighTableTunable.ARP_THRESHOLDS)
    assert cap == (8 << 30) // nt.NEIGH_MEM_SHARE // nt.NEIGH_ENTRY_BYTES
    tuner.handle_event(stats_event(NeighTableScenario.EMPTY, entries=3))
    assert neigh.writes == [("arp_cache", (cap, cap, cap), None)]
    assert nt.neigh_cap(HostMemory(16 << 20)) == nt.DEFAULTS[2]


def test_outside_the_initial_namespace_it_refuses_to_start() -> None:
    tuner = make_tuner(MemoryNeigh(), init_ns=False)
    with pytest.raises(NotSupported, match="initial network namespace"):
        tuner.start()


def test_thresholds_changed_by_someone_else_make_it_back_off(caplog: pytest.LogCaptureFixture) -> None:
    neigh = MemoryNeigh({V4: arp((32, 64, 128), 252)}, {(OTHER_NS, 2, V4): [24]})
    tuner = make_tuner(neigh)
    caplog.set_level(logging.INFO)
    tuner.handle_event(stats_event(NeighTableScenario.FULL, entries=252))
    neigh.tables[V4] = arp((10, 20, 40), 252)  # `ip ntable change` by an administrator
    tuner.handle_event(stats_event(NeighTableScenario.FULL, entries=252))
    assert len(neigh.writes) == 1
    glob = tuner.ctx.namespaces.global_cookie
    assert tuner.ctx.store.netns_state(tuner, glob) == MANUAL
    assert "thresholds were changed from (96 195 390) to (10 20 40) outside pybpftune" in caplog.text


def test_admin_sysctl_write_disables_it_globally_even_for_events_from_other_namespaces() -> None:
    neigh = MemoryNeigh({V4: arp((32, 64, 128), 252)}, {(OTHER_NS, 2, V4): [24]})
    tuner = make_tuner(neigh)
    tuner.ctx.store.disable(tuner, tuner.ctx.namespaces.global_cookie, "pid 1 modified sysctl gc_thresh3")
    tuner.handle_event(stats_event(NeighTableScenario.FULL, cookie=OTHER_NS, entries=252))
    assert neigh.writes == []


def test_advice_mode_only_says_what_it_would_do(caplog: pytest.LogCaptureFixture) -> None:
    neigh = MemoryNeigh({V4: arp((32, 64, 128), 252)}, {(OTHER_NS, 2, V4): [24]})
    tuner = make_tuner(neigh, advice=True)
    caplog.set_level(logging.INFO)
    tuner.handle_event(stats_event(NeighTableScenario.FULL, entries=252))
    assert neigh.writes == []
    assert "would change neigh.arp_cache.gc_thresh" in caplog.text


def test_rollback_restores_the_original_thresholds(caplog: pytest.LogCaptureFixture) -> None:
    neigh = MemoryNeigh({V4: arp((32, 64, 128), 252)}, {(OTHER_NS, 2, V4): [24]})
    tuner = make_tuner(neigh)
    caplog.set_level(logging.INFO)
    tuner.handle_event(stats_event(NeighTableScenario.FULL, entries=252))
    tuner.ctx.store.rollback(tuner)  # what the daemon does with -R when the tuner stops
    assert neigh.writes[-1] == ("arp_cache", (32, 64, 128), None)
    assert "Rolling back tunable values for 'neigh.arp_cache.gc_thresh' from (96 195 390)" in caplog.text


def test_without_rollback_stop_leaves_the_thresholds() -> None:
    neigh = MemoryNeigh({V4: arp((32, 64, 128), 252)}, {(OTHER_NS, 2, V4): [24]})
    tuner = make_tuner(neigh)
    tuner.handle_event(stats_event(NeighTableScenario.FULL, entries=252))
    tuner.stop()
    tuner.ctx.store.release(tuner)  # what the daemon does without -R when the tuner stops
    assert len(neigh.writes) == 1
