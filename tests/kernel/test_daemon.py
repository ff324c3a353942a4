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
from pathlib import Path

import pytest

from pybpftune import libbpf

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
    return [name for _id, name, _t in libbpf.loaded_programs()]


def wait_programs_gone(names: set[str], timeout: float = 5) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        left = [n for n in program_names() if n in names]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


OUR_PROGRAMS = {"sysctl_gate", "sysctl_write__c", "sysctl_write__f", "sysctl_write__k"}


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
        assert names.count("sysctl_gate") == 1, "the dead daemon's programs must be gone"
        second.stop()
    assert not wait_programs_gone(OUR_PROGRAMS)
    assert not list(state_dir.glob("originals-*.jsonl"))


def test_unknown_tuner_is_one_line_and_nothing_attached(state_dir: Path) -> None:
    before = program_names().count("sysctl_gate")
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
    assert program_names().count("sysctl_gate") <= before


def test_bpf_free_tuners_alone_still_run(fin: Sysctls, state_dir: Path) -> None:
    with Daemon(["-s", "-a", "demo", "-l", str(demo_tuners_dir()), "--state-dir", str(state_dir), "-R"]) as d:
        d.started()
        d.wait_for(r"from \(60\) -> \(61\)")
        assert d.stop() == 0
    assert sysctl_get(FIN) == "60"
