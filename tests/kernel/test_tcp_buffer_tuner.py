"""tcp_buffer on the real kernel: starved buffers in a namespace get raised.

A namespace pair over veth; the starved side's tcp_rmem (or tcp_wmem) has its
maximum equal to its default, and iperf3 pushes data through it.  The
daemon must raise the maximum in that namespace only, say why with the old
and new values, and (for tcp_rmem) turn tcp_moderate_rcvbuf on.  The
tracepoint forms of the signals (tcp:tcp_rcv_space_adjust, tcp:tcp_probe,
sock:inet_sock_set_state, sock:sock_exceed_buf_limit) exist on every kernel
we run on, so both variants work on the host and in the VMs; the fentry /
kprobe-only signals (mem_pressure, syn_flood) are reported unavailable on the
host, with the reason, and are attached in the VMs.

The daemon runs with -R and the global TCP sysctls are saved and restored:
other traffic on the machine must not leave the global namespace changed.

Kernels before 5.14 have no network-namespace cookies: events from other
namespaces cannot be attributed (the daemon says "does not support per-netns
policy"), so there the same scenarios run in the global namespace over
loopback (in the throwaway VM), and the start-up line is checked instead.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from pybpftune.bpf import object_path
from pybpftune.events import Event
from pybpftune.loader import load_object
from pybpftune.netns import current_cookie, current_inode
from pybpftune.objects import LoadedObject
from pybpftune.ringbuf import SharedMaps
from pybpftune.support import probe_support

from .harness import (
    SLOW,
    Daemon,
    Sysctls,
    iperf3_retrying,
    netns_pair,
    repeat_until_logged,
    sysctl_get,
    sysctl_set,
    sysctls,
)

pytestmark = pytest.mark.kernel

GLOBAL_SAVED = ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem", "net.ipv4.tcp_mem", "net.core.high_order_alloc_disable")
OPTIONAL_SIGNALS = ("mem_pressure", "syn_flood")
CHANGE = r"change net\.ipv4\.{name}\(min default max\) from \((\d+) (\d+) (\d+)\) -> \((\d+) (\d+) (\d+)\)"


def tb_daemon(variant_args: tuple[str, ...], state_dir: Path) -> Daemon:
    return Daemon(["-s", "-a", "tcp_buffer", "-R", "--state-dir", str(state_dir), *variant_args])


@dataclass
class Site:
    """Where a test's server and client live: two namespaces over veth, or
    (without namespace cookies) the global namespace over loopback."""

    server: str | None
    client: str | None
    addr: str

    @property
    def where(self) -> str:
        return "non-global ns" if self.server else "global ns"

    def cmd(self, ns: str | None, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv] if ns else argv


COOKIES = current_cookie() is not None


@contextmanager
def site() -> Iterator[Site]:
    if COOKIES:
        with netns_pair("pbttb") as pair:
            yield Site(pair.server, pair.client, pair.server_addr)
    else:
        yield Site(None, None, "127.0.0.1")


def check_netns_policy(d: Daemon) -> None:
    expected = "supports" if COOKIES else "does not support"
    assert f"bpftune {expected} per-netns policy" in d.output


def traffic_until(d: Daemon, where: Site, pattern: str, timeout: float = 120, port: int = 5431) -> re.Match[str]:
    """iperf3 client -> server in short runs until the daemon logs a line
    matching ``pattern``."""
    deadline = time.monotonic() + timeout
    server = subprocess.Popen(
        where.cmd(where.server, ["iperf3", "-s", "-p", str(port)]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while True:
            iperf3_when_ready(where, port, seconds=3)
            try:
                return d.wait_for(pattern, timeout=2)
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
    finally:
        server.kill()
        server.wait()


def iperf3_when_ready(where: Site, port: int, seconds: float) -> str:
    """iperf3 from the client side, retried while the server cannot take it yet."""
    return iperf3_retrying(
        where.cmd(where.client, ["iperf3", "-c", where.addr, "-p", str(port), "-t", str(seconds)]), seconds
    )


def changes(output: str, name: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(old, new) of every logged change of net.ipv4.<name>, in order."""
    out = []
    for m in re.finditer(CHANGE.format(name=name), output):
        values = tuple(int(v) for v in m.groups())
        out.append((values[:3], values[3:]))
    return out


def check_chain(found: list[tuple[tuple[int, ...], tuple[int, ...]]], first_old: tuple[int, ...], final: str) -> None:
    """Each logged change starts where the previous ended and the last one is
    what the namespace holds now; the first grows the maximum, later ones may
    also be latency back-offs, but none goes below the starting value or
    above INT_MAX, and min/default are never touched."""
    assert found, "no change logged"
    assert found[0][0] == first_old
    assert found[0][1][2] > first_old[2]
    for (_, prev_new), (old, _) in itertools.pairwise(found):
        assert old == prev_new
    for old, new in found:
        assert new[:2] == old[:2] and new[2] != old[2]
        assert first_old[2] <= new[2] <= 2**31 - 1
    assert " ".join(map(str, found[-1][1])) == final


@pytest.fixture
def saved_globals() -> Iterator[Sysctls]:
    with sysctls() as s:
        for name in GLOBAL_SAVED:
            s.save(name)
        yield s


@pytest.mark.guest
@pytest.mark.all_variants
def test_starved_receiver_gets_tcp_rmem_raised(
    saved_globals: Sysctls, variant_args: tuple[str, ...], tmp_path: Path
) -> None:
    with sysctls() as s, site() as where:
        s.set("net.ipv4.tcp_rmem", "4096 131072 131072", where.server)
        s.set("net.ipv4.tcp_moderate_rcvbuf", 0, where.server)
        client_rmem = sysctl_get("net.ipv4.tcp_rmem", where.client)
        with tb_daemon(variant_args, tmp_path) as d:
            d.started()
            check_netns_policy(d)
            assert "rcv_space via" in d.output
            traffic_until(
                d,
                where,
                r"Due to need to increase max buffer size to maximize throughput \(a receiver .*\) "
                + CHANGE.format(name="tcp_rmem"),
            )
            d.wait_for(r"change net\.ipv4\.tcp_moderate_rcvbuf from \(0\) -> \(1\)")
            rmem = sysctl_get("net.ipv4.tcp_rmem", where.server)
            assert int(rmem.split()[2]) > 131072
            assert sysctl_get("net.ipv4.tcp_moderate_rcvbuf", where.server) == "1"
            if where.client != where.server:
                assert sysctl_get("net.ipv4.tcp_rmem", where.client) == client_rmem
            check_chain(changes(d.output, "tcp_rmem"), (4096, 131072, 131072), rmem)
            assert f"for tunable 'net.ipv4.tcp_rmem' in {where.where}" in d.output
            # Growth follows need: no runaway toward the INT_MAX wall.
            assert int(rmem.split()[2]) <= 64 << 20
            assert d.stop() == 0
        assert "Summary: scenario 'need to increase TCP buffer size(s)'" in d.output
        assert "Sample 'rcv_space': associated program was called" in d.output


@pytest.mark.guest
@pytest.mark.all_variants
def test_starved_sender_gets_tcp_wmem_raised(
    saved_globals: Sysctls, variant_args: tuple[str, ...], tmp_path: Path
) -> None:
    with sysctls() as s, site() as where:
        s.set("net.ipv4.tcp_wmem", "4096 16384 16384", where.client)
        with tb_daemon(variant_args, tmp_path) as d:
            d.started()
            check_netns_policy(d)
            # The send-side signal has a tracepoint form (tcp:tcp_probe) on
            # every kernel we support, so it is never reported unavailable.
            assert "snd_buf via" in d.output
            assert "signal snd_buf: unavailable" not in d.output
            traffic_until(
                d,
                where,
                r"Due to need to increase max buffer size to maximize throughput \(a sender .*\) "
                + CHANGE.format(name="tcp_wmem"),
            )
            wmem = sysctl_get("net.ipv4.tcp_wmem", where.client)
            assert int(wmem.split()[2]) > 16384
            check_chain(changes(d.output, "tcp_wmem"), (4096, 16384, 16384), wmem)
            assert f"for tunable 'net.ipv4.tcp_wmem' in {where.where}" in d.output
            assert d.stop() == 0
        assert "Sample 'snd_buf': associated program was called" in d.output


@pytest.mark.all_variants
def test_startup_log_accounts_for_every_optional_signal(
    saved_globals: Sysctls, variant_args: tuple[str, ...], tmp_path: Path
) -> None:
    """Each optional signal is either attached (named in the start line) or
    reported unavailable with the reason of every form."""
    support = probe_support()
    with tb_daemon(variant_args, tmp_path) as d:
        d.started()
        started = d.wait_for(r"tuner tcp_buffer started \((.*)\)").group(1)
        for signal in OPTIONAL_SIGNALS:
            if f"{signal} via" in started:
                continue
            line = d.wait_for(rf"tuner tcp_buffer: signal {signal}: unavailable \((.*)\)").group(1)
            assert "kprobe:" in line
            if not variant_args:
                assert "fentry:" in line
        if not support.works("fentry") and not support.works("kprobe"):
            # The host: no fentry, no kprobes.
            for signal in OPTIONAL_SIGNALS:
                assert f"signal {signal}: unavailable" in d.output
        else:
            for signal in OPTIONAL_SIGNALS:
                assert f"{signal} via" in started


@pytest.mark.guest
@pytest.mark.all_variants
def test_syn_flood_with_connections_grows_tcp_max_syn_backlog(
    saved_globals: Sysctls, variant_args: tuple[str, ...], tmp_path: Path
) -> None:
    """tcp_syncookies=2 (cookies always) sends every SYN down the kernel's
    flood path, which is the syn_flood signal's condition (fentry / kprobe on
    tcp_conn_request); the connections complete, so the floods correlate
    with established connections and tcp_max_syn_backlog grows where the
    listener lives.  Where neither form attaches (the development host) the
    daemon must say so instead."""
    n, port = 40, 5412
    with sysctls() as s, site() as where:
        s.set("net.ipv4.tcp_syncookies", 2, where.server)
        backlog = int(sysctl_get("net.ipv4.tcp_max_syn_backlog", where.server))
        s.save("net.ipv4.tcp_max_syn_backlog", where.server)
        with tb_daemon(variant_args, tmp_path) as d:
            d.started()
            if "syn_flood via" not in d.wait_for(r"tuner tcp_buffer started \((.*)\)").group(1):
                line = d.wait_for(r"tuner tcp_buffer: signal syn_flood: unavailable \((.*)\)").group(1)
                support = probe_support()
                assert not support.works("kprobe") and not (support.works("fentry") and not variant_args), line
                return

            m = repeat_until_logged(
                d,
                lambda: connect_and_accept(where, n, port),
                r"Due to SYN flood with connections established change net\.ipv4\.tcp_max_syn_backlog "
                r"from \((\d+)\) -> \((\d+)\)",
                timeout=60,
                look=1,
            )
            old, new = int(m.group(1)), int(m.group(2))
            assert old == backlog and new > backlog
            assert (
                f"'increase maximum syn backlog' occurred for tunable 'net.ipv4.tcp_max_syn_backlog' in {where.where}"
                in d.output
            )
            assert int(sysctl_get("net.ipv4.tcp_max_syn_backlog", where.server)) >= new
            if where.client != where.server:
                assert int(sysctl_get("net.ipv4.tcp_max_syn_backlog", where.client)) == backlog
            assert d.stop() == 0
        # -R: back to the original.
        assert int(sysctl_get("net.ipv4.tcp_max_syn_backlog", where.server)) == backlog


LOW_MEM_SWITCHES = [
    name
    for name in ("net.ipv4.tcp_no_metrics_save", "net.ipv4.tcp_no_ssthresh_metrics_save")  # the second: 5.11+
    if Path("/proc/sys", name.replace(".", "/")).exists()
]


@pytest.mark.guest
@pytest.mark.vm_only  # TCP memory is one pool for the whole machine: never starve a shared host's
def test_tcp_memory_exhaustion_enters_and_leaves_the_low_memory_state(
    saved_globals: Sysctls, variant_args: tuple[str, ...], tmp_path: Path
) -> None:
    """bpftune's mem_exhaust scenario: tcp_mem "20 50 50" and 100 parallel
    connections.  The tuner grows tcp_mem and, TCP memory being near
    exhaustion, enters the low-memory state in the host's namespace (and the
    one whose sockets hit the limit): tcp_no_metrics_save and
    tcp_no_ssthresh_metrics_save go to 1.  When memory recovers (here the
    administrator gives TCP its memory back) they go back to 0."""
    port = 5461
    with sysctls() as s, site() as where:
        for name in LOW_MEM_SWITCHES:  # off everywhere (tcp_no_ssthresh_metrics_save defaults to 1)
            for ns in dict.fromkeys((None, where.server, where.client)):
                s.set(name, 0, ns)
        plenty = sysctl_get("net.ipv4.tcp_mem")
        s.set("net.ipv4.tcp_mem", "20 50 50")
        with tb_daemon(variant_args, tmp_path) as d:
            d.started()
            server = subprocess.Popen(
                where.cmd(where.server, ["iperf3", "-s", "-p", str(port)]),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                cmd = ["iperf3", "-c", where.addr, "-p", str(port), "-t", "5", "-P", "100"]
                iperf3_retrying(where.cmd(where.client, cmd), 5)
            finally:
                server.kill()
                server.wait()
            for name in LOW_MEM_SWITCHES:
                d.wait_for(
                    rf"Scenario 'set tunable on entering low-memory state' occurred for tunable '{name}' in global ns\."
                )
                d.wait_for(rf"Due to TCP memory near exhaustion change {name} from \(0\) -> \(1\)")
                if where.server:  # the namespaces whose sockets hit the limit enter too
                    assert f"low-memory state' occurred for tunable '{name}' in non-global ns." in d.output
                assert sysctl_get(name) == "1" or "unset tunable set earlier" in d.output
            assert int(sysctl_get("net.ipv4.tcp_mem").split()[2]) > 50
            # Memory recovers: every switch goes back.
            sysctl_set("net.ipv4.tcp_mem", plenty)
            for name in LOW_MEM_SWITCHES:
                d.wait_for(
                    rf"Scenario 'unset tunable set earlier in low-memory state' occurred for tunable '{name}' "
                    r"in global ns\.",
                    timeout=30 * SLOW,
                )
                d.wait_for(rf"Due to TCP memory no longer short change {name} from \(1\) -> \(0\)")
                assert sysctl_get(name) == "0"
            assert d.stop() == 0


def bpf_globals() -> dict[str, int]:
    return {
        "tuner_id": 1,
        "bpftune_pid": os.getpid(),
        "bpftune_netns_cookie_supported": int(COOKIES),
        "bpftune_init_netns_inum": current_inode(),
    }


NETNS_COOKIE = "import socket; s = socket.socket(); print(int.from_bytes(s.getsockopt(1, 71, 8), 'little'))"


def netns_cookie(ns: str | None) -> int:
    """The namespace's cookie as the BPF side reports it (0: the global
    namespace without cookie support)."""
    if ns is None and not COOKIES:
        return 0
    cmd = Site(ns, None, "").cmd(ns, [sys.executable, "-c", NETNS_COOKIE])
    return int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


CONNECT = """
import socket, sys
for _ in range(int(sys.argv[2])):
    c = socket.create_connection((sys.argv[1], int(sys.argv[3])))
    c.close()
"""
ACCEPT = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a run again on the same port
s.bind((sys.argv[1], int(sys.argv[3])))
s.listen(64)
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    c, _ = s.accept()
    c.close()
"""


def connect_and_accept(where: Site, n: int, port: int) -> None:
    """``n`` TCP connections from the client side, each accepted and closed."""
    server = subprocess.Popen(
        where.cmd(where.server, [sys.executable, "-c", ACCEPT, where.addr, str(n), str(port)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        connect = where.cmd(where.client, [sys.executable, "-c", CONNECT, where.addr, str(n), str(port)])
        subprocess.run(connect, check=True, timeout=120)
        server.wait(60)
    finally:
        server.kill()
        server.wait()


def loaded(variant: str, ring: SharedMaps) -> LoadedObject:
    path = object_path("tcp_buffer_tuner", legacy=variant == "legacy")
    return load_object(
        path,
        "tcp_buffer_tuner",
        probe_support(),
        shared=ring,
        globals_=bpf_globals(),
        optional_signals=OPTIONAL_SIGNALS,
    )


def test_established_connections_are_counted_per_namespace(variant: str) -> None:
    """The SYN-backlog rule correlates floods with established connections.
    Upstream's counter compared the sockops op with BPF_TCP_ESTABLISHED and
    stayed 0; ours counts every transition to ESTABLISHED, per namespace."""
    n, port = 7, 5411
    with site() as where, SharedMaps() as ring, loaded(variant, ring) as lo:
        assert lo.choices["conn_state"].chosen is not None
        connect_and_accept(where, n, port)
        stats = lo.map("bpftune_synstat")
        # Both ends count where they live; over loopback both are global.
        expected = n if where.server != where.client else 2 * n
        for ns in {where.server, where.client}:
            raw = stats[netns_cookie(ns).to_bytes(8, "little")]
            established = int.from_bytes(raw[8:16], "little")
            assert established == expected, f"{ns or 'global'}: {established} connections counted, {expected} made"


RECEIVER = """
import socket, sys
s = socket.socket()
if int(sys.argv[3]):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # locks the size
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
buf = bytearray(1 << 20)
while c.recv_into(buf):
    pass
"""
BULK_SENDER = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
chunk = b"x" * (1 << 20)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    c.sendall(chunk)
c.close()
"""


def rmem_events(where: Site, variant: str, locked: bool, port: int) -> int:
    """tcp_rmem proposals the BPF side sends while a receiver on the server
    side (its buffer at tcp_rmem[2]) reads a bulk transfer."""
    events: list[Event] = []
    with SharedMaps() as ring, loaded(variant, ring):
        ring.register(1, events.append)
        server = subprocess.Popen(
            where.cmd(where.server, [sys.executable, "-c", RECEIVER, where.addr, str(port), str(int(locked))]),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            sender = subprocess.Popen(
                where.cmd(where.client, [sys.executable, "-c", BULK_SENDER, where.addr, str(port), "3"])
            )
            while sender.poll() is None:
                ring.poll(100)
            ring.poll(100)
        finally:
            server.kill()
            server.wait()
    cookie = netns_cookie(where.server)
    return sum(1 for e in events if e.netns_cookie == cookie and e.update(0).id == 1)


def test_so_rcvbuf_sockets_are_left_to_their_owner(saved_globals: Sysctls, variant: str) -> None:
    """A receiver that fixed its buffer with SO_RCVBUF opts out of kernel
    autotuning: its full buffer says nothing about tcp_rmem."""
    with sysctls() as s, site() as where:
        s.set("net.ipv4.tcp_rmem", "4096 65536 65536", where.server)
        assert rmem_events(where, variant, locked=False, port=5413) > 0
        assert rmem_events(where, variant, locked=True, port=5414) == 0
