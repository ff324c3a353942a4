"""Namespaces on the real kernel: discovery, per-namespace policy, scale.

The per-namespace policy is driven through the nsdemo test tuner
(tests/tuners/nsdemo_tuner.py: steps tcp_fin_timeout in the namespaces named
in a file) and, for bpftune's sysctl_netns scenario, through tcp_buffer with
real traffic.  Without netns cookies (Linux < 5.14, e.g. the 5.10 VM) the
netns tuner refuses to start, as bpftune's does, and the tests check that it
says why.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pybpftune.netns import Namespaces

from .harness import IN_VM, Daemon, demo_tuners_dir, iperf3_server, netns_pair, run, sysctl_get, sysctls
from .test_tcp_conn_tuner import iperf_run

pytestmark = pytest.mark.kernel

MANY = int(os.environ.get("PYBPFTUNE_MANY_NETNS", "150" if IN_VM else "1000"))
FIN = "net.ipv4.tcp_fin_timeout"
COOKIES = Namespaces().cookie_supported


def fin(ns: str) -> int:
    return int(sysctl_get(FIN, ns))


@contextmanager
def namespaces(names: list[str]) -> Iterator[list[str]]:
    """Namespaces made with one `ip -batch`, deleted the same way."""
    try:
        yield names
    finally:
        existing = [n for n in names if Path(f"/run/netns/{n}").exists()]
        if existing:
            subprocess.run(
                ["ip", "-batch", "-"], input="".join(f"netns del {n}\n" for n in existing), text=True,
                capture_output=True, timeout=600,
            )  # fmt: skip


def add_namespaces(names: list[str]) -> None:
    subprocess.run(
        ["ip", "-batch", "-"], input="".join(f"netns add {n}\n" for n in names), text=True, check=True,
        capture_output=True, timeout=600,
    )  # fmt: skip


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tag(prefix: str) -> str:
    return f"{prefix}{os.getpid()}x{time.monotonic_ns() % 100000}"


@contextmanager
def nsdemo(
    tmp_path: Path, variant_args: tuple[str, ...], *extra: str, steps: int = 1000
) -> Iterator[tuple[Daemon, Path]]:
    listing = tmp_path / "nsdemo.list"
    listing.write_text("")
    env = {"PYBPFTUNE_NSDEMO_FILE": str(listing), "PYBPFTUNE_NSDEMO_STEPS": str(steps)}
    args = ["-s", "-d", "-a", "nsdemo", "-l", str(demo_tuners_dir()), "--state-dir", str(tmp_path / "state"), *extra]
    with Daemon([*args, *variant_args], env=env) as d:
        d.started()
        yield d, listing


def require_cookies_or_check_refusal(d: Daemon) -> bool:
    if COOKIES:
        return True
    d.wait_for(r"tuner netns disabled: netns is not supported here: needs network-namespace cookies")
    return False


@pytest.mark.guest  # the copy_net_ns fexit/kprobe forms only work in the VMs
def test_namespaces_created_after_start_are_learned_and_tuned(tmp_path: Path, variant_args: tuple[str, ...]) -> None:
    name = tag("pbtnl")
    with namespaces([name]), nsdemo(tmp_path, variant_args, "-a", "netns") as (d, listing):
        if not require_cookies_or_check_refusal(d):
            return
        d.wait_for(r"tuner netns started")
        add_namespaces([name])
        cookie = Namespaces().cookie_of_path(f"/run/netns/{name}")
        d.wait_for(rf"netns created \(cookie {cookie}\)", timeout=10)
        listing.write_text(name)
        d.wait_for(r"Due to nsdemo step change net\.ipv4\.tcp_fin_timeout from \(60\) -> \(61\)", timeout=10)
        assert fin(name) >= 61
        d.stop()
    assert re.search(
        r"# Summary: netns tuner: \d+ namespaces known now, \d+ at start, [1-9]\d* created since", d.output
    )


def test_admin_write_in_a_namespace_disables_the_tuner_there_only(
    tmp_path: Path, variant_args: tuple[str, ...]
) -> None:
    a, b = tag("pbtna"), tag("pbtnb")
    with namespaces([a, b]):
        add_namespaces([a, b])
        with nsdemo(tmp_path, variant_args, "-a", "sysctl") as (d, listing):
            if not COOKIES:
                return
            listing.write_text(f"{a}\n{b}\n")
            d.wait_for(r"from \(61\) -> \(62\)", timeout=15)
            run(["sysctl", "-q", "-w", f"{FIN}=33"], a)
            cookie_a = Namespaces().cookie_of_path(f"/run/netns/{a}")
            d.wait_for(
                rf"modified sysctl '{FIN}' that tuner 'nsdemo' uses; disabling 'nsdemo' for namespace cookie {cookie_a}"
            )
            d.wait_for(rf"setting state of netns \(cookie {cookie_a}\) to manual")
            b_then = fin(b)
            time.sleep(3)
            assert fin(a) == 33, "the administrator's value was overwritten"
            assert fin(b) > b_then, "the other namespace is no longer tuned"
            d.stop()


def test_a_namespace_vanishing_under_the_tuner_is_logged_once(tmp_path: Path, variant_args: tuple[str, ...]) -> None:
    name = tag("pbtnv")
    with namespaces([name]):
        add_namespaces([name])
        with nsdemo(tmp_path, variant_args, "-a", "sysctl") as (d, listing):
            if not COOKIES:
                return
            cookie = Namespaces().cookie_of_path(f"/run/netns/{name}")
            listing.write_text(name)
            d.wait_for(r"from \(61\) -> \(62\)", timeout=15)
            run(["ip", "netns", "del", name])
            d.wait_for(rf"network namespace \(cookie {cookie}\) is gone", timeout=15)
            time.sleep(4)  # four more ticks that still name it
            d.stop()
    assert d.output.count(f"network namespace (cookie {cookie}) is gone") == 1, d.output


def test_many_namespaces_cost_no_fds_and_no_process_scans(tmp_path: Path, variant_args: tuple[str, ...]) -> None:
    prefix = tag("pbtnm")
    names = [f"{prefix}n{i}" for i in range(MANY)]
    with (
        namespaces(names),
        Daemon(["-s", "-a", "netns", "-a", "sysctl", "--state-dir", str(tmp_path / "state"), *variant_args]) as d,
    ):
        d.started()
        if not require_cookies_or_check_refusal(d):
            return
        d.wait_for(r"tuner netns started")
        time.sleep(1)
        before = fds(d.proc.pid)
        started = time.monotonic()
        add_namespaces(names)
        created_in = time.monotonic() - started
        time.sleep(3)  # a few ticks to pick up the last ones
        after = fds(d.proc.pid)
        d.stop()
    m = re.search(r"netns tuner: \d+ namespaces known now, \d+ at start, (\d+) created since", d.output)
    assert m, d.output
    assert int(m.group(1)) >= MANY, f"learned {m.group(1)} of {MANY} namespaces (created in {created_in:.1f}s)"
    assert after - before <= 20, f"fds grew from {before} to {after} with {MANY} namespaces"
    scans = re.search(r"netns tuner: (\d+) process scans", d.output)
    assert scans and int(scans.group(1)) <= 3, d.output


@pytest.mark.guest  # the sysctl tuner's fentry/kprobe forms
def test_sysctl_netns_tcp_rmem_changed_by_hand_is_left_alone(variant_args: tuple[str, ...]) -> None:
    """bpftune's sysctl_netns scenario with tcp_buffer: the namespace where
    tcp_rmem was changed by hand is left alone, another one is still tuned."""
    if not (Path(__file__).resolve().parents[2] / "src/pybpftune/tuners/tcp_buffer").is_dir():
        pytest.fail("tcp_buffer tuner missing")
    low = "4096 131072 131072"
    with netns_pair("pbtsa") as manual, netns_pair("pbtsb") as tuned, sysctls() as s:
        for pair in (manual, tuned):
            s.set("net.ipv4.tcp_rmem", low, pair.server)
        with Daemon(["-s", "-a", "sysctl", "-a", "tcp_buffer", *variant_args]) as d:
            d.started()
            if not COOKIES:
                return
            run(["sysctl", "-q", "-w", f"net.ipv4.tcp_rmem={low}"], manual.server)
            d.wait_for(r"modified sysctl 'net\.ipv4\.tcp_rmem' that tuner 'tcp_buffer' uses")
            d.wait_for(r"setting state of netns \(cookie \d+\) to manual for tuner 'tcp_buffer'")
            for pair in (manual, tuned):
                with iperf3_server(pair.server, 5241):
                    iperf_run(pair.client, pair.server_addr, 5241, 3)
            d.wait_for(r"change net\.ipv4\.tcp_rmem", timeout=10)
            d.stop()
        assert sysctl_get("net.ipv4.tcp_rmem", manual.server) == low
        assert int(sysctl_get("net.ipv4.tcp_rmem", tuned.server).split()[2]) > 131072, d.output
