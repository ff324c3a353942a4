"""udp_buffer on the real kernel: overflowing receive queues grow rmem_*.

A receiver in one namespace binds a UDP socket and never reads it; a sender
in the other namespace fires datagrams at it until the queue overflows.  The
drop is seen by udp:udp_fail_queue_rcv_skb, so both variants work on every
kernel.  rmem_max and rmem_default are global sysctls: they are saved and
restored around each test (no other tuner or test touches them).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pybpftune.netns import current_cookie

from .harness import (
    SLOW,
    Daemon,
    NetnsPair,
    Sysctls,
    netns_pair,
    repeat_until_logged,
    sysctl_get,
    sysctls,
    tuner_daemon,
)

pytestmark = pytest.mark.kernel

RMEM_MAX = "net.core.rmem_max"
RMEM_DEFAULT = "net.core.rmem_default"
PORT = 5399

RECEIVER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if int(sys.argv[2]):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(sys.argv[2]))
s.bind((sys.argv[1], int(sys.argv[3])))
print(s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), flush=True)
time.sleep(120)
"""

SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[3])):
    s.sendto(b"x" * 1200, (sys.argv[1], int(sys.argv[2])))
"""


@pytest.fixture
def small_rmem() -> Iterator[Sysctls]:
    with sysctls() as s:
        s.set(RMEM_MAX, 16384)
        s.set(RMEM_DEFAULT, 16384)
        yield s


@contextmanager
def silent_receiver(pair: NetnsPair, rcvbuf: int = 0) -> Iterator[int]:
    """A bound UDP socket nobody reads; yields its SO_RCVBUF (sk_rcvbuf)."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", pair.server, sys.executable, "-c", RECEIVER, pair.server_addr, str(rcvbuf), str(PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def flood(pair: NetnsPair, count: int = 300) -> None:
    subprocess.run(
        ["ip", "netns", "exec", pair.client, sys.executable, "-c", SENDER, pair.server_addr, str(PORT), str(count)],
        check=True,
        timeout=60,
    )


def flood_until(d: Daemon, pair: NetnsPair, pattern: str) -> None:
    repeat_until_logged(d, lambda: flood(pair), pattern, look=1)


def udp_daemon(state_dir: Path, variant_args: tuple[str, ...]) -> Daemon:
    return tuner_daemon("udp_buffer", state_dir, variant_args)


@pytest.mark.guest
def test_overflow_at_default_size_grows_rmem_default_and_max(
    small_rmem: Sysctls, variant_args: tuple[str, ...], tmp_path: Path
) -> None:
    with netns_pair("pbtudp") as pair, udp_daemon(tmp_path, variant_args) as d:
        d.started()
        assert "fail_queue via" in d.output
        with silent_receiver(pair) as rcvbuf:
            assert rcvbuf == 16384
            flood_until(
                d,
                pair,
                r"Due to receive queue overflow of a socket using the default buffer size \(16384 bytes\) "
                r"change net.core.rmem_default from \(16384\) -> \(20480\)",
            )
        d.wait_for(
            r"Due to rmem_default growing beyond it change net.core.rmem_max from \(16384\) -> \(20480\)",
            timeout=30 * SLOW,
        )
        if current_cookie() is not None:
            # The namespace's counters; without cookies it cannot be found again.
            d.wait_for(r"netns: \d+ UDP in \d+, drops [1-9]\d* drop rate", timeout=30 * SLOW)
        assert int(sysctl_get(RMEM_DEFAULT)) >= 20480
        assert int(sysctl_get(RMEM_MAX)) >= int(sysctl_get(RMEM_DEFAULT))
        assert d.stop() == 0
    assert "Summary: scenario 'need to increase UDP buffer size(s)'" in d.output
    assert "Sample 'fail_queue': associated program was called" in d.output


def test_socket_that_set_so_rcvbuf_leaves_rmem_default_alone(
    small_rmem: Sysctls, variant_args: tuple[str, ...], tmp_path: Path
) -> None:
    """SO_RCVBUF 32768 > rmem_max: capped, so rmem_max grows; the socket
    locked its size, so rmem_default must not change on its account."""
    with netns_pair("pbtudp") as pair, udp_daemon(tmp_path, variant_args) as d:
        d.started()
        with silent_receiver(pair, rcvbuf=32768) as rcvbuf:
            assert rcvbuf == 2 * 16384, "SO_RCVBUF is capped at rmem_max, then doubled"
            flood_until(
                d,
                pair,
                r"Due to receive queue overflow of a socket whose SO_RCVBUF request was capped by rmem_max "
                r"\(32768 bytes\) change net.core.rmem_max from \(16384\) -> \(20480\)",
            )
            flood(pair)
            time.sleep(1)
        assert sysctl_get(RMEM_DEFAULT) == "16384"
        assert "net.core.rmem_default from" not in d.output


def test_socket_that_locked_a_small_buffer_changes_nothing(
    small_rmem: Sysctls, variant_args: tuple[str, ...], tmp_path: Path
) -> None:
    """SO_RCVBUF 4096 < rmem_max: the application chose its size; no global
    limit is holding it back, so neither rmem value moves."""
    with netns_pair("pbtudp") as pair, udp_daemon(tmp_path, variant_args) as d:
        d.started()
        with silent_receiver(pair, rcvbuf=4096) as rcvbuf:
            assert rcvbuf == 8192
            for _ in range(3):
                flood(pair)
            time.sleep(1)
        assert (sysctl_get(RMEM_MAX), sysctl_get(RMEM_DEFAULT)) == ("16384", "16384")
        assert "Due to" not in d.output


UDP_MEM = "net.ipv4.udp_mem"


def test_udp_memory_exhaustion_grows_udp_mem(variant_args: tuple[str, ...], tmp_path: Path) -> None:
    """udp_mem 20 45 50 pages and a 1 MiB receive queue nobody reads: UDP
    memory runs out (-ENOBUFS) and udp_mem[2] rises, [0] and [1] with it."""
    with sysctls() as s, netns_pair("pbtudp") as pair, udp_daemon(tmp_path, variant_args) as d:
        s.save(RMEM_DEFAULT)
        s.set(RMEM_MAX, 1 << 20)
        d.started()
        with silent_receiver(pair, rcvbuf=1 << 20) as rcvbuf:
            assert rcvbuf == 2 << 20
            s.set(UDP_MEM, "20 45 50")
            flood_until(
                d,
                pair,
                # Pages are charged one by one before 5.16 (the first look may
                # find pressure), per-cpu in 1 MiB batches since (exhaustion).
                r"Due to approaching UDP memory (exhaustion|pressure) \(\d+ pages in use\) "
                r"change net.ipv4.udp_mem\(min pressure max\) from \(20 45 50\) -> \(25 56 62\)",
            )
        d.wait_for(
            r"Scenario 'approaching UDP memory (exhaustion|pressure)' occurred for tunable 'net.ipv4.udp_mem'",
            timeout=30 * SLOW,
        )
        assert int(sysctl_get(UDP_MEM).split()[2]) > 50
