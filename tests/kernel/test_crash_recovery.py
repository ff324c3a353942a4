"""Nothing is lost however often the daemon dies (issue 9, "Done when").

Two namespaces (a veth pair) with starved TCP buffers and iperf3 running
between them in both directions, and global neighbour-table thresholds set
small while neighbours keep being added: tcp_buffer, tcp_conn and
neigh_table have something to change all the time.  The daemon is started
20 times on one state directory, alternately with and without -R, once as
PID 1 of its own PID namespace (``unshare --pid --fork --mount-proc``), and
each time killed with SIGKILL at a random moment 0.2-3 s after it was
spawned (so some kills land in its start-up or in its restore-at-start) or,
for about half of the runs, after its start line (while it tunes).
Then one daemon started with -R and stopped cleanly must leave every sysctl
the enabled tuners declare (in the initial namespace and in both test
namespaces) and both tables' thresholds as they were before the first start,
and no BPF program of ours loaded or attached to a cgroup.  A second, short
test ends with ``bpftune --restore`` after a kill -9 instead.

The delays come from a seed printed at the start (and named in every
failure); PYBPFTUNE_CRASH_SEED=<seed> replays a run.  Each daemon's output
is kept in runs.log in the test's tmp_path.

Host only: the journal's guarantees do not depend on the kernel, and the
kernel-dependent parts (per-namespace events, detaching programs a dead
daemon left) have their own guest tests; 21 daemon starts under qemu/TCG in
each of the three guest stages would cost minutes of the CI budget.
Kernels without namespace cookies (before 5.14) cannot attribute the
namespaces' events, so the test is skipped there.
"""

from __future__ import annotations

import collections
import fcntl
import importlib
import itertools
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pybpftune import libbpf
from pybpftune.netns import current_cookie
from pybpftune.support import find_cgroup2

from .harness import (
    BPFTUNE,
    SLOW,
    START_TIMEOUT,
    Daemon,
    NetnsPair,
    Sysctls,
    iperf3_server,
    netns_pair,
    run,
    sysctls,
)
from .test_neigh_table_tuner import LOCK, V4, V6, neighbours

pytestmark = pytest.mark.kernel

RUNS = 20
TUNERS = ("sysctl", "tcp_buffer", "tcp_conn", "net_buffer", "neigh_table")
# Set in both namespaces: the maximum is the default, so any traffic needs more.
STARVED = {
    "net.ipv4.tcp_rmem": "4096 131072 131072",
    "net.ipv4.tcp_wmem": "4096 16384 16384",
    "net.ipv4.tcp_moderate_rcvbuf": "0",
}
THRESHOLDS = (32, 64, 128)  # both tables' gc_thresh1/2/3, global
PORT = 5437
NEIGH_BATCH = 40  # neighbours added per traffic round, per family
V4_MAX = 900  # below the /24's bound (1024): v4 growth never stops for good
V6_MAX = 3000
UNSHARE = ("unshare", "--pid", "--fork", "--mount-proc", "--kill-child")
SEED_ENV = "PYBPFTUNE_CRASH_SEED"

Key = tuple[str, str]  # (where: "global" or a namespace name, sysctl name)


def declared_sysctls() -> tuple[list[str], list[str]]:
    """(global-only, namespaced) writable sysctls the enabled tuners declare,
    in declaration order; tunables that are not files under /proc/sys
    (netlink thresholds, per-socket settings) are read as their sysctls."""
    global_only: list[str] = []
    namespaced: list[str] = []
    for tuner in TUNERS:
        cls = importlib.import_module(f"pybpftune.tuners.{tuner}").TUNER
        for t in cls.tunables:
            path = Path("/proc/sys", t.name.replace(".", "/"))
            if not path.is_file() or not path.stat().st_mode & 0o200:
                continue
            names = namespaced if getattr(t, "namespaced", False) else global_only
            if t.name not in global_only and t.name not in namespaced:
                names.append(t.name)
    for prefix in (V4, V6):
        for i in (1, 2, 3):
            if f"{prefix}{i}" not in global_only:
                global_only.append(f"{prefix}{i}")
    return global_only, namespaced


def read_sysctls(names: list[str], netns: str | None) -> dict[str, str]:
    """The values of ``names`` in one namespace, one `sysctl` run; names it
    does not know are left out."""
    out: dict[str, str] = {}
    for line in run(["sysctl", *names], netns, check=False).splitlines():
        name, sep, value = line.partition(" = ")
        if sep:
            out[name.strip()] = " ".join(value.split())
        elif line.endswith(" ="):
            out[line[:-2].strip()] = ""
    return out


def bpftune_programs() -> dict[int, str]:
    return {i: n for i, n, _t in libbpf.loaded_programs(full_names=True) if n.startswith("bpftune_")}


CGROUP_HOOKS = {"sysctl": libbpf.ATTACH_CGROUP_SYSCTL, "sock_ops": libbpf.ATTACH_CGROUP_SOCK_OPS}


def cgroup_attached() -> dict[str, set[int]]:
    """Program ids attached to the root cgroup v2's hooks our tuners use."""
    cgroup = find_cgroup2()
    if cgroup is None:
        return {}
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {hook: set(libbpf.cgroup_programs(fd, t)) for hook, t in CGROUP_HOOKS.items()}
    finally:
        os.close(fd)


def new_cgroup_programs(before: dict[str, set[int]]) -> dict[str, set[int]]:
    return {
        hook: ids - before.get(hook, set()) for hook, ids in cgroup_attached().items() if ids - before.get(hook, set())
    }


def detach(leftovers: dict[str, set[int]]) -> None:
    """Cleanup after a failure: what a dead daemon left attached."""
    cgroup = find_cgroup2()
    for hook, ids in leftovers.items():
        for prog_id in ids:
            subprocess.run(["bpftool", "cgroup", "detach", str(cgroup), hook, "id", str(prog_id)], capture_output=True)


class Churn:
    """Traffic and neighbours until stopped: iperf3 rounds of one second,
    alternately client -> server and back (-R), each after a batch of new
    permanent neighbours (IPv4 and IPv6) on the server's veth."""

    def __init__(self, pair: NetnsPair) -> None:
        self.pair = pair
        self.rounds = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._v4 = (f"192.168.{net}.{host}" for net in (168, 100, 101, 102, 103) for host in range(3, 253))
        self._v6 = (f"fd00:168::1:{i:x}" for i in range(V6_MAX))
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Churn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _batch(self, addrs: Iterator[str], limit: int, v6: bool) -> None:
        if self.rounds * NEIGH_BATCH >= limit:
            return
        batch = list(itertools.islice(addrs, NEIGH_BATCH))
        if batch:
            try:
                neighbours(self.pair, "add", batch, v6=v6)
            except AssertionError as exc:
                self.errors.append(str(exc))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._batch(self._v4, V4_MAX, v6=False)
            self._batch(self._v6, V6_MAX, v6=True)
            reverse = ["-R"] if self.rounds % 2 else []
            cmd = ["iperf3", "-c", self.pair.server_addr, "-p", str(PORT), "-t", "1", *reverse]
            try:
                run(cmd, self.pair.client, timeout=30)
            except (AssertionError, subprocess.TimeoutExpired) as exc:
                self.errors.append(str(exc))
                self._stop.wait(0.2)
            self.rounds += 1


@dataclass
class Site:
    """The starved namespaces, the values before the first start, and the
    state directory every daemon of the test shares."""

    pair: NetnsPair
    state_dir: Path
    log: Path
    global_names: list[str]
    ns_names: list[str]
    before: dict[Key, str] = field(default_factory=dict)
    programs_before: dict[int, str] = field(default_factory=dict)
    cgroup_before: dict[str, set[int]] = field(default_factory=dict)

    def snapshot(self) -> dict[Key, str]:
        names = [*self.global_names, *self.ns_names]
        values = {("global", n): v for n, v in read_sysctls(names, None).items()}
        for ns in (self.pair.server, self.pair.client):
            values.update({(ns, n): v for n, v in read_sysctls(self.ns_names, ns).items()})
        return values

    def changed(self) -> dict[Key, tuple[str, str | None]]:
        """Recorded values that differ now: key -> (before, now)."""
        now = self.snapshot()
        return {k: (v, now.get(k)) for k, v in self.before.items() if now.get(k) != v}

    def keep(self, title: str, d: Daemon) -> None:
        with self.log.open("a") as f:
            f.write(f"===== {title} (exit {d.proc.returncode})\n{d.output}\n")

    def state_files(self) -> str:
        files = sorted(p.name for p in self.state_dir.iterdir()) if self.state_dir.is_dir() else []
        return ", ".join(files) or "(none)"


@contextmanager
def crash_site(tmp_path: Path) -> Iterator[Site]:
    """Starved buffers in both namespaces of a fresh pair, small global
    neighbour thresholds (under the neigh_table tests' machine-wide lock),
    an iperf3 server; every sysctl the tuners declare is recorded before, and
    restored afterwards whatever happened; programs a dead daemon left
    attached are detached."""
    if current_cookie() is None:
        pytest.skip("no network namespace cookies (kernel before 5.14): namespaced events cannot be attributed")
    global_names, ns_names = declared_sysctls()
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        lock = stack.enter_context(LOCK.open("a"))
        fcntl.flock(lock, fcntl.LOCK_EX)
        stack.callback(fcntl.flock, lock, fcntl.LOCK_UN)
        s: Sysctls = stack.enter_context(sysctls())
        # Saved in declaration order, restored in reverse: tcp_conn's default
        # algorithm before its allowed list (setting the default re-allows it).
        for name in [*global_names, *ns_names]:
            s.save(name)
        for prefix in (V4, V6):
            for i, thresh in enumerate(THRESHOLDS, 1):
                s.set(f"{prefix}{i}", thresh)
        pair = stack.enter_context(netns_pair("pbtcr"))
        for ns in (pair.server, pair.client):
            for name, value in STARVED.items():
                s.set(name, value, ns)
        stack.enter_context(iperf3_server(pair.server, PORT))
        site = Site(pair, tmp_path / "state", tmp_path / "runs.log", global_names, ns_names)
        site.before = site.snapshot()
        site.programs_before = bpftune_programs()
        site.cgroup_before = cgroup_attached()
        try:
            yield site
        finally:
            detach(new_cgroup_programs(site.cgroup_before))
            for line in Path("/proc/mounts").read_text().splitlines():
                mountpoint = line.split()[1]
                if mountpoint.startswith(str(site.state_dir)):
                    subprocess.run(["umount", "-l", mountpoint], capture_output=True)


def daemon(site: Site, rollback: bool, pid1: bool = False) -> Daemon:
    args = ["-s", "--state-dir", str(site.state_dir), *(f for t in TUNERS for f in ("-a", t))]
    return Daemon([*args, *(["-R"] if rollback else [])], wrapper=UNSHARE if pid1 else ())


def daemon_child(d: Daemon, timeout: float = 10) -> int:
    """The bpftune process unshare forked: PID 1 of its PID namespace."""
    deadline = time.monotonic() + timeout
    while True:
        for children in Path(f"/proc/{d.proc.pid}/task").glob("*/children"):
            for pid in children.read_text().split():
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if str(BPFTUNE).encode() in cmdline:
                    return int(pid)
        if time.monotonic() > deadline or d.proc.poll() is not None:
            raise AssertionError(f"no bpftune child of unshare (pid {d.proc.pid}); output:\n{d.output}")
        time.sleep(0.02)


def pid_in_own_namespace(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return line.split()[-1]
    return "?"


def kill9(d: Daemon, pid1: bool) -> None:
    """SIGKILL the daemon (under unshare: the daemon, not unshare) and wait
    until it is reaped."""
    assert d.proc.poll() is None, f"the daemon exited before it was killed ({d.proc.returncode}):\n{d.output}"
    if not pid1:
        d.stop(signal.SIGKILL)
        assert d.proc.returncode == -signal.SIGKILL, d.output
        return
    child = daemon_child(d)
    assert pid_in_own_namespace(child) == "1", "the daemon must be PID 1 of its PID namespace"
    os.kill(child, signal.SIGKILL)
    d.proc.wait(30)  # unshare reaps its child, then exits
    d.stop()
    assert not Path(f"/proc/{child}").exists()


@contextmanager
def stopped_at_end(d: Daemon, pid1: bool = False) -> Iterator[Daemon]:
    """Whatever happens, the daemon does not outlive the block."""
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            if pid1:
                try:
                    os.kill(daemon_child(d, timeout=1), signal.SIGKILL)
                except (AssertionError, OSError):
                    pass
            d.stop(signal.SIGKILL)


def wait_gone(site: Site, timeout: float = 5 * SLOW) -> tuple[dict[int, str], dict[str, set[int]]]:
    """Our programs still loaded and cgroup programs still attached, after
    giving the kernel ``timeout`` seconds to free a dead daemon's programs."""
    deadline = time.monotonic() + timeout
    while True:
        programs = {i: n for i, n in bpftune_programs().items() if i not in site.programs_before}
        attached = new_cgroup_programs(site.cgroup_before)
        if (not programs and not attached) or time.monotonic() > deadline:
            return programs, attached
        time.sleep(0.1)


def describe(changed: dict[Key, tuple[str, str | None]]) -> str:
    return "\n".join(f"  {where} {name}: before {b!r}, now {n!r}" for (where, name), (b, n) in sorted(changed.items()))


def seed() -> int:
    value = os.environ.get(SEED_ENV)
    return int(value) if value else random.SystemRandom().randrange(2**32)


@dataclass
class RunRecord:
    index: int
    rollback: bool
    pid1: bool
    delay: float
    from_start: bool  # the delay counts from the start line, not from spawn
    started: bool = False
    changed: list[Key] = field(default_factory=list)

    def title(self) -> str:
        how = ("-R" if self.rollback else "no -R") + (", PID 1 of its PID namespace" if self.pid1 else "")
        since = "its start line" if self.from_start else "spawn"
        state = "after start-up" if self.started else "during start-up"
        return f"run {self.index:2d} ({how}): killed {self.delay:.2f}s after {since}, {state}"

    def line(self) -> str:
        where = collections.Counter(w for w, _ in self.changed)
        counts = ", ".join(f"{w} {c}" for w, c in sorted(where.items()))
        return f"{self.title()}; then {len(self.changed)} recorded value(s) differed ({counts or 'none'})"


def test_twenty_kills_then_one_rollback_stop_restores_everything(tmp_path: Path) -> None:
    n = seed()
    rng = random.Random(n)
    print(f"{SEED_ENV}={n}")
    pid1_run = rng.randrange(RUNS)
    records: list[RunRecord] = []
    with crash_site(tmp_path) as site, Churn(site.pair) as churn:

        def context() -> str:
            return (
                f"\n{SEED_ENV}={n}; daemon outputs in {site.log}; state dir holds: {site.state_files()}\n"
                + "\n".join(r.line() for r in records)
                + (f"\ntraffic errors ({len(churn.errors)}), last: {churn.errors[-1]}" if churn.errors else "")
            )

        for i in range(RUNS):
            # Alternating, the first without -R: it journals the true originals.
            # About half the kills count from spawn (they may land in start-up
            # or in the restore at start), the others from the start line
            # (while it tunes), whatever the machine's load.  The PID 1 run is
            # killed once it has journaled something (tcp_conn's change at
            # start): its journal must be found by daemons with other pids,
            # although a process with its pid (init) lives.
            delay, from_start = rng.uniform(0.2, 3.0) * SLOW, rng.random() < 0.5
            pid1 = i == pid1_run
            rec = RunRecord(i, rollback=i % 2 == 1, pid1=pid1, delay=delay, from_start=from_start or pid1)
            records.append(rec)
            spawned = time.monotonic()
            with stopped_at_end(daemon(site, rec.rollback, rec.pid1), rec.pid1) as d:
                if rec.from_start:
                    d.started()
                    spawned = time.monotonic()
                time.sleep(max(0.0, spawned + rec.delay - time.monotonic()))
                rec.started = any("bpftune started" in line for line in d.lines)
                try:
                    kill9(d, rec.pid1)
                finally:
                    site.keep(rec.title(), d)
            assert "Traceback" not in d.output, f"run {i}:\n{d.output}{context()}"
            rec.changed = sorted(site.changed())

        with stopped_at_end(daemon(site, rollback=True)) as final:
            try:
                final.started(START_TIMEOUT)
                time.sleep(1.5 * SLOW)  # it tunes again, with traffic
                rc = final.stop(signal.SIGTERM)
            finally:
                site.keep("final run (-R, stopped with SIGTERM)", final)
            assert rc == 0, f"the final -R daemon exited {rc}:\n{final.output}{context()}"
        churn.stop()
        assert "Traceback" not in final.output, final.output + context()
        changed = site.changed()
        assert not changed, (
            "the final -R stop must put back every value from before the first start; differing now:\n"
            + describe(changed)
            + context()
        )
        programs, attached = wait_gone(site)
        assert not programs, f"programs of ours still loaded: {programs}{context()}"
        assert not attached, f"programs still attached to the root cgroup: {attached}{context()}"
        # The test proves something only if the kills left tuned values to recover.
        tuned = {name for r in records for where, name in r.changed if where != "global"}
        thresholds = {name for r in records for _, name in r.changed if "gc_thresh" in name}
        assert tuned & {"net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"}, "no namespace's buffers were tuned" + context()
        assert thresholds, "no neighbour threshold was changed" + context()
        print("\n".join(r.line() for r in records))


def wait_until_tuned(site: Site, d: Daemon, timeout: float = 60 * SLOW) -> dict[Key, tuple[str, str | None]]:
    """Wait until the daemon changed a namespace's buffers and a neighbour threshold."""
    deadline = time.monotonic() + timeout
    while True:
        changed = site.changed()
        names = {name for (where, name) in changed if where != "global"}
        if names & {"net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"} and any("gc_thresh" in name for _, name in changed):
            return changed
        if time.monotonic() > deadline or d.proc.poll() is not None:
            raise AssertionError(f"not tuned within {timeout}s; differing:\n{describe(changed)}\n{d.output}")
        time.sleep(0.2)


def restore_command(site: Site) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BPFTUNE), "--restore", "--state-dir", str(site.state_dir)],
        capture_output=True,
        text=True,
        timeout=60 * SLOW,
    )


def test_restore_command_after_kill9_restores_everything(tmp_path: Path) -> None:
    with crash_site(tmp_path) as site:
        with Churn(site.pair), stopped_at_end(daemon(site, rollback=False)) as d:
            d.started()
            wait_until_tuned(site, d)
            kill9(d, pid1=False)
        assert site.changed(), "a daemon killed with SIGKILL restores nothing"
        first = restore_command(site)
        assert first.returncode == 0, f"--restore exited {first.returncode}: {first.stdout}{first.stderr}"
        changed = site.changed()
        assert not changed, f"--restore left values changed:\n{describe(changed)}\n{first.stdout}{first.stderr}"
        # Nothing left to restore: still success, and nothing written.
        again = restore_command(site)
        assert again.returncode == 0, f"a second --restore exited {again.returncode}: {again.stdout}{again.stderr}"
        assert not site.changed()
        programs, attached = wait_gone(site)
        assert not programs and not attached, (programs, attached)


def test_second_daemon_on_one_state_dir_is_refused(tmp_path: Path) -> None:
    """Two daemons on one journal would fight over the same sysctls and
    originals: the second refuses with a one-line error and a non-zero exit,
    before it starts any tuner."""
    state_dir = tmp_path / "state"
    args = ["-s", "-a", "tcp_conn", "--state-dir", str(state_dir)]
    with sysctls() as s:
        s.save("net.ipv4.tcp_allowed_congestion_control")
        with Daemon([*args, "-R"]) as first:
            first.started()
            with stopped_at_end(Daemon(args)) as second:
                try:
                    second.proc.wait(30 * SLOW)
                except subprocess.TimeoutExpired:
                    pass
                assert second.proc.poll() is not None, f"a second daemon runs on the same state dir:\n{second.output}"
                second.stop()
            # One line says why (a closing "bpftune stopped" may come with it);
            # nothing was started.
            assert second.proc.returncode != 0, second.output
            assert "Traceback" not in second.output and str(state_dir) in second.lines[-1], second.output
            assert not [line for line in second.lines if re.search(r"\bstarted\b|\bchange\b", line)], second.output
            assert first.proc.poll() is None, "the first daemon keeps running"
            assert first.stop() == 0
