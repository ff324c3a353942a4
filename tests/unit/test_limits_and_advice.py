"""Floors and caps in the write path, advice mode, and the change history."""

from __future__ import annotations

import logging

import pytest

from pybpftune.config import Limits, TunableLimits
from pybpftune.netns import Namespaces, NetnsRef
from pybpftune.store import TunableStore, bounded
from pybpftune.sysctl import MemorySysctl
from pybpftune.tuner import Proposal, Scenario, Steps, Tunable, Tuner, TunerContext

RMEM = Tunable(0, "net.ipv4.tcp_rmem", 3, namespaced=True, labels="min default max")
BACKLOG = Tunable(1, "net.core.netdev_max_backlog", 1, lower=1)


class Grower(Tuner):
    name = "grower"
    tunables = (RMEM, BACKLOG)
    scenarios = (Scenario(0, "need more", "Grow it."),)

    def start(self) -> None:
        self.seen: list[tuple[int, ...]] = []

    def applied(self, proposal: Proposal) -> None:
        self.seen.append(proposal.new)


def make(limits: dict[str, TunableLimits] | None = None, advice: bool = False) -> tuple[Grower, TunableStore]:
    ns = Namespaces()
    backend = MemorySysctl(
        {"net.ipv4.tcp_rmem": (4096, 131072, 131072), "net.core.netdev_max_backlog": (1000,)},
        global_cookie=ns.global_cookie,
    )
    store = TunableStore(backend, ns, None, advice, limits)
    tuner = Grower(TunerContext(store, ns, Steps(4)), 0)
    store.register(tuner)
    tuner.start()
    return tuner, store


def grow(tuner: Grower, cookie: int, new: tuple[int, ...], tunable: int = 0) -> bool:
    return tuner.apply(Proposal(tunable, 0, cookie, new, "more traffic"))


def test_a_cap_stops_growth_a_floor_stops_shrinking_neither_moves_a_value() -> None:
    lim = Limits(floor=(0, 0, 100), cap=(10**9, 10**9, 500))
    assert bounded(RMEM, (1, 2, 300), (1, 2, 900), lim) == (1, 2, 500)  # growth stops at the cap
    assert bounded(RMEM, (1, 2, 700), (1, 2, 900), lim) == (1, 2, 700)  # already above: not lowered, not grown
    assert bounded(RMEM, (1, 2, 700), (1, 2, 600), lim) == (1, 2, 600)  # shrinking toward the cap is fine
    assert bounded(RMEM, (1, 2, 300), (1, 2, 50), lim) == (1, 2, 100)  # shrinking stops at the floor
    assert bounded(RMEM, (1, 2, 80), (1, 2, 60), lim) == (1, 2, 80)  # already below: not raised, not shrunk
    assert bounded(BACKLOG, (10,), (0,), None) == (1,)  # hard bounds hold without limits


def test_the_memory_cap_composes_with_the_operators_limits() -> None:
    """One clamp path: the memory cap is hard (it brings a value beyond it
    down, whatever the operator configured); the operator's cap and floor
    work within it."""
    lim = Limits(floor=(0, 0, 800), cap=(10**9, 10**9, 500))
    assert bounded(RMEM, (1, 2, 300), (1, 2, 900), None, 600) == (1, 2, 600)  # growth stops at the memory cap
    assert bounded(RMEM, (1, 2, 300), (1, 2, 900), lim, 600) == (1, 2, 500)  # a lower operator cap stops it first
    assert bounded(RMEM, (1, 2, 300), (1, 2, 900), lim, 400) == (1, 2, 400)  # a higher one does not lift it
    assert bounded(RMEM, (700, 2, 9000), (700, 2, 9000), None, 600) == (600, 2, 600)  # beyond it: brought down
    assert bounded(RMEM, (1, 2, 9000), (1, 2, 850), lim, 600) == (1, 2, 600)  # the operator's floor is no excuse
    assert bounded(BACKLOG, (10,), (50,), None, 0) == (1,)  # never below the hard lower bound


def test_the_store_applies_the_tunables_declared_memory_cap() -> None:
    from pybpftune import hostmem

    capped = Tunable(1, "net.core.netdev_max_backlog", 1, lower=1, ceiling=lambda m: m.total_bytes >> 20)

    class Capped(Grower):
        tunables = (RMEM, capped)

    ns = Namespaces()
    backend = MemorySysctl(
        {"net.ipv4.tcp_rmem": (4096, 131072, 131072), "net.core.netdev_max_backlog": (1000,)},
        global_cookie=ns.global_cookie,
    )
    store = TunableStore(backend, ns)
    tuner = Capped(TunerContext(store, ns, Steps(4)), 0)
    store.register(tuner)
    tuner.start()
    with hostmem.override(hostmem.HostMemory(2 << 30)):
        assert tuner.ceiling(1) == 2048 and tuner.highest(1) == 2048
        assert grow(tuner, ns.global_cookie, (5000,), tunable=1)
    assert backend.read("net.core.netdev_max_backlog") == (2048,)
    tuner.memory = hostmem.HostMemory(1 << 30)  # a tuner's own memory wins over the host's
    assert grow(tuner, ns.global_cookie, (5000,), tunable=1)
    assert backend.read("net.core.netdev_max_backlog") == (1024,)


def test_caps_per_namespace_kind() -> None:
    limits = {"net.ipv4.tcp_rmem": TunableLimits(Limits(cap=1 << 20), netns=Limits(cap=200_000))}
    tuner, store = make(limits)
    glob = tuner.ctx.namespaces.global_cookie
    other = glob + 1000
    assert grow(tuner, other, (4096, 131072, 400_000))
    assert store.backend.read("net.ipv4.tcp_rmem", other) == (4096, 131072, 200_000)
    assert not grow(tuner, other, (4096, 131072, 250_000)), "at the cap: nothing to do"
    assert grow(tuner, glob, (4096, 131072, 400_000))
    assert store.backend.read("net.ipv4.tcp_rmem", glob) == (4096, 131072, 400_000)
    assert grow(tuner, glob, (4096, 131072, 4 << 20))
    assert store.backend.read("net.ipv4.tcp_rmem", glob) == (4096, 131072, 1 << 20)
    # The tuner learns what was written, not what it proposed (tcp_buffer
    # compares later events with it: the proposal would make them all "stale").
    assert tuner.seen == [(4096, 131072, 200_000), (4096, 131072, 400_000), (4096, 131072, 1 << 20)]


def test_a_reload_replaces_the_limits() -> None:
    tuner, store = make({"net.core.netdev_max_backlog": TunableLimits(Limits(cap=1200))})
    glob = tuner.ctx.namespaces.global_cookie
    assert grow(tuner, glob, (2000,), tunable=1)
    assert store.backend.read("net.core.netdev_max_backlog") == (1200,)
    store.limits = {"net.core.netdev_max_backlog": TunableLimits(Limits(cap=1500))}
    assert grow(tuner, glob, (2000,), tunable=1)
    assert store.backend.read("net.core.netdev_max_backlog") == (1500,)


def test_advice_writes_nothing_and_is_deduplicated(caplog: pytest.LogCaptureFixture) -> None:
    tuner, store = make(advice=True)
    caplog.set_level(logging.DEBUG, logger="pybpftune")
    glob = tuner.ctx.namespaces.global_cookie
    other = glob + 77
    store.namespaces._by_cookie[other] = NetnsRef(other, 1, "/run/netns/blue")
    for _ in range(3):
        assert not grow(tuner, other, (4096, 131072, 163840))
    assert not grow(tuner, glob, (4096, 131072, 163840))
    assert not grow(tuner, other, (4096, 131072, 204800))
    assert isinstance(store.backend, MemorySysctl) and store.backend.writes == []
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    advice = [m for m in info if m.startswith("Advice: ")]
    # The same advice three times is logged once (then at debug), a new value again.
    assert advice == [
        'Advice: ip netns exec blue sysctl -w net.ipv4.tcp_rmem="4096 131072 163840"',
        'Advice: sysctl -w net.ipv4.tcp_rmem="4096 131072 163840"',
        'Advice: ip netns exec blue sysctl -w net.ipv4.tcp_rmem="4096 131072 204800"',
    ]
    assert "Due to more traffic would change net.ipv4.tcp_rmem(min default max) from" in caplog.text
    current = store.history.advice()
    assert [(a.latest.netns_cookie, a.latest.new, a.count) for a in current] == [
        (other, (4096, 131072, 204800), 4),
        (glob, (4096, 131072, 163840), 1),
    ]
    assert len(store.history.changes) == 3, "the same advice again is counted, not listed again"
    store.mark_gone(other, "deleted")
    assert [a.latest.netns_cookie for a in store.history.advice()] == [glob]


def test_a_namespace_without_a_known_path_has_no_command(caplog: pytest.LogCaptureFixture) -> None:
    tuner, store = make(advice=True)
    caplog.set_level(logging.INFO, logger="pybpftune")
    grow(tuner, tuner.ctx.namespaces.global_cookie + 5, (4096, 131072, 163840))
    assert store.history.advice()[0].latest.command is None
    assert "Advice: no command can apply net.ipv4.tcp_rmem" in caplog.text


def test_changes_are_kept_with_everything_a_query_shows() -> None:
    tuner, store = make()
    glob = tuner.ctx.namespaces.global_cookie
    grow(tuner, glob, (4096, 131072, 163840))
    (change,) = store.history.changes
    assert (change.tuner, change.tunable, change.scenario, change.netns_cookie, change.global_ns) == (
        "grower",
        "net.ipv4.tcp_rmem",
        "need more",
        glob,
        True,
    )
    assert (change.old, change.new, change.reason, change.advice) == (
        (4096, 131072, 131072),
        (4096, 131072, 163840),
        "more traffic",
        False,
    )
    assert change.command == 'sysctl -w net.ipv4.tcp_rmem="4096 131072 163840"'
    assert store.history.advice() == []
    [(t, cookie, original, current)] = store.changed_values(tuner)
    assert (t.name, cookie) == ("net.ipv4.tcp_rmem", glob)
    assert (original, current) == ((4096, 131072, 131072), (4096, 131072, 163840))


def test_history_is_bounded() -> None:
    from pybpftune.history import Change, History

    h = History(max_changes=3, max_advice=2)
    for i in range(5):
        h.record(Change(float(i), "t", f"x{i}", "s", i, False, (0,), (i,), "r", True, None))
    assert [c.tunable for c in h.changes] == ["x2", "x3", "x4"] and h.forgotten == 2
    assert [a.latest.tunable for a in h.advice()] == ["x3", "x4"]
