"""ip_frag on the real kernel: fragment memory near the threshold raises it.

Small ipfrag/ip6frag thresholds (8 KiB) on the receiving side, offloads off,
then 8000-byte pings (six fragments each) over IPv4 and IPv6: a few fragments
fill the reassembly memory, the tuner sees it from net:netif_receive_skb and
raises the threshold of that side only.

* netns: the receiver is a namespace; its thresholds rise, the global ones
  do not move.  Without netns cookies (kernels before 5.14) per-namespace
  policy is impossible: the daemon says so at start-up and the namespace's
  values must stay untouched.
* global: the receiver is the initial namespace (a veth from it into a
  client namespace); its thresholds are saved and restored.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from pybpftune.bindings import IpFragObs
from pybpftune.netns import current_cookie

from .forms import fallback_forms
from .harness import SLOW, Daemon, Sysctls, netns_pair, repeat_until_logged, run, sysctl_get, sysctls, tuner_daemon

pytestmark = pytest.mark.kernel

SMALL = 8192
V4 = ("net.ipv4.ipfrag_high_thresh", "net.ipv4.ipfrag_low_thresh")
V6 = ("net.ipv6.ip6frag_high_thresh", "net.ipv6.ip6frag_low_thresh")


@dataclass
class Path2:
    """Where fragments are received (server; None = initial namespace) and sent from."""

    server: str | None
    client: str
    server_addr: str
    server_addr6: str
    devices: list[tuple[str | None, str]]


@contextmanager
def global_pair() -> Iterator[Path2]:
    """A veth from the initial namespace into a fresh client namespace."""
    with netns_pair("pbtfrg") as pair:
        host_dev = pair.server_dev.replace("a", "g", 1)[:15]
        run(["ip", "link", "add", host_dev, "type", "veth", "peer", "name", "pbtfragc", "netns", pair.client])
        try:
            run(["ip", "addr", "add", "192.168.169.1/24", "dev", host_dev])
            run(["ip", "-6", "addr", "add", "fd00:169::1/64", "dev", host_dev, "nodad"])
            run(["ip", "link", "set", host_dev, "up"])
            run(["ip", "addr", "add", "192.168.169.2/24", "dev", "pbtfragc"], pair.client)
            run(["ip", "-6", "addr", "add", "fd00:169::2/64", "dev", "pbtfragc", "nodad"], pair.client)
            run(["ip", "link", "set", "pbtfragc", "up"], pair.client)
            yield Path2(
                None, pair.client, "192.168.169.1", "fd00:169::1", [(None, host_dev), (pair.client, "pbtfragc")]
            )
        finally:
            subprocess.run(["ip", "link", "del", host_dev], capture_output=True)


@contextmanager
def netns_path() -> Iterator[Path2]:
    with netns_pair("pbtfrg") as pair:
        yield Path2(
            pair.server,
            pair.client,
            pair.server_addr,
            pair.server_addr6,
            [(pair.server, pair.server_dev), (pair.client, pair.client_dev)],
        )


def offloads_off(path: Path2) -> None:
    for ns, dev in path.devices:
        run(["ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off"], ns, check=False)


def shrink_thresholds(s: Sysctls, ns: str | None) -> None:
    for high, low in (V4, V6):
        # low first (it may not exceed high), so the restore runs high first.
        s.set(low, SMALL, ns)
        s.set(high, SMALL, ns)


def ping(path: Path2, v6: bool, count: int = 4) -> None:
    addr = path.server_addr6 if v6 else path.server_addr
    cmd = ["ping", "-6" if v6 else "-4", "-s", "8000", "-c", str(count), "-i", "0.2", "-W", "1", addr]
    run(cmd, path.client, check=False, timeout=30)


def ping_until(d: Daemon, path: Path2, v6: bool, pattern: str) -> None:
    repeat_until_logged(d, lambda: ping(path, v6), pattern)


def grown(name: str, ns: str | None) -> bool:
    return int(sysctl_get(name, ns)) > SMALL


@pytest.mark.parametrize("where", ["netns", "global"])
@pytest.mark.guest
def test_fragment_memory_near_threshold_raises_it(where: str, variant_args: tuple[str, ...], tmp_path: Path) -> None:
    cookies = current_cookie() is not None
    with netns_path() if where == "netns" else global_pair() as path, sysctls() as s:
        offloads_off(path)
        shrink_thresholds(s, path.server)
        glob_before = (sysctl_get(V4[0]), sysctl_get(V6[0]))
        with tuner_daemon("ip_frag", tmp_path, variant_args) as d:
            d.started()
            assert "frag via" in d.output
            if where == "netns" and not cookies:
                d.wait_for(r"does not support per-netns policy", timeout=30 * SLOW)
                for _ in range(3):
                    ping(path, v6=False)
                    ping(path, v6=True)
                assert (sysctl_get(V4[0], path.server), sysctl_get(V6[0], path.server)) == (str(SMALL), str(SMALL))
                assert "Due to" not in d.output
                return
            scope = "non-global ns" if where == "netns" else "global ns"
            for v6, (high, _low) in ((False, V4), (True, V6)):
                ping_until(
                    d,
                    path,
                    v6,
                    rf"Due to approaching fragmentation maximum threshold change {high} from \({SMALL}\) -> \(10240\)",
                )
                d.wait_for(
                    rf"Scenario 'need to increase fragmentation high threshold' occurred for tunable '{high}' "
                    rf"in {scope}\."
                )
                assert grown(high, path.server)
        if where == "netns":
            assert (sysctl_get(V4[0]), sysctl_get(V6[0])) == glob_before, "only the namespace's thresholds move"


# --- the fallback forms (fentry / kprobe on ip_defrag and ipv6_frag_rcv) ----------------------


@pytest.mark.guest
@pytest.mark.all_variants  # kprobe forms in the legacy variant, fentry in the full one
def test_defrag_fallback_forms_fire_or_say_why(variant: str) -> None:
    """Where fentry or kprobes work (the VMs) the ip_defrag/ipv6_frag_rcv forms
    report both families; elsewhere the error names the signal and why."""
    with fallback_forms("ip_frag_tuner", variant, tuner_id=5, netns=True) as forms:
        if forms.loaded is None:
            forms.assert_says_why("frag")
            return
        got = forms.events
        families: set[int] = set()

        def seen_both() -> bool:
            families.update(IpFragObs.unpack(e.raw).family for e in got)
            return families == {socket.AF_INET, socket.AF_INET6}

        with global_pair() as path, sysctls() as s:
            forms.assert_chose_fallback("frag", variant)
            offloads_off(path)
            shrink_thresholds(s, None)
            forms.poll_until(seen_both, 30, between=lambda: ping(path, v6=socket.AF_INET in families, count=2))
        assert seen_both(), f"events: {got}"
        obs = IpFragObs.unpack(got[0].raw)
        assert obs.high_thresh == SMALL and obs.mem >= SMALL - SMALL // 4
