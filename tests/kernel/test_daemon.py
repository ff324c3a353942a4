"""The daemon end to end, driven through the demo tuner (tests/tuners).

The demo tuner raises net.ipv4.tcp_fin_timeout by one a second, three times,
so the write path, its log lines, the summary, rollback, the journal, the
sysctl tuner's back-off and cleanup after kill -9 are all exercised against
the real kernel without depending on traffic.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pybpftune import libbpf
from pybpftune.bpf import object_path
from pybpftune.objects import OpenObject
from pybpftune.support import find_cgroup2

from .harness import BPFTUNE, SLOW, Daemon, Sysctls, demo_tuners_dir, journaled, sysctl_get, sysctls

pytestmark = pytest.mark.kernel

FIN = "net.ipv4.tcp_fin_timeout"


@pytest.fixture
def fin() -> Iterator[Sysctls]:
    with sysctls() as s:
        s.set(FIN, 60)
        yield s


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


def demo_daemon(state_dir: Path, *extra: str, variant_args: tuple[str, ...] = ()) -> Daemon:
    return Daemon(
        [
            "-s",
            "-a",
            "sysctl",
            "-a",
            "demo",
            "-l",
            str(demo_tuners_dir()),
            "--state-dir",
            str(state_dir),
            *variant_args,
            *extra,
        ]
    )


def program_names() -> list[str]:
    """Full names (as bpftool shows them) of the programs loaded now."""
    return [name for _id, name, _t in libbpf.loaded_programs(full_names=True)]


def wait_programs_gone(names: set[str], timeout: float = 5) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        left = [n for n in program_names() if n in names]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


GATE = "bpftune_sysctl_gate"
OUR_PROGRAMS = {GATE, *(f"bpftune_sysctl_write__{form}" for form in ("cgroup_sysctl", "fentry", "kprobe"))}


def test_changes_are_logged_summarized_and_kept(fin: Sysctls, state_dir: Path, variant_args: tuple[str, ...]) -> None:
    with demo_daemon(state_dir, variant_args=variant_args) as d:
        d.started()
        d.wait_for(r"Scenario 'demo step' occurred for tunable 'net.ipv4.tcp_fin_timeout' in global ns\.")
        d.wait_for(r"Due to demo step change net.ipv4.tcp_fin_timeout from \(60\) -> \(61\)")
        d.wait_for(r"from \(62\) -> \(63\)", timeout=10)
        assert journaled(state_dir) == {FIN: (60,)}
        assert d.stop() == 0
    out = d.output
    assert (
        "# Summary: scenario 'demo step' occurred 3 times for tunable 'net.ipv4.tcp_fin_timeout' in global ns." in out
    )
    assert "# sysctl 'net.ipv4.tcp_fin_timeout' changed from (60) -> (63)" in out
    assert 'sysctl -w net.ipv4.tcp_fin_timeout="63"' in out
    assert sysctl_get(FIN) == "63", "without -R the tuned value stays"
    assert journaled(state_dir) == {FIN: (60,)}, "not restored: the original stays journaled for a later -R"
    assert not wait_programs_gone(OUR_PROGRAMS)


def test_rollback_restores_on_sigterm(fin: Sysctls, state_dir: Path, variant_args: tuple[str, ...]) -> None:
    with demo_daemon(state_dir, "-R", variant_args=variant_args) as d:
        d.started()
        d.wait_for(r"from \(61\) -> \(62\)", timeout=10)
        assert d.stop(signal.SIGTERM) == 0
    assert "Rolling back sysctl values for 'net.ipv4.tcp_fin_timeout'" in d.output
    assert sysctl_get(FIN) == "60"


@pytest.mark.guest  # the sysctl tuner's fentry/kprobe forms only work in the VMs
@pytest.mark.all_variants
def test_admin_write_makes_the_tuner_back_off(fin: Sysctls, state_dir: Path, variant_args: tuple[str, ...]) -> None:
    with demo_daemon(state_dir, variant_args=variant_args) as d:
        d.started()
        d.wait_for(r"from \(60\) -> \(61\)")
        subprocess.run(["sysctl", "-q", "-w", f"{FIN}=30"], check=True)
        d.wait_for(
            r"pid \d+, cmd '.*sysctl.*' modified sysctl 'net.ipv4.tcp_fin_timeout' that tuner 'demo' uses; "
            r"disabling 'demo' for namespace cookie \d+"
        )
        time.sleep(3)  # the demo tuner would have stepped twice more
        assert sysctl_get(FIN) == "30"
        d.stop()
    assert "from (30)" not in d.output


def test_restart_after_kill9_restores_and_leaves_no_programs(
    fin: Sysctls, state_dir: Path, variant_args: tuple[str, ...]
) -> None:
    first = demo_daemon(state_dir, "-R", variant_args=variant_args)
    try:
        first.started()
        first.wait_for(r"from \(60\) -> \(61\)")
        first.stop(signal.SIGKILL)
    finally:
        first.stop()
    assert sysctl_get(FIN) != "60"
    assert journaled(state_dir) == {FIN: (60,)}, "the journal survives SIGKILL"
    with Daemon(
        ["-s", "-a", "sysctl", "-l", str(demo_tuners_dir()), "-R", "--state-dir", str(state_dir), *variant_args]
    ) as second:
        second.started()
        second.wait_for(r"a previous daemon left 1 original value\(s\) journaled; restoring them \(-R\)")
        assert sysctl_get(FIN) == "60"
        names = program_names()
        assert names.count(GATE) == 1, "the dead daemon's programs must be gone"
        second.stop()
    assert not wait_programs_gone(OUR_PROGRAMS)
    assert journaled(state_dir) == {}, "everything restored: no journal"


def bpftool(*args: str) -> list[str]:
    proc = subprocess.run(["bpftool", *args], capture_output=True, text=True, timeout=30, check=True)
    return proc.stdout.splitlines()


def sysctl_attached() -> list[int]:
    """Ids of the programs attached to the root cgroup v2's sysctl hook.
    (Asked directly: Debian 12's bpftool lists no cgroup programs at all on a
    5.10 kernel, although `bpftool cgroup detach` works there.)"""
    cgroup = find_cgroup2()
    assert cgroup, "no cgroup v2 mount"
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return libbpf.cgroup_programs(fd, libbpf.ATTACH_CGROUP_SYSCTL)
    finally:
        os.close(fd)


@contextmanager
def left_attached(program: str, variant: str) -> Iterator[int]:
    """``program`` of the sysctl tuner loaded and attached to the root cgroup
    with bpf_prog_attach, as bpftune (or an older daemon, or an operator with
    bpftool) attaches: such an attachment outlives its process.  Yields the
    program id; detaches it at the end if it is still there."""
    cgroup = find_cgroup2()
    assert cgroup, "no cgroup v2 mount"
    before = {pid for pid, _n, _t in libbpf.loaded_programs()}
    with OpenObject.from_path(object_path("sysctl_tuner", legacy=variant == "legacy")) as obj:
        for name in obj.programs:
            obj.set_autoload(name, name == program)
        with obj.load():
            new = libbpf.loaded_programs(full_names=True)
            (prog_id,) = [pid for pid, name, _t in new if name == program and pid not in before]
            bpftool("cgroup", "attach", cgroup, "sysctl", "id", str(prog_id), "multi")
    try:
        yield prog_id
    finally:
        subprocess.run(["bpftool", "cgroup", "detach", cgroup, "sysctl", "id", str(prog_id)], capture_output=True)


@pytest.mark.guest
def test_our_programs_are_named_and_leftovers_detached(fin: Sysctls, state_dir: Path, variant: str) -> None:
    """An operator finds our programs with `bpftool prog | grep bpftune`.  Ours
    are bpf_links, which the kernel detaches when the daemon dies, even by
    SIGKILL; a program of ours attached the bpftune way (bpf_prog_attach)
    outlives its process, and the next start detaches it and says so."""
    with left_attached(GATE, variant) as prog_id:
        assert prog_id in sysctl_attached()
        assert any(line.startswith(f"{prog_id}: ") and GATE in line for line in bpftool("prog", "show"))
        d = demo_daemon(state_dir, variant_args=("-L",) if variant == "legacy" else ())
        try:
            d.started()
            d.wait_for(rf"detaching old BPF program '{GATE}' \(id {prog_id}\) left by a previous daemon")
            assert prog_id not in sysctl_attached()
            shown = [line for line in bpftool("prog", "show") if "bpftune_" in line]
            assert sum(GATE in line for line in shown) == 1, shown
            assert any("sysctl_write__" in line for line in shown), shown
            d.stop(signal.SIGKILL)
        finally:
            d.stop()
    assert not wait_programs_gone(OUR_PROGRAMS), "the kernel frees a dead daemon's programs"
    assert not [line for line in bpftool("prog", "show") if "bpftune_sysctl" in line]


def netns_cookie(netns: str) -> int | None:
    """The cookie of ``netns``, None without cookie support (before 5.14)."""
    code = "from pybpftune.netns import current_cookie; print(current_cookie())"
    cmd = ["ip", "netns", "exec", netns, sys.executable, "-c", code]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout.strip()
    return None if out == "None" else int(out)


def kernel_addresses(text: str) -> list[str]:
    """Numbers in ``text`` that could be kernel addresses (no netns cookie
    ever gets that high; see pybpftune.events.MAX_COOKIE)."""
    return [n for n in re.findall(r"\b\d{15,20}\b", text) if 1 << 48 <= int(n) < 1 << 64]


@pytest.mark.guest  # the sysctl tuner's fentry (full) and kprobe (legacy) forms run in the VMs
@pytest.mark.all_variants
def test_sysctl_events_name_a_real_namespace_whatever_the_sysctl(state_dir: Path, variant: str) -> None:
    """kernel.core_pattern belongs to no network namespace, net.ipv4.tcp_rmem
    to the writer's.  Written from inside a namespace, both events carry that
    namespace's cookie (without cookie support: "unknown"), and no log line
    carries a kernel address.  Both values are written back unchanged."""
    ns = f"pbtsc{os.getpid()}"
    core = Path("/proc/sys/kernel/core_pattern").read_text().rstrip("\n")
    run = ["ip", "netns", "exec", ns, "sysctl", "-q", "-w"]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        cookie = netns_cookie(ns)
        expected = "unknown" if cookie is None else str(cookie)
        rmem = sysctl_get("net.ipv4.tcp_rmem", ns)
        variant_args = ("-L",) if variant == "legacy" else ()
        with Daemon(["-d", "-s", "-a", "sysctl", "--state-dir", str(state_dir), *variant_args]) as d:
            d.started()
            subprocess.run([*run, f"kernel.core_pattern={core}"], check=True)
            subprocess.run([*run, f"net.ipv4.tcp_rmem={rmem}"], check=True)
            for name in ("kernel/core_pattern", "ipv4/tcp_rmem"):
                m = d.wait_for(
                    rf"cmd '[^']*sysctl[^']*' wrote sysctl '(?:net/)?{name}' in netns (\S+)", timeout=30 * SLOW
                )
                assert m[1] == expected, (name, d.output)
            assert d.stop() == 0
        assert not kernel_addresses(d.output), kernel_addresses(d.output)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if Path("/proc/sys/kernel/core_pattern").read_text().rstrip("\n") != core:
            Path("/proc/sys/kernel/core_pattern").write_text(core)


def test_unknown_tuner_is_one_line_and_nothing_attached(state_dir: Path) -> None:
    before = program_names().count(GATE)
    proc = subprocess.run(
        [str(BPFTUNE), "-s", "-a", "sysctl", "-a", "no_such_tuner", "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "unknown tuner" in line]
    assert len(errors) == 1 and "no_such_tuner" in errors[0] and "sysctl" in errors[0]
    assert program_names().count(GATE) <= before


def test_bpf_free_tuners_alone_still_run(fin: Sysctls, state_dir: Path) -> None:
    with Daemon(["-s", "-a", "demo", "-l", str(demo_tuners_dir()), "--state-dir", str(state_dir), "-R"]) as d:
        d.started()
        d.wait_for(r"from \(60\) -> \(61\)")
        assert d.stop() == 0
    assert sysctl_get(FIN) == "60"
