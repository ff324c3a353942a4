"""Lost events: one counter object fed by the ring buffer and the objects'
drop counters, said at most once per interval, kept for status and metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pybpftune import daemon as daemon_module
from pybpftune.daemon import Daemon, DaemonConfig
from pybpftune.events import Event
from pybpftune.loss import EventLoss
from pybpftune.query import Request, answer
from pybpftune.registry import Plugin
from pybpftune.sysctl import MemorySysctl
from pybpftune.testing import SyntheticObject
from pybpftune.tuner import NOTHING, Decision, Tunable, Tuner, TunerContext
from tests.unit.test_plugins import Lines, lines

__all__ = ["lines"]  # the fixture, shared with test_plugins

LOST = "before a tuner saw"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def said(lines: Lines) -> list[str]:
    return [m for m in lines.text if LOST in m]


def test_said_once_per_interval_and_only_when_something_new_was_lost(lines: Lines) -> None:
    clock = Clock()
    loss = EventLoss(interval=60, clock=clock)
    assert loss.due() is None and not loss.report()
    loss.bpf_count(3, 5)
    loss.malformed_event()
    assert loss.report()
    assert said(lines) == [
        "lost 6 events before a tuner saw them (since start: 5 because the ring buffer was full, 1 malformed, "
        "0 for an unknown tuner); an administrator's change to a tuned sysctl may have been missed"
    ]
    assert [r.levelname for r in lines.records if LOST in r.getMessage()] == ["WARNING"]
    loss.unknown_event()
    clock.now += 30
    assert not loss.report(), "not twice within the interval"
    assert loss.due() == 160
    clock.now += 30
    assert loss.report()
    assert said(lines)[-1].startswith("lost 1 event before a tuner saw it (since start: 5 because")
    clock.now += 600
    assert not loss.report(), "nothing new: nothing said"
    assert len(said(lines)) == 2


def test_object_counters_are_read_as_deltas_and_outlive_their_object() -> None:
    loss = EventLoss()
    loss.bpf_count(1, 4)
    loss.bpf_count(1, 4)
    loss.bpf_count(2, 3)
    loss.bpf_count(1, 10)
    assert loss.ring_full == 13
    loss.forget(1)
    assert loss.ring_full == 13, "a closed object's drops stay counted"
    loss.bpf_count(2, 3)
    assert loss.counts().total == 13


class Quiet(Tuner):
    name = "quiet"
    tunables = (Tunable(0, "net.core.somaxconn", 1),)

    def decide(self, event: Event) -> Decision:
        return NOTHING


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(
        DaemonConfig(state_dir=tmp_path / "state", cache_dir=None),
        backend=MemorySysctl({"net.core.somaxconn": (4096,)}),
    )
    d._ctx = TunerContext(d.store, d.namespaces, d.steps)
    try:
        yield d
    finally:
        d.close()


DROPS = "bpftune_ringbuf_drops"


def with_object(d: Daemon) -> tuple[Tuner, SyntheticObject]:
    """A tuner whose object counts ring-buffer drops, as the daemon reads it
    (reading it once closed raises, as a real object's read would)."""
    tuner = d._start_tuner(Plugin(Quiet))
    assert tuner is not None
    loaded = SyntheticObject(globals={DROPS: 0})
    tuner.loaded = loaded
    return tuner, loaded


def status(d: Daemon) -> tuple[str, dict[str, int]]:
    text = answer(d, Request("status"))
    own = json.loads(answer(d, Request("status", json=True)))["pybpftune"]
    return text, {k: own[k] for k in ("events_dropped", "events_malformed", "events_unknown")}


def test_status_counts_drops_of_tuners_stopped_since(daemon: Daemon) -> None:
    tuner, obj = with_object(daemon)
    obj.globals[DROPS] = 7
    daemon.ring._on_record(b"\0\0")  # shorter than a header
    daemon.ring._on_record(Event.build(55, 1).data)  # no tuner ever had id 55
    text, own = status(daemon)
    assert "7 dropped by the ring buffer, 1 malformed, 1 for an unknown tuner" in text
    assert own == {"events_dropped": 7, "events_malformed": 1, "events_unknown": 1}
    obj.globals[DROPS] = 9
    daemon._stop_tuner(tuner, summarize=False)  # its counter is read once more, then closed
    assert obj.closed
    _text, own = status(daemon)
    assert own["events_dropped"] == 9


def test_the_loop_reads_and_says_losses_after_events_drain(
    daemon: Daemon, lines: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon_module, "LOSS_CHECK_S", 0.01)
    _tuner, obj = with_object(daemon)

    def drain_and_run() -> None:
        daemon._drain_ring()
        daemon.loop.call_later(0.15, daemon.loop.stop)
        daemon.loop._stopping = False
        daemon.loop.run()

    drain_and_run()
    assert said(lines) == [] and daemon._loss_timer is None, "nothing lost: nothing said, no timer left"
    obj.globals[DROPS] = 300
    drain_and_run()
    [line] = said(lines)
    assert line.startswith("lost 300 events before a tuner saw them (since start: 300 because the ring buffer")
    obj.globals[DROPS] = 301
    drain_and_run()
    assert len(said(lines)) == 1, "once per interval"
    assert daemon._loss_timer is not None and daemon._loss_timer.when > daemon.loop.clock() + 50
