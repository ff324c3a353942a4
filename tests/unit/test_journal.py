"""The journal of originals and the store that owns it (issue 9, items 1-8).

Each daemon "life" here is a TunableStore on the same state directory and the
same in-memory sysctls; a kill -9 is a store dropped without close().
"""

from __future__ import annotations

import json
import logging
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pybpftune.bindings import NeighTableScenario, NeighTableTunable
from pybpftune.errors import PybpftuneError
from pybpftune.journal import Record, boot_id, replay, valid_name
from pybpftune.netns import Namespaces
from pybpftune.state import StateDir, StateDirError
from pybpftune.store import TunableStore
from pybpftune.sysctl import MemorySysctl
from pybpftune.tuner import Proposal, Scenario, Steps, Tunable, Tuner, TunerContext, known_tunables
from pybpftune.tuners.neigh_table import MemoryNeigh, NeighTableTuner, Table

FIN = "net.ipv4.tcp_fin_timeout"
ALLOWED = "net.ipv4.tcp_allowed_congestion_control"
SHARED = "net.core.high_order_alloc_disable"
NS = 4242
BOOT = boot_id()


class Demo(Tuner):
    name = "demo"
    tunables = (
        Tunable(0, FIN, namespaced=True, lower=1, upper=600),
        Tunable(1, ALLOWED, kind="string"),
        Tunable(2, SHARED),
    )
    scenarios = (Scenario(0, "demo", "a test"),)


class Other(Tuner):
    """Shares SHARED with Demo, as tcp_buffer and net_buffer do."""

    name = "other"
    tunables = (Tunable(0, SHARED),)
    scenarios = (Scenario(0, "other", "a test"),)


KNOWN = known_tunables([Demo, Other, NeighTableTuner])


class Life:
    """One daemon's store on the shared sysctls and state directory."""

    def __init__(self, backend: MemorySysctl, state_dir: Path, advice: bool = False) -> None:
        self.ns = Namespaces()
        self.state = StateDir(state_dir)
        self.store = TunableStore(backend, self.ns, self.state, advice=advice)
        ctx = TunerContext(self.store, self.ns, Steps(4))
        self.demo, self.other = Demo(ctx, 0), Other(ctx, 1)
        self.store.register(self.demo)
        self.store.register(self.other)

    def set(self, value: int, cookie: int | None = None, tuner: Tuner | None = None, tunable: int = 0) -> bool:
        t = tuner or self.demo
        cookie = cookie if cookie is not None else self.ns.global_cookie
        return self.store.apply(t, Proposal(tunable, 0, cookie, (value,), "a test")) is not None

    def recover(self, restore: bool) -> int:
        return self.store.recover(self.store.load_journal(KNOWN), KNOWN.get, restore=restore)


@pytest.fixture
def backend() -> MemorySysctl:
    glob = Namespaces().global_cookie
    b = MemorySysctl({FIN: (60,), SHARED: (1,)}, glob, {ALLOWED: "reno bbr"})
    b.values[(NS, FIN)] = (61,)
    return b


def journal(state_dir: Path) -> list[dict[str, object]]:
    path = state_dir / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def originals(state_dir: Path) -> dict[tuple[str, int], object]:
    return {(str(r["tunable"]), int(r["netns"])): r["value"] for r in journal(state_dir) if r["op"] == "original"}  # type: ignore[call-overload]


# --- item 1: a plain restart keeps the journal -------------------------------------------


def test_a_plain_restart_adopts_the_dead_daemons_originals(backend: MemorySysctl, tmp_path: Path) -> None:
    a = Life(backend, tmp_path)
    assert a.set(80) and a.set(90, NS)
    del a  # kill -9: no close, no rollback
    b = Life(backend, tmp_path)
    assert b.recover(restore=False) == 0
    glob = b.ns.global_cookie
    assert backend.values[(glob, FIN)] == (80,), "without -R nothing is written back"
    assert b.store.original(b.demo, 0) == (60,), "the journaled original stays the original"
    assert b.store.original(b.demo, 0, NS) == (61,)
    b.set(100)
    assert originals(tmp_path)[(FIN, glob)] == [60]
    b.store.close()
    assert originals(tmp_path)[(FIN, glob)] == [60], "a clean exit without -R keeps what is not restored"
    c = Life(backend, tmp_path)
    c.recover(restore=False)
    c.store.rollback_all()  # a -R exit
    c.store.close()
    assert backend.values[(glob, FIN)] == (60,) and backend.values[(NS, FIN)] == (61,)
    assert not (tmp_path / "journal.jsonl").exists(), "nothing pending: no journal"


# --- item 3: no pids in the journal; order is the order written ---------------------------


def test_same_pid_recovers_its_predecessor(backend: MemorySysctl, tmp_path: Path) -> None:
    """A daemon that is PID 1 in a container has the same pid every time."""
    for value in (70, 80, 90):
        life = Life(backend, tmp_path)
        life.recover(restore=True)
        assert backend.values[(life.ns.global_cookie, FIN)] == (60,), "each -R start finds the true original"
        life.set(value)  # then killed
    assert originals(tmp_path) == {(FIN, Namespaces().global_cookie): [60]}


def test_entries_replay_in_the_order_written_not_string_order(tmp_path: Path) -> None:
    glob = Namespaces().global_cookie
    first = Record(99, "original", BOOT, "sysctl", FIN, glob, True, "demo", (60,))
    later = Record(100, "original", BOOT, "sysctl", FIN, glob, True, "demo", (70,))
    data = (later.to_json() + "\n" + first.to_json() + "\n").encode()
    rep = replay(data, BOOT, lambda kind, name: True)
    assert [p.original for p in rep.pending] == [(60,)], "the first original written wins"


def test_old_per_pid_journal_names_never_crash(backend: MemorySysctl, tmp_path: Path) -> None:
    (tmp_path / f"originals-{2**80}.jsonl").write_text("junk\n")
    life = Life(backend, tmp_path)
    assert life.recover(restore=True) == 0


# --- item 4: recovery checks before it writes, and keeps what failed ------------------------


def test_a_value_changed_since_the_crash_is_left(
    backend: MemorySysctl, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = Life(backend, tmp_path)
    a.set(80)
    glob = a.ns.global_cookie
    backend.values[(glob, FIN)] = (33,)  # the administrator, after the crash
    b = Life(backend, tmp_path)
    with caplog.at_level(logging.INFO, logger="pybpftune"):
        assert b.recover(restore=True) == 0
    assert backend.values[(glob, FIN)] == (33,)
    assert "someone else changed it, so it stays" in caplog.text
    assert not (tmp_path / "journal.jsonl").exists(), "the entry is dropped"


class FailingSysctl(MemorySysctl):
    fail = False

    def write(self, name: str, values: tuple[int, ...], netns_cookie: int | None = None) -> None:
        if self.fail:
            raise OSError(30, "Read-only file system")
        super().write(name, values, netns_cookie)


def test_a_restore_that_fails_stays_journaled(tmp_path: Path) -> None:
    glob = Namespaces().global_cookie
    backend = FailingSysctl({FIN: (60,), SHARED: (1,)}, glob, {ALLOWED: "reno"})
    a = Life(backend, tmp_path)
    a.set(80)
    backend.fail = True
    b = Life(backend, tmp_path)
    assert b.recover(restore=True) == 0
    b.store.close()
    assert originals(tmp_path) == {(FIN, glob): [60]}
    backend.fail = False
    c = Life(backend, tmp_path)
    assert c.recover(restore=True) == 1
    assert backend.values[(glob, FIN)] == (60,)


def test_a_write_killed_before_it_happened_is_still_ours(backend: MemorySysctl, tmp_path: Path) -> None:
    """The journal says "wrote 90" before the write; a kill in between leaves
    80 in place, which is still ours to restore."""
    a = Life(backend, tmp_path)
    a.set(80)
    glob = a.ns.global_cookie
    entry = Record(50, "wrote", BOOT, "sysctl", FIN, glob, True, "demo", (90,))
    with open(tmp_path / "journal.jsonl", "a") as f:
        f.write(entry.to_json() + "\n")
    b = Life(backend, tmp_path)
    assert b.recover(restore=True) == 1
    assert backend.values[(glob, FIN)] == (60,)


# --- item 5: -R never overrides the administrator ------------------------------------------


def test_rollback_leaves_namespaces_an_administrator_took_over(backend: MemorySysctl, tmp_path: Path) -> None:
    life = Life(backend, tmp_path)
    life.set(80, NS)
    backend.values[(NS, FIN)] = (33,)
    life.store.disable(life.demo, NS, "pid 7 modified sysctl")
    assert life.store.rollback(life.demo) == 0
    assert backend.values[(NS, FIN)] == (33,)


def test_rollback_leaves_a_value_someone_else_wrote_even_without_a_back_off(
    backend: MemorySysctl, tmp_path: Path
) -> None:
    life = Life(backend, tmp_path)
    life.set(80, NS)
    backend.values[(NS, FIN)] = (33,)  # the write event was lost
    assert life.store.rollback(life.demo) == 0
    assert backend.values[(NS, FIN)] == (33,)


# --- item 6: everything goes through the store ----------------------------------------------


def neigh_life(neigh: MemoryNeigh, backend: MemorySysctl, tmp_path: Path) -> tuple[NeighTableTuner, TunableStore]:
    ns = Namespaces()
    store = TunableStore(backend, ns, StateDir(tmp_path))
    tuner = NeighTableTuner(TunerContext(store, ns, Steps(4)), 0, backend=neigh)
    store.register(tuner)
    return tuner, store


def test_neighbour_thresholds_are_journaled_and_restored_after_a_crash(backend: MemorySysctl, tmp_path: Path) -> None:
    import socket

    neigh = MemoryNeigh({socket.AF_INET: Table("arp_cache", socket.AF_INET, (32, 64, 128), 252)})
    tuner, store = neigh_life(neigh, backend, tmp_path)
    glob = tuner.ctx.namespaces.global_cookie
    assert store.apply(
        tuner, Proposal(NeighTableTunable.ARP_THRESHOLDS, NeighTableScenario.FULL, glob, (96, 195, 390), "a test")
    )
    assert originals(tmp_path) == {("neigh.arp_cache.gc_thresh", glob): [32, 64, 128]}
    del tuner, store  # kill -9
    _tuner2, store2 = neigh_life(neigh, backend, tmp_path)
    assert store2.recover(store2.load_journal(KNOWN), KNOWN.get, restore=True) == 1
    assert neigh.tables[socket.AF_INET].thresholds == (32, 64, 128)


def test_tuners_have_no_access_to_the_records(backend: MemorySysctl, tmp_path: Path) -> None:
    store = Life(backend, tmp_path).store
    assert not hasattr(store, "record") and not hasattr(store, "_records")


# --- item 7: one original per sysctl per namespace --------------------------------------------


def test_a_shared_sysctl_has_one_original(backend: MemorySysctl, tmp_path: Path) -> None:
    life = Life(backend, tmp_path)
    glob = life.ns.global_cookie
    assert life.set(0, tuner=life.demo, tunable=2)
    assert life.store.apply(life.other, Proposal(0, 0, glob, (2,), "a test"))
    assert life.store.original(life.other, 0) == (1,)
    assert [r["value"] for r in journal(tmp_path) if r["op"] == "original"] == [[1]]
    assert life.store.rollback(life.demo) == 0, "other still tunes it"
    assert backend.values[(glob, SHARED)] == (2,)
    assert life.store.rollback(life.other) == 1
    assert backend.values[(glob, SHARED)] == (1,), "the true original"


# --- item 8: the journal and the directory are hostile until checked ---------------------------


@pytest.mark.parametrize(
    "name", ["/etc/crontab", "../../etc/crontab", "net/../../etc/x", "", "a..b", "net.ipv4.tcp_rmem\n", "x" * 300]
)
def test_names_that_could_leave_proc_sys_are_refused(name: str) -> None:
    assert not valid_name(name)


def test_a_journal_naming_an_undeclared_tunable_writes_nothing(backend: MemorySysctl, tmp_path: Path) -> None:
    glob = Namespaces().global_cookie
    forged = Record(1, "original", BOOT, "sysctl", "kernel.core_pattern", glob, True, "demo", (0,))
    (tmp_path / "journal.jsonl").write_text(forged.to_json() + "\n")
    life = Life(backend, tmp_path)
    assert life.recover(restore=True) == 0
    assert backend.writes == []


@pytest.mark.parametrize(
    "line",
    [
        b'{"v": 2, "seq": 1, "op": "original", "boot": "B", "kind": "sysctl", "tunable": "x", "netns": 1, '
        b'"global_ns": true, "value": [Infinity]}',
        b"\xff\xfe not utf-8",
        b'{"v": 2, "seq": 1, "op": "original", "boot": "B", "kind": "sysctl", "tunable": "x", "netns": 1, '
        b'"global_ns": true, "value": "60"}',
        b'{"v": 2, "seq": 99999999999999999999999, "op": "original"}',
        b"[" * 100000,
        b'{"pid": 99999999999999999999999999, "tuner": "t", "tunable": "x", "netns_cookie": 1, "global_ns": true}',
        b"null",
    ],
)
def test_corrupt_lines_are_skipped_with_one_warning(
    line: bytes, backend: MemorySysctl, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    glob = Namespaces().global_cookie
    good = Record(2, "original", BOOT, "sysctl", FIN, glob, True, "demo", (60,))
    wrote = Record(3, "wrote", BOOT, "sysctl", FIN, glob, True, "demo", (80,))
    (tmp_path / "journal.jsonl").write_bytes(line + b"\n" + f"{good.to_json()}\n{wrote.to_json()}\n".encode())
    backend.values[(glob, FIN)] = (80,)
    life = Life(backend, tmp_path)
    with caplog.at_level(logging.WARNING, logger="pybpftune"):
        assert life.recover(restore=True) == 1
    assert backend.values[(glob, FIN)] == (60,)
    assert caplog.text.count("corrupt line") == 1


def test_fuzzed_journals_never_raise(backend: MemorySysctl, tmp_path: Path) -> None:
    rng = random.Random(9)
    glob = Namespaces().global_cookie
    good = Record(1, "original", BOOT, "sysctl", FIN, glob, True, "demo", (60,)).to_json()
    shapes: list[object] = [None, True, 1.5, -1, 2**70, "x", [], {}, [1, "a"], {"a": [1]}, float("inf")]
    keys = ["v", "seq", "op", "boot", "kind", "tunable", "netns", "global_ns", "tuner", "value", "how"]
    for _ in range(600):
        if rng.random() < 0.3:
            data = rng.randbytes(rng.randrange(0, 400))
        else:
            raw = json.loads(good)
            for _k in range(rng.randrange(1, 4)):
                raw[rng.choice(keys)] = rng.choice([*shapes, BOOT, "wrote", "done", "string", "custom", FIN])
            data = json.dumps(raw).encode() + b"\n" + rng.randbytes(rng.randrange(0, 20))
        (tmp_path / "journal.jsonl").write_bytes(data)
        life = Life(backend, tmp_path)
        life.recover(restore=rng.random() < 0.5)
        life.store.close()
    assert backend.values[(glob, FIN)] == (60,)


def test_entries_from_an_earlier_boot_are_void(backend: MemorySysctl, tmp_path: Path) -> None:
    glob = Namespaces().global_cookie
    old = Record(1, "original", "another-boot", "sysctl", FIN, glob, True, "demo", (10,))
    (tmp_path / "journal.jsonl").write_text(old.to_json() + "\n")
    life = Life(backend, tmp_path)
    assert life.recover(restore=True) == 0
    assert backend.writes == []


def test_a_symlinked_journal_is_refused(backend: MemorySysctl, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o755)
    (state_dir / "journal.jsonl").symlink_to(target)
    life = Life(backend, state_dir)
    with pytest.raises(StateDirError, match="cannot read the journal"):
        life.recover(restore=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_a_state_directory_someone_else_owns_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "theirs"
    d.mkdir(mode=0o755)
    os.chown(d, 65534, 65534)
    with pytest.raises(StateDirError, match="belongs to uid 65534, not root"):
        StateDir(d).lock()


def test_a_state_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(StateDirError, match="writable by group or others"):
        StateDir(d).lock()


def test_missing_parents_are_created_0755_and_files_0600(backend: MemorySysctl, tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        d = tmp_path / "a" / "b" / "state"
        life = Life(backend, d)
        life.store.state.lock()  # type: ignore[union-attr]
        life.set(80)
    finally:
        os.umask(old)
    for p in (tmp_path / "a", tmp_path / "a" / "b", d):
        assert stat.S_IMODE(p.stat().st_mode) == 0o755
    assert stat.S_IMODE((d / "journal.jsonl").stat().st_mode) == 0o600
    life.state.unlock()


# --- the lock ---------------------------------------------------------------------------------


def test_a_second_daemon_is_refused_in_one_line(tmp_path: Path) -> None:
    first = StateDir(tmp_path)
    first.lock()
    try:
        with pytest.raises(PybpftuneError, match=f"another pybpftune daemon \\(pid {os.getpid()}\\)"):
            StateDir(tmp_path).lock()
        with pytest.raises(PybpftuneError, match="stop it before the restore"):
            StateDir(tmp_path).lock("restore")
    finally:
        first.unlock()
    StateDir(tmp_path).lock()  # free again


# --- advice mode and clean exits ------------------------------------------------------------------


def test_advice_mode_neither_writes_nor_journals(backend: MemorySysctl, tmp_path: Path) -> None:
    life = Life(backend, tmp_path, advice=True)
    assert not life.set(80)
    life.store.close()
    assert backend.writes == [] and not (tmp_path / "journal.jsonl").exists()


def test_the_journal_precedes_every_write(tmp_path: Path) -> None:
    seen: list[list[dict[str, object]]] = []

    class Watching(MemorySysctl):
        def write(self, name: str, values: tuple[int, ...], netns_cookie: int | None = None) -> None:
            seen.append(journal(tmp_path))
            super().write(name, values, netns_cookie)

    backend = Watching({FIN: (60,), SHARED: (1,)}, Namespaces().global_cookie, {ALLOWED: "reno"})
    life = Life(backend, tmp_path)
    life.set(80)
    life.set(90)
    assert [[(r["op"], r.get("value")) for r in j] for j in seen] == [
        [("original", [60]), ("wrote", [80])],
        [("original", [60]), ("wrote", [80]), ("wrote", [90])],
    ]


# --- item 2: a typo is found before the journal is touched ------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon needs root")
def test_a_typo_in_a_tuner_name_leaves_the_journal_alone(tmp_path: Path) -> None:
    glob = Namespaces().global_cookie
    current = Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()
    entry = Record(
        1, "original", BOOT, "sysctl", "net.ipv4.tcp_rmem", glob, True, "tcp_buffer", tuple(map(int, current))
    )
    path = tmp_path / "journal.jsonl"
    path.write_text(entry.to_json() + "\n")
    before = path.read_bytes()
    out = subprocess.run(
        [sys.executable, "-m", "pybpftune", "-s", "-R", "-a", "tcp_bufer", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert "tcp_bufer" in out.stderr and "Traceback" not in out.stderr
    assert path.read_bytes() == before


def test_adopted_changes_are_the_tuners_own_in_queries_and_rollback(backend: MemorySysctl, tmp_path: Path) -> None:
    """After a restart without -R, `-q rollback` and the summary still show
    what the dead daemon's tuner changed, and that tuner's -R stop restores it."""
    a = Life(backend, tmp_path)
    a.set(80)
    b = Life(backend, tmp_path)
    b.recover(restore=False)
    glob = b.ns.global_cookie
    assert [(t.name, c, o, w) for t, c, o, w in b.store.changed_values(b.demo)] == [(FIN, glob, (60,), (80,))]
    assert "# sysctl 'net.ipv4.tcp_fin_timeout' changed from (60) -> (80)" in b.store.summary(b.demo)
    assert b.store.changed_values(b.other) == []
    assert b.store.rollback(b.demo) == 1
    assert backend.values[(glob, FIN)] == (60,)
