"""route_table against the real kernel: a small max_size and many IPv6 routes.

net.ipv6.route.max_size is per namespace, so the test shrinks it inside a
namespace it creates.  Kernels without namespace cookies (before 5.14) cannot
name that namespace to user space: there the test uses the initial namespace
(only ever in a throwaway VM) and restores it.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pybpftune.netns import Namespaces
from pybpftune.support import probe_support
from pybpftune.tuners import route_table as rt

from .forms import fallback_forms
from .harness import SLOW, NetnsPair, netns_pair, run, sysctl_get, sysctls, tuner_daemon

pytestmark = pytest.mark.kernel

# Under qemu/TCG (PYBPFTUNE_VM=1, set by tests/vm/vmtest.py) everything is ~30x slower.
WAIT = 30 * SLOW

MAX_SIZE = "net.ipv6.route.max_size"
# Dummy links for the garbage-collector test: each adds about three routes,
# so 24 put some 70 routes against a max_size of 32 (bpftune's test: 1023).
LINKS = 24
COOKIES = Namespaces().cookie_supported


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    with netns_pair("pbtrt") as p:
        yield p


@pytest.fixture
def netns(pair: NetnsPair) -> Iterator[str | None]:
    """Where the routes go: the pair's server namespace, or, without cookies
    (only ever in a throwaway VM), the initial one, with the server's veth
    end moved there."""
    if COOKIES:
        yield pair.server
        return
    run(["ip", "link", "set", pair.server_dev, "netns", "1"], pair.server)
    try:
        run(["ip", "-6", "addr", "add", f"{pair.server_addr6}/64", "dev", pair.server_dev, "nodad"])
        run(["ip", "link", "set", pair.server_dev, "up"])
        yield None
    finally:
        run(["ip", "link", "del", pair.server_dev], check=False)


def add_routes(pair: NetnsPair, count: int, netns: str | None) -> None:
    """``count`` IPv6 routes via the peer, in one batch, where the test runs."""
    dev = pair.server_dev
    batch = "".join(f"route add fd00:{0x7000 + i:x}::/64 via {pair.client_addr6} dev {dev}\n" for i in range(count))
    full = [*(["ip", "netns", "exec", netns] if netns else []), "ip", "-6", "-batch", "-"]
    proc = subprocess.run(full, input=batch, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def lookups(netns: str | None, count: int = 10) -> None:
    """IPv6 route lookups (each ping looks its destination up)."""
    for i in range(count):
        cmd = ["ping", "-6", "-c", "1", "-W", "0.2", f"fd00:{0x7000 + i:x}::1"]
        run(cmd, netns, check=False)


@pytest.mark.guest
def test_max_size_grows_when_the_table_nears_it(
    pair: NetnsPair, netns: str | None, tmp_path: Path, variant_args: tuple[str, ...]
) -> None:
    where = "non-global ns" if netns else "global ns"
    with sysctls() as s:
        s.set(MAX_SIZE, 4096, netns)
        with tuner_daemon("route_table", tmp_path, variant_args) as d:
            d.started()
            add_routes(pair, 40, netns)
            # Room to spare: nothing happens.
            lookups(netns, 10)
            time.sleep(1)
            assert sysctl_get(MAX_SIZE, netns) == "4096"
            assert "dst table filling up" not in d.output
            # Nearly full: it grows.
            s.set(MAX_SIZE, 32, netns)
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline and "dst table filling up" not in d.output:
                lookups(netns, 3)
            m = d.wait_for(rf"Due to dst table filling up, change {MAX_SIZE} from \(32\) -> \((\d+)\)", timeout=WAIT)
            d.wait_for(
                rf"Scenario 'destination table nearly full' occurred for tunable '{MAX_SIZE}' in {where}\.",
                timeout=WAIT,
            )
            assert int(sysctl_get(MAX_SIZE, netns)) >= int(m[1]) > 32


# --- the garbage collector (dst_gc: fentry / kprobe on fib6_run_gc) ----------------------


@contextmanager
def bare_netns() -> Iterator[str | None]:
    """A namespace with nothing in it but lo (no traffic, so no route
    lookups), or, without cookies (only ever in a throwaway VM), the initial
    one."""
    if not COOKIES:
        yield None
        return
    name = f"pbtrtg{os.getpid()}"
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "link", "set", "lo", "up"], name)
        yield name
    finally:
        run(["ip", "netns", "del", name], check=False)


def rt6_entries(netns: str | None) -> int:
    """The namespace's IPv6 route count (fib_rt_entries, /proc/net/rt6_stats)."""
    return int(run(["cat", "/proc/net/rt6_stats"], netns).split()[3], 16)


@contextmanager
def dummy_links(netns: str | None, count: int) -> Iterator[None]:
    """``count`` dummy links brought up (each adds its link-local prefix,
    local and multicast routes, without a single route lookup); deleted at
    the end, also on failure."""
    names = [f"pbtd{os.getpid() % 10000}x{i}" for i in range(count)]
    prefix = ["ip", "netns", "exec", netns] if netns else []
    run(["modprobe", "dummy"], check=False)
    batch = "".join(f"link add {n} type dummy\nlink set {n} up\n" for n in names)
    proc = subprocess.run([*prefix, "ip", "-batch", "-"], input=batch, capture_output=True, text=True, timeout=120)
    try:
        assert proc.returncode == 0, proc.stderr
        yield
    finally:
        batch = "".join(f"link del {n}\n" for n in names)
        subprocess.run(
            [*prefix, "ip", "-force", "-batch", "-"], input=batch, capture_output=True, text=True, timeout=120
        )


@pytest.mark.guest
@pytest.mark.all_variants  # fentry in the full variant, kprobe in the legacy one
def test_links_that_come_and_go_grow_max_size_without_lookups(
    tmp_path: Path, variant: str, variant_args: tuple[str, ...]
) -> None:
    """bpftune's route_table scenario: a namespace's table filled by dummy
    links coming up, then deleted, with no route lookup in the namespace at
    all.  Only the garbage collector sees it (fib6_run_gc runs when a device
    goes down, and when dst allocations pass gc_thresh).  Where neither
    fentry nor kprobes work (the host), the daemon says so for dst_gc."""
    support = probe_support()
    with bare_netns() as netns, sysctls() as s:
        where = "non-global ns" if netns else "global ns"
        s.set("net.ipv6.route.gc_thresh", 16, netns)
        s.set(MAX_SIZE, 32, netns)
        with tuner_daemon("route_table", tmp_path, variant_args) as d:
            d.started()
            if not (support.works("kprobe") or (variant == "full" and support.works("fentry"))):
                # The host: no form of dst_gc can work, and the daemon says why.
                why = d.wait_for(r"tuner route_table: signal dst_gc: unavailable \((.*)\)").group(1)
                assert "kprobe:" in why and (variant == "legacy" or "fentry:" in why), why
                return
            with dummy_links(netns, LINKS):
                deadline = time.monotonic() + WAIT
                while rt6_entries(netns) < 2 * LINKS and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert rt6_entries(netns) >= 2 * LINKS
            m = d.wait_for(rf"Due to dst table filling up, change {MAX_SIZE} from \(32\) -> \((\d+)\)", timeout=WAIT)
            d.wait_for(
                rf"Scenario 'destination table nearly full' occurred for tunable '{MAX_SIZE}' in {where}\.",
                timeout=WAIT,
            )
            assert int(sysctl_get(MAX_SIZE, netns)) >= int(m[1]) > 32
            assert "dst_gc via" in d.wait_for(r"tuner route_table started \((.*)\)").group(1)


@pytest.mark.guest
@pytest.mark.all_variants  # kprobe forms in the legacy variant, fentry in the full one
def test_gc_forms_fire_or_say_why(pair: NetnsPair, netns: str | None, variant: str) -> None:
    """bpftune's hook, fib6_run_gc, where fentry/kprobes work (the VMs); on
    the host the error names the signal and why each form cannot work."""
    with fallback_forms("route_table_tuner", variant, tuner_id=6, netns=True, optional_signals={"dst_table"}) as forms:
        if forms.loaded is None:
            # dst_gc has no tracepoint form: only its own forms' reasons.
            assert "signal dst_gc" in forms.why and "kprobe" in forms.why, forms.why
            assert variant == "legacy" or "fentry" in forms.why, forms.why
            assert not forms.real.works("kprobe"), forms.why
            return
        got = forms.events
        with sysctls() as s:
            forms.assert_chose_fallback("dst_gc", variant)
            s.set(MAX_SIZE, 32, netns)
            add_routes(pair, 40, netns)
            run(["sysctl", "-q", "-w", "net.ipv6.route.flush=1"], netns)  # runs fib6_run_gc (write-only)
            forms.poll_until(lambda: bool(got), 10)
        assert got, "no event from fib6_run_gc"
        update = got[0].update(0)
        assert got[0].scenario_id == rt.FULL and update.id == rt.MAX_SIZE
        assert update.old[0] == 32 and update.old[1] >= 40 and update.new[0] == 40
