"""SIGHUP's reload, driven directly on a daemon with BPF-free tuners (no root):
every setting the file holds is applied, or none is."""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pybpftune.daemon import Daemon, DaemonConfig, Overrides
from pybpftune.registry import Plugin
from pybpftune.sysctl import MemorySysctl
from pybpftune.tuner import Proposal, Scenario, Tunable, Tuner, TunerContext


class Fin(Tuner):
    name = "fin"
    tunables = (Tunable(0, "net.ipv4.tcp_fin_timeout", 1, lower=1, upper=600),)
    scenarios = (Scenario(0, "step", "A step."),)


class Keep(Tuner):
    name = "keep"
    tunables = (Tunable(0, "net.core.somaxconn", 1),)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Daemon, Path]]:
    cfg = tmp_path / "config.toml"
    cfg.write_text("")
    config = DaemonConfig(state_dir=tmp_path / "state", config_path=cfg, config_explicit=True)
    d = Daemon(config, backend=MemorySysctl({"net.ipv4.tcp_fin_timeout": (60,), "net.core.somaxconn": (4096,)}))
    # What start() does, without BPF (and so without root): the tuners -a
    # allows, a context, the tuners started, the query socket.
    d.classes = [Fin, Keep]
    d._ctx = TunerContext(d.store, d.namespaces, d.steps)
    for cls in d.classes:
        assert d._start_tuner(Plugin(cls)) is not None
    d._serve_queries()
    try:
        yield d, cfg
    finally:
        d.close()


def fin(d: Daemon) -> Tuner:
    return next(t for t in d.tuners if t.name == "fin")


def test_a_reload_applies_every_setting(daemon: tuple[Daemon, Path], caplog: pytest.LogCaptureFixture) -> None:
    d, cfg = daemon
    caplog.set_level(logging.INFO, logger="pybpftune")
    glob = d.namespaces.global_cookie
    port = free_port()
    new_sock = cfg.parent / "other.sock"
    cfg.write_text(
        f'advice = true\nlearning_rate = 2\nrollback = true\nport = {port}\nsocket = "{new_sock}"\n'
        "[tuners.keep]\nenabled = false\n"
        '[tunables."net.ipv4.tcp_fin_timeout"]\ncap = 70\n'
    )
    old_sock = d.config.socket_path
    assert d.reload()
    assert d.store.advice and d.steps.rate == 2 and d.config.rollback and d._ctx is not None and d._ctx.rollback
    assert [t.name for t in d.tuners] == ["fin"]
    assert not old_sock.exists() and new_sock.is_socket()
    assert d.server is not None and f"127.0.0.1:{port}" in d.server.addresses
    line = next(r.getMessage() for r in caplog.records if "reloaded" in r.getMessage())
    assert line.startswith(f"configuration {cfg} reloaded: queries on ")
    for part in ("limits net.ipv4.tcp_fin_timeout: floor -, cap 70", "learning rate 2", "advice mode on", "keep off"):
        assert part in line
    # Advice now: nothing written; and the cap is in force.
    assert not fin(d).apply(Proposal(0, 0, glob, (90,), "step"))
    assert d.store.history.advice()[0].latest.new == (70,)
    # Back: keep switched on again, advice off, the old socket.
    cfg.write_text("")
    assert d.reload()
    assert sorted(t.name for t in d.tuners) == ["fin", "keep"] and not d.store.advice and d.steps.rate == 4
    assert old_sock.is_socket() and not new_sock.exists()


def test_flags_still_win_on_reload(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("learning_rate = 1\n")
    config = DaemonConfig(
        state_dir=tmp_path / "s", config_path=cfg, config_explicit=True, flags=Overrides(learning_rate=3)
    )
    d = Daemon(config, backend=MemorySysctl({}))
    try:
        assert d.reload()
        assert d.steps.rate == 3
    finally:
        d.close()


def test_an_invalid_file_changes_nothing(daemon: tuple[Daemon, Path], caplog: pytest.LogCaptureFixture) -> None:
    d, cfg = daemon
    cfg.write_text('[tunables."net.ipv4.tcp_fin_timeout"]\ncap = 70\n')
    assert d.reload()
    before = (dict(d.store.limits), d.steps.rate, d.store.advice, [t.name for t in d.tuners])
    caplog.set_level(logging.INFO, logger="pybpftune")
    cfg.write_text('advice = true\n[tuners.keep]\nenabled = false\n[tunables."net.ipv4.tcp_fin_timeout"]\ncap = 0\n')
    assert not d.reload()
    assert (dict(d.store.limits), d.steps.rate, d.store.advice, [t.name for t in d.tuners]) == before
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        f'configuration not reloaded, the current settings stay: {cfg}: tunables."net.ipv4.tcp_fin_timeout": '
        "cap 0 is below net.ipv4.tcp_fin_timeout's hard minimum 1"
    ]
    cfg.unlink()
    assert not d.reload(), "a file named with --config must still exist"
    assert d.server is not None and d.server.addresses == [str(d.config.socket_path)]


def test_a_port_in_use_keeps_the_old_endpoints(daemon: tuple[Daemon, Path]) -> None:
    d, cfg = daemon
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg.write_text(f'port = {port}\nsocket = "{cfg.parent / "x.sock"}"\n')
        assert not d.reload()
    assert d.config.port is None and d.config.socket_path == d.state.default_socket
    assert d.server is not None and d.server.addresses == [str(d.state.default_socket)]
    assert not (cfg.parent / "x.sock").exists()


def test_a_sighup_during_start_up_waits_for_the_last_tuner(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Tuners still loading were prepared with the old settings: the reload
    comes once the last one is up (and `tuners` says which are loading)."""
    cfg = tmp_path / "config.toml"
    cfg.write_text("learning_rate = 2\n")
    config = DaemonConfig(state_dir=tmp_path / "state", config_path=cfg, config_explicit=True, cache_dir=None)
    d = Daemon(config, backend=MemorySysctl({"net.ipv4.tcp_fin_timeout": (60,), "net.core.somaxconn": (4096,)}))
    caplog.set_level(logging.INFO, logger="pybpftune")
    try:
        d.classes = [Fin, Keep]
        d._ctx = TunerContext(d.store, d.namespaces, d.steps)
        assert d._start_tuner(Plugin(Fin)) is not None
        loading = Keep(d._ctx, 1)
        d._loading.append(loading)
        states = {s.name: (s.state, s.reason) for s in d.tuner_states()}
        assert states == {"fin": ("active", ""), "keep": ("inactive", "starting: its BPF object is being loaded")}
        d._reload_on_signal(signal.SIGHUP)
        d._reload_on_signal(signal.SIGHUP)
        assert d.steps.rate == 4, "not while a tuner is loading"
        d._loading.remove(loading)
        d._all_started()
        assert d.started and d.steps.rate == 2
        messages = [r.getMessage() for r in caplog.records]
        assert messages.count("SIGHUP during start-up: the configuration is re-read once every tuner is up") == 1
        assert sum("reloaded: learning rate 2" in m for m in messages) == 1
    finally:
        d.close()
