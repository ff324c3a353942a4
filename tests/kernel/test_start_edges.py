"""Start and stop edges against the real kernel: SIGTERM at any moment of
start-up leaves nothing half-applied, and bpftune's default cgroup path
(/var/run/bpftune/cgroupv2, through the /var/run -> /run link) works again
after a daemon that mounted it was killed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pybpftune import libbpf

from .harness import SLOW, Daemon, journaled, sysctl_get, sysctls, trusted_dir

pytestmark = pytest.mark.kernel

FIN = "net.ipv4.tcp_fin_timeout"
ALLOWED = "net.ipv4.tcp_allowed_congestion_control"
DEFAULT_CC = "net.ipv4.tcp_congestion_control"

# A BPF-free tuner that writes as it starts: it starts during start() itself,
# while the BPF tuners are still loading.
EARLY = """\
from pybpftune.tuner import Proposal, Scenario, Tunable, Tuner


class Early(Tuner):
    name = "early"
    tunables = (Tunable(0, "net.ipv4.tcp_fin_timeout", 1, lower=1, upper=600),)
    scenarios = (Scenario(0, "early", "Written at start."),)

    def start(self):
        glob = self.ctx.namespaces.global_cookie
        self.apply(Proposal(0, 0, glob, (self.current(0)[0] + 1,), "early"))


TUNER = Early
"""


def our_programs() -> list[str]:
    return [name for _id, name, _t in libbpf.loaded_programs(full_names=True) if name.startswith("bpftune_")]


def wait_no_programs(timeout: float = 5 * SLOW) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := our_programs()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def early_dir() -> Iterator[Path]:
    with trusted_dir() as d:
        path = d / "early_tuner.py"
        path.write_text(EARLY)
        path.chmod(0o644)
        yield d


def test_sigterm_at_any_moment_of_start_up_leaves_nothing_applied(
    tmp_path: Path, early_dir: Path, variant_args: tuple[str, ...]
) -> None:
    """With -R every write made before the signal is rolled back, however
    early it comes; the daemon exits 0 once it has said anything."""
    if our_programs():
        pytest.skip(f"programs named like ours are loaded already: {our_programs()}")
    state_dir = tmp_path / "state"
    args = ["-s", "-R", "-a", "sysctl", "-a", "tcp_conn", "-a", "early", "-l", str(early_dir)]
    args += ["--state-dir", str(state_dir), *variant_args]
    rng = random.Random(int(os.environ.get("PYBPFTUNE_SEED", "9")))
    # Aimed moments (after a line) and blind ones (a delay after the exec).
    moments: list[str | float] = ["serving queries", "starting", "tuner early started", "tuner sysctl started"]
    moments += [rng.uniform(0.0, 1.5 * SLOW) for _ in range(6)]
    with sysctls() as s:
        for name in (ALLOWED, DEFAULT_CC, FIN):
            s.save(name)
        before = {name: sysctl_get(name) for name in (FIN, ALLOWED, DEFAULT_CC)}
        rolled_back = 0
        for moment in moments:
            d = Daemon(args)
            try:
                if isinstance(moment, str):
                    d.wait_for(moment, timeout=60 * SLOW)
                else:
                    time.sleep(moment)
                rc = d.stop(signal.SIGTERM)
            finally:
                d.stop(signal.SIGKILL)
            said = [line for line in d.lines if "serving queries" in line]
            where = f"SIGTERM at {moment!r}; output:\n{d.output}"
            if said:
                assert rc == 0, where
                assert "Traceback" not in d.output, where
                assert journaled(state_dir) == {}, "a clean -R exit leaves nothing journaled; " + where
            else:
                assert rc in (0, -signal.SIGTERM), where  # before the daemon handles signals: nothing written
            after = {name: sysctl_get(name) for name in (FIN, ALLOWED, DEFAULT_CC)}
            assert after == before, where
            assert not wait_no_programs(), where
            rolled_back += f"Rolling back sysctl values for '{FIN}'" in d.output
        assert rolled_back, "the early tuner's write was made (and undone) at least once"


CGROUP = Path("/var/run/bpftune/cgroupv2")


def cgroup2_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2" and parts[1] == real:
            return True
    return False


def test_default_cgroup_path_works_after_kill9(tmp_path: Path, variant_args: tuple[str, ...]) -> None:
    """bpftune's -c /var/run/bpftune/cgroupv2: the first daemon mounts it and
    is killed; the next one reuses the mount it left instead of mounting over it."""
    if not Path("/var/run").is_symlink():
        pytest.skip("/var/run is no symbolic link here")
    real = Path(os.path.realpath(CGROUP))
    existed = [p for p in (real.parent, real) if p.exists()]
    mounted_before = cgroup2_mounted(CGROUP)
    args = ["-s", "-a", "sysctl", "-c", str(CGROUP), "--state-dir", str(tmp_path / "state"), *variant_args]
    try:
        first = Daemon(args)
        try:
            first.started()
        finally:
            first.stop(signal.SIGKILL)
        assert cgroup2_mounted(CGROUP), "the killed daemon's mount is left"
        with Daemon(args) as second:
            second.started()
            assert second.stop() == 0
        assert "cannot mount" not in second.output, second.output
        with Daemon(args) as third:  # and again, after a clean exit
            third.started()
            assert third.stop() == 0
    finally:
        if not mounted_before and cgroup2_mounted(CGROUP):
            subprocess.run(["umount", "-l", str(real)], check=False)
        for p in (real, real.parent):
            if p not in existed:
                try:
                    p.rmdir()
                except OSError:
                    pass
    assert cgroup2_mounted(CGROUP) == mounted_before
