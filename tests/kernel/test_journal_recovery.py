"""Nothing lost after kill -9, for a string sysctl: tcp_conn extends
net.ipv4.tcp_allowed_congestion_control at start; killed with SIGKILL it cannot
put the list back, so the next start with -R must, from the journal.

The demo-tuner twin for a numeric sysctl is test_daemon.py's
test_restart_after_kill9_restores_and_leaves_no_programs.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from pybpftune import libbpf
from pybpftune.tuners.tcp_conn import ALGS

from .harness import SLOW, Daemon, Sysctls, journaled, sysctls

pytestmark = pytest.mark.kernel

ALLOWED = "net.ipv4.tcp_allowed_congestion_control"
DEFAULT_CC = "net.ipv4.tcp_congestion_control"
CHANGE = r"change net\.ipv4\.tcp_allowed_congestion_control from \(([^)]*)\) -> \(([^)]*)\)"


def proc(name: str) -> str:
    return " ".join(Path("/proc/sys", name.replace(".", "/")).read_text().split())


def conn_tuners() -> int:
    return [name for _id, name, _t in libbpf.loaded_programs(full_names=True)].count("bpftune_conn_tuner")


def wait_conn_tuners(count: int, timeout: float = 5 * SLOW) -> int:
    deadline = time.monotonic() + timeout
    while (n := conn_tuners()) != count and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def leave_something_to_add(s: Sysctls) -> None:
    """The tuner must have an algorithm to add: if every one it may choose is
    allowed already, take one (not the default, if possible) off the list."""
    allowed, available, default = (
        proc(ALLOWED).split(),
        proc("net.ipv4.tcp_available_congestion_control"),
        proc(DEFAULT_CC),
    )
    if any(a in available.split() and a not in allowed for a in ALGS):
        return
    ours = sorted((a for a in ALGS if a in allowed), key=lambda a: a == default)
    assert ours, f"none of {ALGS} is allowed or available here ({available})"
    s.set(ALLOWED, " ".join(a for a in allowed if a != ours[0]))


def test_allowed_congestion_control_is_restored_after_kill9(tmp_path: Path, variant_args: tuple[str, ...]) -> None:
    state_dir = tmp_path / "state"
    args = ["-s", "-a", "tcp_conn", "--state-dir", str(state_dir), *variant_args]
    with sysctls() as s:
        # Restored in reverse: the default first (setting it re-allows it), the list last.
        s.save(ALLOWED)
        s.save(DEFAULT_CC)
        leave_something_to_add(s)
        before = proc(ALLOWED)
        first = Daemon(args)
        try:
            first.started()
            m = first.wait_for(CHANGE)
            original, extended = m.group(1), m.group(2)
            assert proc(ALLOWED) == extended
            assert journaled(state_dir) == {ALLOWED: original}
            first.stop(signal.SIGKILL)
        finally:
            first.stop()
        assert proc(ALLOWED) == extended, "a daemon killed with SIGKILL restores nothing"
        # Loading a module the tuner wants (tcp_bbr, say) may add it to the list
        # by itself; the journal holds what the tuner read just before writing.
        extra = set(original.split()) - set(before.split())
        assert set(before.split()) <= set(original.split()) and extra <= set(ALGS), (before, original)

        with Daemon([*args, "-R"]) as second:
            second.started()
            second.wait_for(r"a previous daemon left 1 original value\(s\) journaled; restoring them \(-R\)")
            second.wait_for(
                rf"Rolling back sysctl values for '{re.escape(ALLOWED)}' from \({re.escape(extended)}\) to original "
                rf"values \({re.escape(original)}\) in global ns"
            )
            # Restored before the tuner started: it reads the original again.
            assert second.wait_for(CHANGE).group(1) == original
            assert wait_conn_tuners(1) == 1, "the dead daemon's sockops program must be gone"
            assert second.stop() == 0
        assert proc(ALLOWED) == original
        assert journaled(state_dir) == {}, "everything restored: no journal"
        assert wait_conn_tuners(0) == 0
