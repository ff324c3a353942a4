"""The namespace registry's costs and the store's handling of vanished namespaces.

No namespaces are created here: a fake clock drives the scan rate limits and a
backend double stands for a namespace that disappears under a write.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator

import pytest

from pybpftune import netns as netns_mod
from pybpftune.netns import Namespaces, NetnsGone
from pybpftune.store import GONE, TunableStore
from pybpftune.sysctl import MemorySysctl, Values
from pybpftune.tuner import Proposal, Scenario, Steps, Tunable, Tuner, TunerContext


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_miss_scans_processes_at_most_once_per_interval() -> None:
    clock = Clock()
    ns = Namespaces(clock=clock)
    unknown = 2**62 + 12345
    for _ in range(50):
        assert ns.resolve(unknown) is None
    assert ns.process_scans == 1
    assert ns.mount_scans == 1
    clock.now += netns_mod.MOUNT_SCAN_INTERVAL
    ns.resolve(unknown)
    assert (ns.mount_scans, ns.process_scans) == (2, 1)
    clock.now += netns_mod.PROCESS_SCAN_INTERVAL
    ns.resolve(unknown)
    assert ns.process_scans == 2


def test_gone_namespaces_cost_nothing_and_are_reported_once() -> None:
    ns = Namespaces(clock=Clock())
    assert ns.mark_gone(777) is True
    assert ns.mark_gone(777) is False
    assert ns.is_gone(777)
    assert ns.resolve(777) is None
    assert (ns.mount_scans, ns.process_scans) == (0, 0)
    assert ns.mark_gone(ns.global_cookie) is False
    assert not ns.is_gone(ns.global_cookie)


def test_the_gone_set_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns_mod, "GONE_MAX", 3)
    ns = Namespaces(clock=Clock())
    for c in range(10, 16):
        ns.mark_gone(c)
    assert not ns.is_gone(10)
    assert ns.is_gone(15)


def test_kernel_reported_pair_needs_no_setns() -> None:
    ns = Namespaces(clock=Clock())
    me = "/proc/self/ns/net"
    inode = os.stat(me).st_ino
    # Pretend our own inode belongs to a new namespace the kernel reported.
    ns._cookie_by_inode.pop(inode, None)
    assert ns.learn(999_999, inode, me) is True
    ref = ns.resolve(999_999)
    assert ref is not None and ref.path == me
    assert ns.entered_to_learn == 0


def test_inotify_records_queue_new_entries_and_forget_deleted_ones(tmp_path: object) -> None:
    ns = Namespaces(clock=Clock())
    wd = 7
    ns._watch_wds[wd] = str(netns_mod.RUN_NETNS)

    def record(mask: int, name: str) -> bytes:
        raw = name.encode() + b"\0" * (16 - len(name))
        return struct.pack("iIII", wd, mask, 0, len(raw)) + raw

    ns._inotify_records(record(netns_mod.IN_CREATE, "blue"))
    assert f"{netns_mod.RUN_NETNS}/blue" in ns._pending
    ns._by_cookie[55] = netns_mod.NetnsRef(55, 1, f"{netns_mod.RUN_NETNS}/blue")
    ns._inotify_records(record(netns_mod.IN_DELETE, "blue"))
    assert f"{netns_mod.RUN_NETNS}/blue" not in ns._pending
    assert 55 not in ns._by_cookie


class VanishingSysctl(MemorySysctl):
    """Namespaces in ``vanished`` are gone: entering them fails, as in the kernel."""

    def __init__(self, global_cookie: int) -> None:
        super().__init__({"net.ipv4.tcp_fin_timeout": (60,)}, global_cookie=global_cookie)
        self.vanished: set[int] = set()
        self.attempts = 0

    def read(self, name: str, netns_cookie: int | None = None) -> Values:
        if netns_cookie in self.vanished:
            self.attempts += 1
            raise NetnsGone(f"network namespace with cookie {netns_cookie} is gone")
        return super().read(name, netns_cookie)


class FinTuner(Tuner):
    name = "fin"
    tunables = (Tunable(0, "net.ipv4.tcp_fin_timeout", 1, namespaced=True),)
    scenarios = (Scenario(0, "step"),)


def test_a_namespace_vanishing_mid_write_is_marked_gone_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    ns = Namespaces(clock=Clock())
    backend = VanishingSysctl(ns.global_cookie)
    store = TunableStore(backend, ns)
    tuner = FinTuner(TunerContext(store, ns, Steps(4)), 0)
    store.register(tuner)
    caplog.set_level(logging.DEBUG, logger="pybpftune")
    assert store.apply(tuner, Proposal(0, 0, 4242, (61,), "step"))
    backend.vanished.add(4242)
    for i in range(100):
        assert not store.apply(tuner, Proposal(0, 0, 4242, (62 + i,), "step"))
    assert backend.attempts == 1
    assert caplog.text.count("network namespace (cookie 4242) is gone") == 1
    assert store.netns_state(tuner, 4242) == GONE
    # Other namespaces and the global one are still tuned.
    assert store.apply(tuner, Proposal(0, 0, 4343, (61,), "step"))
    assert store.apply(tuner, Proposal(0, 0, ns.global_cookie, (61,), "step"))


def test_a_namespace_not_found_by_inode_is_not_searched_for_on_every_event() -> None:
    clock = [100.0]
    ns = netns_mod.Namespaces(clock=lambda: clock[0])
    scans: list[int] = []

    def no_processes() -> Iterator[str]:
        scans.append(1)
        return iter(())

    ns._process_candidates = no_processes  # type: ignore[method-assign]
    gone = 2**40 + 7  # no namespace has this inode
    assert ns.path_of_inode(gone) is None and ns.path_of_inode(gone) is None
    assert len(scans) == 1
    clock[0] += netns_mod.PROCESS_SCAN_INTERVAL
    assert ns.path_of_inode(gone) is None
    assert len(scans) == 2
