"""The crash-safe journal of originals: numeric and string sysctls, old lines,
and what the next start does with a dead daemon's journal (with and without -R)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from pybpftune.daemon import Daemon, DaemonConfig
from pybpftune.netns import Namespaces
from pybpftune.state import JournalEntry, StateDir
from pybpftune.store import TunableStore
from pybpftune.sysctl import MemorySysctl
from pybpftune.tuner import Steps, TunerContext
from pybpftune.tuners.tcp_conn import TcpConnTuner

ALLOWED = "net.ipv4.tcp_allowed_congestion_control"
DEFAULT_CC = "net.ipv4.tcp_congestion_control"
FIN = "net.ipv4.tcp_fin_timeout"
# Above PID_MAX_LIMIT (2^22): never a live process, so its journal counts as a dead daemon's.
DEAD_PID = (1 << 22) + 7
NS_COOKIE = 4242


def test_string_original_round_trips_without_a_numeric_original(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    text = JournalEntry(os.getpid(), "tcp_conn", ALLOWED, 1, True, original_text="reno bbr")
    numeric = JournalEntry(os.getpid(), "demo", FIN, 1, True, (60,))
    state.record_original(text)
    state.record_original(numeric)
    state.close()
    assert StateDir.read_journal(state.journal_path) == [text, numeric]
    first = json.loads(state.journal_path.read_text().splitlines()[0])
    # No "original" key: a daemon from before string originals skips the line
    # (KeyError) instead of writing digits parsed out of the string.
    assert "original" not in first and first["original_text"] == "reno bbr"


def test_a_line_written_before_string_originals_still_loads(tmp_path: Path) -> None:
    old = '{"pid": 7, "tuner": "demo", "tunable": "net.ipv4.tcp_fin_timeout", "netns_cookie": 1, '
    old += '"global_ns": true, "original": [60]}'
    path = tmp_path / "originals-7.jsonl"
    path.write_text(old + "\n")
    assert StateDir.read_journal(path) == [JournalEntry(7, "demo", FIN, 1, True, (60,), None)]


def test_corrupt_lines_are_skipped_and_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / f"originals-{DEAD_PID}.jsonl"
    good = JournalEntry(DEAD_PID, "tcp_conn", ALLOWED, 1, True, original_text="reno")
    path.write_text("\n".join(["[1, 2]", '{"pid": 1, "original_text": 5}', good.to_json()]) + "\n")
    with caplog.at_level(logging.WARNING, logger="pybpftune.state"):
        assert StateDir(tmp_path).leftovers() == [good]
    assert caplog.text.count(f"ignoring a corrupt line in {path}") == 2


class JournalCheckingSysctl(MemorySysctl):
    """Records, at each string write, what the journal held at that moment."""

    def __init__(
        self, state: StateDir, values: dict[str, tuple[int, ...]], global_cookie: int, texts: dict[str, str]
    ) -> None:
        super().__init__(values, global_cookie, texts)
        self.state = state
        self.journal_at_write: list[list[JournalEntry]] = []

    def write_text(self, name: str, text: str, netns_cookie: int | None = None) -> None:
        self.journal_at_write.append(StateDir.read_journal(self.state.journal_path))
        super().write_text(name, text, netns_cookie)


def conn_tuner(state: StateDir, advice: bool = False) -> tuple[TcpConnTuner, JournalCheckingSysctl, TunableStore]:
    ns = Namespaces()
    backend = JournalCheckingSysctl(
        state,
        {"net.ipv4.tcp_thin_linear_timeouts": (0,)},
        ns.global_cookie,
        {ALLOWED: "reno bbr", "net.ipv4.tcp_available_congestion_control": "reno bbr cubic", DEFAULT_CC: "bbr"},
    )
    store = TunableStore(backend, ns, state, advice=advice)
    tuner = TcpConnTuner(TunerContext(store, ns, Steps(4)), 0)
    store.register(tuner)
    tuner._prepared = True  # no modprobe in unit tests
    tuner.available = ["cubic", "bbr"]
    return tuner, backend, store


def test_apply_text_journals_the_original_before_its_first_write(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    tuner, backend, _store = conn_tuner(state)
    tuner.start()
    glob = tuner.ctx.namespaces.global_cookie
    want = JournalEntry(os.getpid(), "tcp_conn", ALLOWED, glob, True, original_text="reno bbr")
    assert backend.journal_at_write == [[want]], "journaled (and fsync'ed) before the write"
    tuner.stop()  # restores: the original is already journaled, nothing is appended
    assert StateDir.read_journal(state.journal_path) == [want]
    assert backend.texts[(glob, ALLOWED)] == "reno bbr"
    state.clear_journal()
    assert not state.journal_path.exists()


def test_apply_text_journals_once_per_namespace(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    tuner, _backend, store = conn_tuner(state)
    for text in ("reno bbr cubic", "reno cubic"):
        store.apply_text(tuner, 3, 0, NS_COOKIE, text, "a test")  # tcp_congestion_control is per namespace
    store.apply_text(tuner, 3, 0, None, "cubic", "a test")
    glob = tuner.ctx.namespaces.global_cookie
    assert StateDir.read_journal(state.journal_path) == [
        JournalEntry(os.getpid(), "tcp_conn", DEFAULT_CC, NS_COOKIE, False, original_text="bbr"),
        JournalEntry(os.getpid(), "tcp_conn", DEFAULT_CC, glob, True, original_text="bbr"),
    ]
    state.clear_journal()


def test_advice_mode_journals_nothing(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    tuner, backend, _store = conn_tuner(state, advice=True)
    tuner.start()
    assert backend.text_writes == [] and not state.journal_path.exists()


def dead_journal(state_dir: Path, *entries: JournalEntry) -> Path:
    state_dir.mkdir(exist_ok=True)
    path = state_dir / f"originals-{DEAD_PID}.jsonl"
    path.write_text("".join(e.to_json() + "\n" for e in entries))
    return path


def recovering_daemon(state_dir: Path, rollback: bool) -> tuple[Daemon, MemorySysctl]:
    backend = MemorySysctl(
        {FIN: (63,)}, global_cookie=0, texts={ALLOWED: "reno bbr cubic", DEFAULT_CC: "cubic"}
    )  # what the dead daemon left: cookie 0 is the backend's global namespace
    backend.texts[(NS_COOKIE, DEFAULT_CC)] = "htcp"
    backend.values[(NS_COOKIE, FIN)] = (90,)
    return Daemon(DaemonConfig(state_dir=state_dir, rollback=rollback), backend=backend), backend


LEFT = (
    JournalEntry(DEAD_PID, "tcp_conn", ALLOWED, 1, True, original_text="reno bbr"),
    JournalEntry(DEAD_PID, "tcp_conn", DEFAULT_CC, NS_COOKIE, False, original_text="bbr"),
    JournalEntry(DEAD_PID, "demo", FIN, 1, True, (60,)),
    JournalEntry(DEAD_PID, "demo", FIN, NS_COOKIE, False, (61,)),
)


def test_restart_with_rollback_restores_string_and_numeric_originals(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = dead_journal(tmp_path, *LEFT)
    daemon, backend = recovering_daemon(tmp_path, rollback=True)
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        daemon._recover_journal()
    assert backend.texts[(0, ALLOWED)] == "reno bbr"
    assert backend.texts[(NS_COOKIE, DEFAULT_CC)] == "bbr", "restored in its own namespace"
    assert backend.texts[(0, DEFAULT_CC)] == "cubic", "the global default was not journaled: left alone"
    assert backend.values[(0, FIN)] == (60,)
    assert backend.values[(NS_COOKIE, FIN)] == (61,)
    assert f"a previous daemon (pid {DEAD_PID}) did not exit cleanly; 4 original value(s) were journaled" in caplog.text
    assert (
        f"Rolling back sysctl values for '{ALLOWED}' to original values (reno bbr) in global ns, left by pid {DEAD_PID}"
    ) in caplog.text
    assert f"'{DEFAULT_CC}' to original values (bbr) in non-global ns (cookie {NS_COOKIE})" in caplog.text
    assert not journal.exists()


def test_restart_without_rollback_lists_the_originals_and_keeps_the_values(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = dead_journal(tmp_path, *LEFT)
    daemon, backend = recovering_daemon(tmp_path, rollback=False)
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        daemon._recover_journal()
    assert backend.text_writes == [] and backend.writes == []
    assert (
        f"start with -R to restore them: {ALLOWED} (reno bbr) in global ns, "
        f"{DEFAULT_CC} (bbr) in non-global ns (cookie {NS_COOKIE}), {FIN} (60) in global ns" in caplog.text
    )
    assert not journal.exists(), "dealt with: the next start does not warn again"


def test_simulated_kill9_then_rollback_restores_the_allowed_list(tmp_path: Path) -> None:
    """The whole path in one process: tcp_conn writes (journaled), "dies"
    without stop(), and a daemon started with -R finds and restores it."""
    state = StateDir(tmp_path)
    tuner, backend, _store = conn_tuner(state)
    tuner.start()
    glob = tuner.ctx.namespaces.global_cookie
    assert backend.texts[(glob, ALLOWED)] == "reno bbr cubic"
    state.close()
    state.journal_path.rename(tmp_path / f"originals-{DEAD_PID}.jsonl")  # its pid is gone now
    daemon = Daemon(DaemonConfig(state_dir=tmp_path, rollback=True), backend=backend)
    daemon._recover_journal()
    assert backend.texts[(glob, ALLOWED)] == "reno bbr"
    assert not list(tmp_path.glob("originals-*.jsonl"))


def test_clean_rollback_restores_string_sysctls(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """-R on a clean exit puts a written string sysctl back (the default
    congestion control here, which tcp_conn's own stop() does not touch),
    and stays quiet about one already back (the allowed list)."""
    state = StateDir(tmp_path)
    tuner, backend, store = conn_tuner(state)
    tuner.start()
    glob = tuner.ctx.namespaces.global_cookie
    store.apply_text(tuner, 3, 0, None, "cubic", "a test")
    tuner.stop()
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        assert store.rollback(tuner) == 1
    assert backend.texts[(glob, DEFAULT_CC)] == "bbr"
    assert backend.texts[(glob, ALLOWED)] == "reno bbr"
    assert caplog.text.count("Rolling back sysctl values") == 1
    assert f"Rolling back sysctl values for '{DEFAULT_CC}' from (cubic) to original values (bbr)" in caplog.text
    state.clear_journal()
