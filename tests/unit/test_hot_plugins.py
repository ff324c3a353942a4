"""The daemon's side of plugin directories, with BPF-free plugins (no root).

Files are really added to and removed from a watched directory; the daemon
reads the real inotify events.  The kernel-level counterpart with a BPF
plugin is tests/kernel/test_sample_tuner.py.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pybpftune.daemon import Daemon, DaemonConfig
from pybpftune.events import Event
from pybpftune.inotify import OVERFLOW, DirEvent, DirWatcher
from pybpftune.registry import PLUGIN_MODULE_PREFIX, Trust
from pybpftune.sysctl import MemorySysctl
from pybpftune.tuner import Tuner
from tests.unit.test_plugins import Lines, lines, plugin_source

__all__ = ["lines"]  # the fixture, shared with test_plugins

COUNTER = """\
    def start(self):
        self.seen = []

    def decide(self, event):
        if event.scenario_id == 7:
            raise ValueError("rule bug")
        self.seen.append(event.scenario_id)
        return []
"""


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Daemon, Path]]:
    plugins = tmp_path / "plugins"
    plugins.mkdir(mode=0o755)
    plugins.chmod(0o755)
    d = Daemon(DaemonConfig(state_dir=tmp_path / "state", libdirs=[str(plugins)]), backend=MemorySysctl())
    d.trust = Trust(uid=os.geteuid(), top=tmp_path)
    d.watcher = DirWatcher([plugins])
    try:
        yield d, plugins
    finally:
        d.close()


def add(plugins: Path, name: str, text: str, mode: int = 0o644) -> Path:
    """Write a plugin the way `install` does: whole, then closed."""
    path = plugins / f"{name}_tuner.py"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, mode)
    os.write(fd, text.encode())
    os.close(fd)
    return path


def running(d: Daemon, name: str) -> Tuner:
    [tuner] = [t for t in d.tuners if t.name == name]
    return tuner


def deliver(d: Daemon, tuner_id: int, scenario: int) -> None:
    """One record through the ring buffer's dispatch, as a poll would deliver it."""
    d.ring._on_record(Event.build(tuner_id, scenario).data)
    d.ring._raise_errors()


def test_added_removed_and_ids_never_reused(daemon: tuple[Daemon, Path], lines: Lines) -> None:
    d, plugins = daemon
    path = add(plugins, "counter", plugin_source("counter", body=COUNTER))
    d.service_plugins()
    first = running(d, "counter")
    assert f"added lib {path}, init succeeded" in lines.text
    deliver(d, first.id, 1)
    assert first.seen == [1]  # type: ignore[attr-defined]

    path.unlink()
    d.service_plugins()
    assert f"removed '{path}', fini tuner counter" in lines.text
    assert d.tuners == [] and path not in d.plugins
    assert not any(m.startswith(PLUGIN_MODULE_PREFIX + "counter") for m in sys.modules)

    add(plugins, "counter", plugin_source("counter", body=COUNTER))
    d.service_plugins()
    second = running(d, "counter")
    assert second.id != first.id
    # A late event of the removed tuner is dropped, not handed to its successor
    # (and not counted as lost: it was dropped on purpose).
    late = d.ring.dropped_late
    deliver(d, first.id, 2)
    assert second.seen == [] and d.ring.dropped_late == late + 1  # type: ignore[attr-defined]
    assert d.loss.counts().total == 0
    deliver(d, second.id, 3)
    assert second.seen == [3]  # type: ignore[attr-defined]


def test_a_changed_file_is_reloaded_and_an_unchanged_one_is_not(daemon: tuple[Daemon, Path], lines: Lines) -> None:
    d, plugins = daemon
    path = add(plugins, "counter", plugin_source("counter", body=COUNTER))
    d.service_plugins()
    first = running(d, "counter")
    os.close(os.open(path, os.O_WRONLY))  # opened for writing and closed, unchanged
    d.service_plugins()
    assert running(d, "counter") is first
    add(plugins, "counter", plugin_source("counter", description="v2", body=COUNTER))
    d.service_plugins()
    second = running(d, "counter")
    assert second is not first and second.description == "v2" and second.id > first.id
    assert lines.text.count(f"removed '{path}', fini tuner counter") == 1


def test_untrusted_and_broken_plugins_are_one_line_and_the_daemon_goes_on(
    daemon: tuple[Daemon, Path], lines: Lines
) -> None:
    d, plugins = daemon
    add(plugins, "ok", plugin_source("ok"))
    bad = add(plugins, "writable", plugin_source("writable"), mode=0o664)
    broken = add(plugins, "broken", "def x(:\n")
    raising = add(plugins, "raising", "raise RuntimeError('boom')\n")
    starter = add(plugins, "starter", plugin_source("starter", body="    def start(self):\n        raise KeyError(1)"))
    dup = plugins / "dup_tuner.py"
    d.service_plugins()
    add(plugins, "dup", plugin_source("ok"))
    d.service_plugins()
    assert [t.name for t in d.tuners] == ["ok"]
    text = lines.text
    assert any(m.startswith(f"refusing untrusted plugin '{bad}': ") for m in text)
    failed = f"added lib {broken}, init failed: cannot load plugin"
    assert any(m.startswith(failed) and "SyntaxError" in m for m in text)
    assert any(m.startswith(f"added lib {raising}, init failed") and "RuntimeError: boom (line 1)" in m for m in text)
    assert "tuner starter disabled: start failed: KeyError(1)" in text
    assert f"added lib {starter}, init failed" in text
    assert f"added lib {dup}, init failed: a tuner named 'ok' is already running" in text
    assert all(r.exc_info is None for r in lines.records), "no tracebacks"
    assert set(d.plugins) == {plugins / "ok_tuner.py"}


def test_a_plugin_whose_rules_raise_is_disabled_with_one_line(daemon: tuple[Daemon, Path], lines: Lines) -> None:
    d, plugins = daemon
    path = add(plugins, "counter", plugin_source("counter", body=COUNTER))
    add(plugins, "other", plugin_source("other", body=COUNTER))
    d.service_plugins()
    counter = running(d, "counter")
    deliver(d, counter.id, 7)
    assert [t.name for t in d.tuners] == ["other"]
    [line] = [m for m in lines.text if "tuner counter disabled" in m]
    assert line == "tuner counter disabled: its event handler failed: ValueError('rule bug')"
    assert all(r.exc_info is None for r in lines.records)
    # Its file going away later is noted, nothing is stopped twice.
    path.unlink()
    d.service_plugins()
    assert f"removed '{path}' (tuner counter was not running)" in lines.text


def test_tuner_ids_run_out_rather_than_repeat(daemon: tuple[Daemon, Path], lines: Lines) -> None:
    d, plugins = daemon
    d._next_id = 63
    path = add(plugins, "last", plugin_source("last"))
    d.service_plugins()
    assert running(d, "last").id == 63
    path.unlink()
    d.service_plugins()
    add(plugins, "last", plugin_source("last"))
    d.service_plugins()
    assert d.tuners == []
    assert any("all 64 tuner ids were used since the daemon started; restart it" in m for m in lines.text)


STEPPER = """\
    tunables = (Tunable(0, "net.ipv4.tcp_fin_timeout", 1, lower=1, upper=600),)

    def decide(self, event):
        now = self.current(0)[0]
        return [Proposal(0, 0, self.ctx.namespaces.global_cookie, (now + 1,), "step")]
"""


def test_a_plugin_added_back_keeps_the_true_original(tmp_path: Path, lines: Lines) -> None:
    """Without -R a removed tuner's change stays; when the tuner comes back, the
    value it wrote must not become its 'original' (nor be journaled as one)."""
    plugins = tmp_path / "plugins"
    plugins.mkdir(mode=0o755)
    plugins.chmod(0o755)
    backend = MemorySysctl()
    d = Daemon(DaemonConfig(state_dir=tmp_path / "state", libdirs=[str(plugins)]), backend=backend)
    backend.global_cookie = d.namespaces.global_cookie
    backend.values[(backend.global_cookie, "net.ipv4.tcp_fin_timeout")] = (60,)
    d.trust = Trust(uid=os.geteuid(), top=tmp_path)
    d.watcher = DirWatcher([plugins])
    source = plugin_source("stepper", body=STEPPER).replace(
        "from pybpftune.tuner import Scenario, Tuner", "from pybpftune.tuner import Proposal, Scenario, Tunable, Tuner"
    )
    try:
        path = add(plugins, "stepper", source)
        d.service_plugins()
        deliver(d, running(d, "stepper").id, 0)
        path.unlink()
        d.service_plugins()
        assert backend.read("net.ipv4.tcp_fin_timeout") == (61,)
        add(plugins, "stepper", source)
        d.service_plugins()
        again = running(d, "stepper")
        deliver(d, again.id, 0)
        assert backend.read("net.ipv4.tcp_fin_timeout") == (62,)
        assert d.store.original(again, 0) == (60,)
        journal = [json.loads(line) for line in d.state.journal_path.read_text().splitlines()]
        assert [(r["op"], r["value"]) for r in journal if r["op"] == "original"] == [("original", [60])]
    finally:
        d.close()
    assert any("# sysctl 'net.ipv4.tcp_fin_timeout' changed from (60) -> (62)" in m for m in lines.text)


def test_the_allow_list_applies_to_added_plugins(tmp_path: Path, lines: Lines) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir(mode=0o755)
    plugins.chmod(0o755)
    config = DaemonConfig(state_dir=tmp_path / "state", libdirs=[str(plugins)], allow=["wanted_tuner.py"])
    with Daemon(config, backend=MemorySysctl()) as d:
        d.trust = Trust(uid=os.geteuid(), top=tmp_path)
        d.watcher = DirWatcher([plugins])
        other = add(plugins, "other", plugin_source("other"))
        add(plugins, "wanted", plugin_source("wanted"))
        d.service_plugins()
        assert [t.name for t in d.tuners] == ["wanted"]
        assert f"plugin '{other}' ignored: tuner 'other' is not one of the -a tuners" in lines.text
        assert not any(m.startswith(PLUGIN_MODULE_PREFIX + "other") for m in sys.modules)


def test_lost_events_rescan_the_directory(daemon: tuple[Daemon, Path], lines: Lines) -> None:
    """When the kernel's event queue overflowed, the directory itself says
    what was added and removed meanwhile."""
    d, plugins = daemon
    gone = add(plugins, "gone", plugin_source("gone"))
    kept = add(plugins, "kept", plugin_source("kept"))
    d.service_plugins()
    assert d.watcher is not None
    gone.unlink()
    new = add(plugins, "new", plugin_source("new"))
    d.watcher.read_events()  # lost
    d.plugin_event(DirEvent(OVERFLOW, plugins))
    assert sorted(t.name for t in d.tuners) == ["kept", "new"]
    assert set(d.plugins) == {kept, new}
    assert f"removed '{gone}', fini tuner gone" in lines.text
