"""Start and stop edges, driven on a daemon with BPF-free tuners (no root):
a tuner whose own code raises anything while it starts, or in its handler,
costs one line and is skipped, and what it wrote before raising is put back."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pybpftune import daemon as daemon_module
from pybpftune.daemon import Daemon, DaemonConfig
from pybpftune.events import Event
from pybpftune.registry import Plugin
from pybpftune.startup import EarlyProbe
from pybpftune.support import PROBE_PROGRAMS, KindSupport, Support
from pybpftune.sysctl import MemorySysctl
from pybpftune.tuner import NOTHING, Decision, Proposal, Scenario, Tunable, Tuner, TunerContext
from tests.unit.test_plugins import Lines, lines

__all__ = ["lines"]  # the fixture, shared with test_plugins

FIN = "net.ipv4.tcp_fin_timeout"
SOMAXCONN = "net.core.somaxconn"


def raising(kind: str) -> BaseException:
    return {
        "RuntimeError": RuntimeError("boom"),
        "KeyError": KeyError("missing"),
        "SystemExit": SystemExit(3),
    }[kind]


class Writer(Tuner):
    """Writes tcp_fin_timeout, then raises what ``fail`` holds."""

    name = "writer"
    tunables = (Tunable(0, FIN, 1, lower=1, upper=600),)
    scenarios = (Scenario(0, "step", "A step."),)
    fail: BaseException | None = None

    def start(self) -> None:
        glob = self.ctx.namespaces.global_cookie
        assert self.apply(Proposal(0, 0, glob, (61,), "step"))
        if self.fail is not None:
            raise self.fail

    def decide(self, event: Event) -> Decision:
        glob = self.ctx.namespaces.global_cookie
        self.apply(Proposal(0, 0, glob, (70,), "step"))
        raise ValueError(f"rule bug {event.scenario_id}")


class Keep(Tuner):
    name = "keep"
    tunables = (Tunable(0, SOMAXCONN, 1),)

    def decide(self, event: Event) -> Decision:
        return NOTHING


@pytest.fixture
def backend() -> MemorySysctl:
    return MemorySysctl({FIN: (60,), SOMAXCONN: (4096,)})


def new_daemon(tmp_path: Path, backend: MemorySysctl, rollback: bool = False) -> Daemon:
    d = Daemon(DaemonConfig(state_dir=tmp_path / "state", rollback=rollback, cache_dir=None), backend=backend)
    backend.global_cookie = d.namespaces.global_cookie
    backend.values = {(backend.global_cookie, k[1]): v for k, v in backend.values.items()}
    d._ctx = TunerContext(d.store, d.namespaces, d.steps, rollback=rollback)
    return d


@pytest.fixture
def daemon(tmp_path: Path, backend: MemorySysctl) -> Iterator[Daemon]:
    d = new_daemon(tmp_path, backend)
    try:
        yield d
    finally:
        d.close()


def fin(backend: MemorySysctl) -> tuple[int, ...]:
    return backend.values[(backend.global_cookie, FIN)]


def failing(kind: str) -> type[Writer]:
    return type("FailingWriter", (Writer,), {"fail": raising(kind)})


@pytest.mark.parametrize("kind", ["RuntimeError", "KeyError", "SystemExit"])
@pytest.mark.parametrize("rollback", [False, True], ids=["no-R", "R"])
def test_a_start_that_raises_is_one_line_and_undone_whatever_R_says(
    tmp_path: Path, backend: MemorySysctl, lines: Lines, kind: str, rollback: bool
) -> None:
    """The start-up path: the tuner's object is up (none here) and start() raises."""
    d = new_daemon(tmp_path, backend, rollback)
    try:
        cls = failing(kind)
        tuner = cls(d._ctx, 0)  # type: ignore[arg-type]
        d.store.register(tuner)
        d._finish_start(Plugin(cls), tuner, None)
        assert d.tuners == [] and "writer" in d.disabled
        assert fin(backend) == (60,), "what it wrote before raising is put back"
        [line] = [m for m in lines.text if "tuner writer disabled" in m]
        assert line == f"tuner writer disabled: start failed: {raising(kind)!r}"
        assert all(r.exc_info is None for r in lines.records), "no traceback"
    finally:
        d.close()


@pytest.mark.parametrize("kind", ["RuntimeError", "KeyError", "SystemExit"])
def test_a_hot_start_that_raises_is_one_line_and_undone(
    daemon: Daemon, backend: MemorySysctl, lines: Lines, kind: str
) -> None:
    """A plugin added while running, or switched on by a reload."""
    assert daemon._start_tuner(Plugin(failing(kind))) is None
    assert daemon.tuners == [] and fin(backend) == (60,)
    assert f"tuner writer disabled: start failed: {raising(kind)!r}" in lines.text
    assert all(r.exc_info is None for r in lines.records)


class BadTunables(Writer):
    """Its declaration is broken: even the rollback of it raises."""

    fail = RuntimeError("boom")

    def start(self) -> None:
        type(self).tunables = 5  # type: ignore[assignment]
        raise self.fail


def test_a_failing_undo_does_not_crash_the_daemon(daemon: Daemon, lines: Lines) -> None:
    cls = type("Bad", (BadTunables,), {})
    assert daemon._start_tuner(Plugin(cls)) is None
    assert "tuner writer disabled: start failed: RuntimeError('boom')" in lines.text
    assert any(m.startswith("tuner writer: cannot undo what it wrote before it failed: ") for m in lines.text)
    assert all(r.exc_info is None for r in lines.records)


def deliver(d: Daemon, tuner_id: int, scenario: int) -> None:
    """One record through the ring buffer's dispatch, as a poll would deliver it."""
    d.ring._on_record(Event.build(tuner_id, scenario).data)


@pytest.mark.parametrize("rollback", [False, True], ids=["no-R", "R"])
def test_a_handler_that_raises_again_and_again_is_one_line(
    tmp_path: Path, backend: MemorySysctl, lines: Lines, rollback: bool
) -> None:
    """Every event of a batch raises: the tuner is stopped once, with one line;
    its changes are handled as at exit (rolled back with -R only), and the
    events still queued for it are not counted as lost."""
    d = new_daemon(tmp_path, backend, rollback)
    try:
        writer = d._start_tuner(Plugin(Writer))
        keep = d._start_tuner(Plugin(Keep))
        assert writer is not None and keep is not None
        for scenario in range(5):
            deliver(d, writer.id, scenario)
        d.ring._raise_errors()
        deliver(d, writer.id, 9)  # queued before it was stopped, read after
        d.ring._raise_errors()
        assert d.tuners == [keep]
        assert [m for m in lines.text if "tuner writer disabled" in m] == [
            "tuner writer disabled: its event handler failed: ValueError('rule bug 0')"
        ]
        assert d.disabled["writer"] == "handler failed: ValueError('rule bug 0')"
        assert fin(backend) == ((60,) if rollback else (70,))
        assert d.loss.unknown == 0
        assert all(r.exc_info is None for r in lines.records)
    finally:
        d.close()


class StopRaises(Writer):
    def stop(self) -> None:
        raise RuntimeError("stop bug")


def test_a_handler_failure_whose_stop_raises_still_disables_it(
    tmp_path: Path, backend: MemorySysctl, lines: Lines
) -> None:
    d = new_daemon(tmp_path, backend, rollback=True)
    try:
        tuner = d._start_tuner(Plugin(StopRaises))
        assert tuner is not None
        deliver(d, tuner.id, 1)
        d.ring._raise_errors()
        assert d.tuners == [] and "writer" in d.disabled
        assert fin(backend) == (60,), "rolled back (-R) although its stop() raised"
        assert "stopping tuner writer failed: RuntimeError('stop bug')" in lines.text
        assert all(r.exc_info is None for r in lines.records)
    finally:
        d.close()


def test_a_tick_that_exits_is_one_line(daemon: Daemon, backend: MemorySysctl, lines: Lines) -> None:
    class Exits(Keep):
        name = "exits"

        def tick(self, now: float) -> float | None:
            sys.exit(4)

    tuner = daemon._start_tuner(Plugin(Exits))
    assert tuner is not None
    daemon._tick(tuner)
    assert daemon.tuners == [] and daemon.disabled["exits"] == "handler failed: SystemExit(4)"
    assert all(r.exc_info is None for r in lines.records)


# --- SIGTERM/SIGINT during start-up -------------------------------------------------------------


class First(Writer):
    """Writes, then a stop signal arrives (its handler runs as the kernel would run it)."""

    name = "first"

    def start(self) -> None:
        super().start()
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler), "SIGTERM would end the process half-way through start-up"
        handler(signal.SIGTERM, None)


class Second(Keep):
    name = "second"
    started = False

    def start(self) -> None:
        type(self).started = True


def start_with(d: Daemon, monkeypatch: pytest.MonkeyPatch, *classes: type[Tuner]) -> None:
    """start() without BPF: the probe's answer given, these tuners selected."""
    kinds = {k: KindSupport(k, True, True) for k in PROBE_PROGRAMS}
    monkeypatch.setattr(daemon_module, "assemble", lambda kinds: Support(kinds, True, True, True, None, ""))
    monkeypatch.setattr(daemon_module, "select", lambda *args: [Plugin(c) for c in classes])
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    d._early = EarlyProbe(d._loader, "", kinds)
    d.start()


@pytest.mark.parametrize("rollback", [False, True], ids=["no-R", "R"])
def test_a_stop_signal_during_start_up_stops_cleanly(
    tmp_path: Path, backend: MemorySysctl, lines: Lines, monkeypatch: pytest.MonkeyPatch, rollback: bool
) -> None:
    Second.started = False
    d = new_daemon(tmp_path, backend, rollback)
    try:
        start_with(d, monkeypatch, First, Second)
        assert not Second.started, "no tuner is started after the signal"
        assert [t.name for t in d.tuners] == ["first"]
        assert "asked to stop during start-up: 1 tuner(s) not started" in lines.text
        d.run()  # returns at once
        assert not d.started
    finally:
        d.close()
    assert fin(backend) == ((60,) if rollback else (61,))
    assert "bpftune stopped" in lines.text
    assert "bpftune started" not in lines.text
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "restored by close()"
