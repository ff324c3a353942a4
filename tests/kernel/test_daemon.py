"""The daemon end to end, driven through the demo tuner (tests/tuners).

The demo tuner raises net.ipv4.tcp_fin_timeout by one a second, three times,
so the write path, its log lines, the summary, rollback, the journal, the
sysctl tuner's back-off and cleanup after kill -9 are all exercised against
the real kernel without depending on traffic.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pybpftune import libbpf
from pybpftune.bpf import object_path
from pybpftune.objects import BpfObject
from pybpftune.support import find_cgroup2

from .harness import BPFTUNE, Daemon, Sysctls, demo_tuners_dir, sysctl_get, sysctls

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
        journal = list(state_dir.glob("originals-*.jsonl"))
        assert journal and '"original": [60]' in journal[0].read_text()
        assert d.stop() == 0
    out = d.output
    assert (
        "# Summary: scenario 'demo step' occurred 3 times for tunable 'net.ipv4.tcp_fin_timeout' in global ns." in out
    )
    assert "# sysctl 'net.ipv4.tcp_fin_timeout' changed from (60) -> (63)" in out
    assert 'sysctl -w net.ipv4.tcp_fin_timeout="63"' in out
    assert sysctl_get(FIN) == "63", "without -R the tuned value stays"
    assert not list(state_dir.glob("originals-*.jsonl")), "a clean exit leaves no journal"
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
    assert list(state_dir.glob("originals-*.jsonl")), "the journal survives SIGKILL"
    with Daemon(["-s", "-a", "sysctl", "-R", "--state-dir", str(state_dir), *variant_args]) as second:
        second.started()
        second.wait_for(r"a previous daemon \(pid \d+\) did not exit cleanly")
        assert sysctl_get(FIN) == "60"
        names = program_names()
        assert names.count(GATE) == 1, "the dead daemon's programs must be gone"
        second.stop()
    assert not wait_programs_gone(OUR_PROGRAMS)
    assert not list(state_dir.glob("originals-*.jsonl"))


def bpftool(*args: str) -> list[str]:
    proc = subprocess.run(["bpftool", *args], capture_output=True, text=True, timeout=30, check=True)
    return proc.stdout.splitlines()


@contextmanager
def left_attached(program: str, variant: str) -> Iterator[int]:
    """``program`` of the sysctl tuner loaded and attached to the root cgroup
    with bpf_prog_attach, as bpftune (or an older daemon, or an operator with
    bpftool) attaches: such an attachment outlives its process.  Yields the
    program id; detaches it at the end if it is still there."""
    cgroup = find_cgroup2()
    assert cgroup, "no cgroup v2 mount"
    before = {pid for pid, _n, _t in libbpf.loaded_programs()}
    with BpfObject.from_path(object_path("sysctl_tuner", legacy=variant == "legacy")) as obj:
        for name in obj.programs:
            obj.set_autoload(name, name == program)
        obj.load()
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
    outlives its process, `bpftool cgroup tree` names it, and the next start
    detaches it and says so."""
    with left_attached(GATE, variant) as prog_id:
        assert any(line.split()[:1] == [str(prog_id)] and GATE in line for line in bpftool("cgroup", "tree"))
        d = demo_daemon(state_dir, variant_args=("-L",) if variant == "legacy" else ())
        try:
            d.started()
            d.wait_for(rf"detaching old BPF program '{GATE}' \(id {prog_id}\) left by a previous daemon")
            assert not any(line.split()[:1] == [str(prog_id)] for line in bpftool("cgroup", "tree"))
            shown = [line for line in bpftool("prog", "show") if "bpftune_" in line]
            assert sum(GATE in line for line in shown) == 1, shown
            assert any("sysctl_write__" in line for line in shown), shown
            d.stop(signal.SIGKILL)
        finally:
            d.stop()
    assert not wait_programs_gone(OUR_PROGRAMS), "the kernel frees a dead daemon's programs"
    assert not [line for line in bpftool("prog", "show") if "bpftune_sysctl" in line]


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
