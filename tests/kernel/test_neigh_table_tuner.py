"""neigh_table against the real kernel: static neighbours on a veth in a namespace.

The neighbour tables' gc_thresh1/2/3 are global (one arp_cache and one
ndisc_cache for every namespace, changeable only from the initial one), so
these tests set them small for a few seconds and restore them afterwards;
the neighbours themselves live in a namespace the test creates and go away
with it.  The device in the namespace typically has the same ifindex as a
different device of the initial namespace, which is what bpftune got wrong.
"""

from __future__ import annotations

import fcntl
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pybpftune.bindings import NeighTableScenario

from .forms import fallback_forms
from .harness import SLOW, Daemon, NetnsPair, Sysctls, netns_pair, run, sysctl_get, sysctls, tuner_daemon

pytestmark = pytest.mark.kernel

# Under qemu/TCG (PYBPFTUNE_VM=1, set by tests/vm/vmtest.py) everything is ~30x slower.
WAIT = 30 * SLOW

V4 = "net.ipv4.neigh.default.gc_thresh"
V6 = "net.ipv6.neigh.default.gc_thresh"


def thresholds(prefix: str) -> tuple[int, int, int]:
    t1, t2, t3 = (int(sysctl_get(f"{prefix}{i}")) for i in (1, 2, 3))
    return (t1, t2, t3)


def set_thresholds(s: Sysctls, prefix: str, values: tuple[int, int, int]) -> None:
    for i, v in enumerate(values, 1):
        s.set(f"{prefix}{i}", v)


LOCK = Path("/run/lock/pybpftune-neigh-thresholds.lock")


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    """A namespace pair, and the machine-wide lock on the (global) thresholds:
    two runs of these tests at once would set them under each other's feet.
    Entries from other tests' namespaces may still trigger the first change,
    so the assertions accept any device unless the line is about ours."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with netns_pair("pbtnt") as p:
                yield p
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def neighbours(pair: NetnsPair, cmd: str, addrs: list[str], v6: bool = False) -> None:
    """Add or delete permanent neighbours on the server's veth, in one batch."""
    lines = []
    for a in addrs:
        lladdr = " lladdr 02:00:00:00:00:01 nud permanent" if cmd == "add" else ""
        lines.append(f"neigh {cmd} {a}{lladdr} dev {pair.server_dev}")
    batch = "\n".join(lines) + "\n"
    full = ["ip", "netns", "exec", pair.server, "ip", *(["-6"] if v6 else []), "-batch", "-"]
    proc = subprocess.run(full, input=batch, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def v4_hosts(first: int, last: int, net: str = "192.168.168") -> list[str]:
    return [f"{net}.{i}" for i in range(first, last + 1)]


def neigh_daemon(state_dir: Path, variant_args: tuple[str, ...], *extra: str) -> Daemon:
    return tuner_daemon("neigh_table", state_dir, variant_args, *extra)


@pytest.mark.guest
def test_thresholds_grow_with_static_neighbours_and_roll_back(
    pair: NetnsPair, tmp_path: Path, variant_args: tuple[str, ...]
) -> None:
    with sysctls() as s:
        set_thresholds(s, V4, (32, 64, 128))
        set_thresholds(s, V6, (32, 64, 128))
        with neigh_daemon(tmp_path, variant_args, "-R") as d:
            d.started()
            neighbours(pair, "add", v4_hosts(3, 252))
            m = d.wait_for(
                r"updated thresholds for arp_cache table, dev '[^']+' \(ifindex \d+\) in non-global ns, "
                r"from \(32 64 128\) to \((\d+) (\d+) (\d+)\), computed max 1024",
                timeout=WAIT,
            )
            grown = (int(m[1]), int(m[2]), int(m[3]))
            # A slow machine may handle the first event mid-batch and grow again later.
            assert grown[2] > 128 and thresholds(V4)[2] >= grown[2]
            d.wait_for(
                r"Due to neighbour table arp_cache nearly full .* change neigh\.arp_cache\.gc_thresh", timeout=WAIT
            )
            # IPv6: /64 addresses put no bound on ndisc_cache.
            neighbours(pair, "add", [f"fd00:168::{i:x}" for i in range(0x100, 0x1FA)], v6=True)
            d.wait_for(r"updated thresholds for ndisc_cache table, dev '[^']+'", timeout=WAIT)
            assert thresholds(V6)[2] > 128
            assert d.stop(signal.SIGTERM) == 0
        assert "Rolling back tunable values for 'neigh.arp_cache.gc_thresh'" in d.output
        assert thresholds(V4) == (32, 64, 128)
        assert thresholds(V6) == (32, 64, 128)


def test_full_slash24_stops_growth_until_the_device_gets_more_addresses(
    pair: NetnsPair, tmp_path: Path, variant_args: tuple[str, ...]
) -> None:
    with sysctls() as s:
        set_thresholds(s, V4, (256, 512, 1000))
        with neigh_daemon(tmp_path, variant_args) as d:
            d.started()
            # ~780 entries nearly fill 1000: growth stops at the /24's bound 1024.
            neighbours(pair, "add", [f"192.168.168.{i}" for i in range(3, 255)])
            neighbours(pair, "add", [f"192.168.{b}.{i}" for b in (100, 101) for i in range(1, 255)])
            neighbours(pair, "add", [f"192.168.102.{i}" for i in range(1, 20)])
            d.wait_for(
                r"updated thresholds for arp_cache table, .* to \(\d+ \d+ 1024\), computed max 1024", timeout=WAIT
            )
            assert thresholds(V4)[2] == 1024
            neighbours(pair, "add", [f"192.168.102.{i}" for i in range(20, 60)])
            d.wait_for(
                rf"can no longer update thresholds for arp_cache table, dev '{pair.server_dev}' \(ifindex \d+\) "
                r"in non-global ns: gc_thresh3 1024 has reached the computed max 1024",
                timeout=WAIT,
            )
            # The line is said once; the events of the 40 new entries (one per fill level) may still be
            # queued: give them time to be refused before the device's addresses change.
            time.sleep(1.0 * SLOW)
            assert thresholds(V4)[2] == 1024
            assert not any("from (320 640 1024)" in line for line in d.lines)
            # Three more /24s on the device raise its bound to 4096 (bpftune's max2 test).
            mark = len(d.lines)
            for b in (110, 111, 112):
                run(["ip", "addr", "add", f"10.{b}.0.1/24", "dev", pair.server_dev], pair.server)
            neighbours(pair, "add", [f"192.168.102.{i}" for i in range(60, 100)])
            d.wait_for(
                r"updated thresholds for arp_cache table, .* from \(\d+ \d+ 1024\) .*computed max 4096",
                start=mark,
                timeout=WAIT,
            )
            assert thresholds(V4)[2] > 1024


def test_large_table_shrinks_back_when_emptied_with_ipv6_off(
    pair: NetnsPair, tmp_path: Path, variant_args: tuple[str, ...]
) -> None:
    # IPv6 disabled where the entries live must not get in the way of IPv4.
    run(["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"], pair.server)
    with sysctls() as s:
        set_thresholds(s, V4, (512, 2048, 4096))
        with neigh_daemon(tmp_path, variant_args) as d:
            d.started()
            hosts = v4_hosts(3, 254)
            neighbours(pair, "add", hosts)
            neighbours(pair, "del", hosts)
            d.wait_for(
                r"reduced thresholds for arp_cache table, dev '[^']+' \(ifindex \d+\) in non-global ns, "
                r"from \(512 2048 4096\) to \(384 1536 3072\)",
                timeout=WAIT,
            )
            t = thresholds(V4)
            assert 1024 <= t[2] < 4096 and t[0] >= 128 and t[1] >= 512
            d.stop()
        assert "Traceback" not in d.output


# --- the removal signal's fallback forms (fentry / kprobe on neigh_remove_one) ----------------


@pytest.mark.guest
@pytest.mark.all_variants  # kprobe forms in the legacy variant, fentry in the full one
def test_removal_fallback_forms_fire_or_say_why(pair: NetnsPair, variant: str) -> None:
    """neigh_remove via neigh_remove_one where fentry/kprobes work (the VMs);
    elsewhere the error names the signal and why each form failed."""
    with fallback_forms("neigh_table_tuner", variant, tuner_id=5, optional_signals={"neigh_add"}) as forms:
        if forms.loaded is None:
            forms.assert_says_why("neigh_remove")
            return
        got = forms.events
        with sysctls() as s:
            forms.assert_chose_fallback("neigh_remove", variant)
            set_thresholds(s, V4, (512, 2048, 4096))
            neighbours(pair, "add", ["192.168.168.77"])
            neighbours(pair, "del", ["192.168.168.77"])
            forms.poll_until(lambda: bool(got), 10)
        assert got, "no event from neigh_remove_one"
        stats = got[0].payload("struct neigh_table_stats")
        assert got[0].scenario_id == NeighTableScenario.EMPTY
        assert stats.thresh3 == 4096 and stats.ifindex > 0
