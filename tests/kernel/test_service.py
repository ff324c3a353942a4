"""The daemon as a service, against the real kernel: systemd's notify and
watchdog protocol on a real NOTIFY_SOCKET, the capabilities left after
start-up (/proc/PID/status of every thread), a metrics scrape while the
udp_buffer tuner acts, the summary as one block, and -D.

One daemon start covers notify, watchdog, capabilities, metrics and the
summary; the real systemd (unit, journald fields) is tested in the VM with
systemd as PID 1 (tests/vm/test_systemd_service.py).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pybpftune import caps

from .harness import (
    BPFTUNE,
    SLOW,
    START_TIMEOUT,
    Daemon,
    demo_tuners_dir,
    netns_pair,
    repeat_until_logged,
    sysctl_get,
    sysctls,
)
from .test_udp_buffer_tuner import RMEM_DEFAULT, RMEM_MAX, flood, silent_receiver

pytestmark = pytest.mark.kernel


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    yield path, sock
    sock.close()


def messages_until(sock: socket.socket, wanted: str, timeout: float, d: Daemon) -> list[str]:
    """Notify datagrams received until one equals ``wanted`` (included)."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while wanted not in got:
        sock.settimeout(0.5)
        try:
            got.append(sock.recv(4096).decode().strip())
        except TimeoutError:
            if time.monotonic() > deadline or d.proc.poll() is not None:
                raise AssertionError(f"no {wanted} within {timeout}s; got {got}; output:\n{d.output}") from None
    return got


def drain(sock: socket.socket) -> list[str]:
    got = []
    sock.settimeout(0.1)
    try:
        while True:
            got.append(sock.recv(4096).decode().strip())
    except TimeoutError:
        return got


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, lb), v in samples.items() if n == name and labels.items() <= dict(lb).items())


def thread_caps(pid: int) -> dict[int, dict[str, int]]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        st = caps.status(f"{pid}/task/{task.name}")
        st["NoNewPrivs"] = int(re.search(r"^NoNewPrivs:\s+(\d)", status, re.M).group(1))  # type: ignore[union-attr]
        out[int(task.name)] = st
    return out


def test_ready_watchdog_caps_metrics_and_summary(notify: tuple[str, socket.socket], tmp_path: Path) -> None:
    path, sock = notify
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
    args = ["-s", "-R", "-a", "udp_buffer", "--state-dir", str(tmp_path / "state"), "--metrics", "127.0.0.1:0"]
    with sysctls() as s, netns_pair("pbtsvc") as pair:
        s.set(RMEM_MAX, 16384)
        s.set(RMEM_DEFAULT, 16384)
        with Daemon(args, env=env) as d:
            before_ready = messages_until(sock, "READY=1", START_TIMEOUT, d)
            # READY only once the tuner is attached, capabilities are dropped
            # and the metrics endpoint is up.
            out = d.output
            assert "tuner udp_buffer started" in out and "capabilities after start-up" in out, out
            m = re.search(r"serving metrics on (http://127\.0\.0\.1:\d+/metrics)", out)
            assert m, out
            assert before_ready[-2:] == ["STATUS=tuning with 1 tuners: udp_buffer", "READY=1"]

            wanted = caps.mask(caps.RUNTIME_CAPS)
            threads = thread_caps(d.proc.pid)
            assert len(threads) >= 2, "the metrics server runs in its own thread"
            for tid, st in threads.items():
                assert (st["CapEff"], st["CapPrm"], st["CapBnd"]) == (wanted, wanted, wanted), (tid, st)
                assert st["CapInh"] == 0 and st.get("CapAmb", 0) == 0 and st["NoNewPrivs"] == 1, (tid, st)

            first = scrape(m.group(1))
            assert total(first, "bpftune_tuner_state", tuner="udp_buffer", state="active") == 1
            assert total(first, "bpftune_changes_total", tuner="udp_buffer") == 0
            assert total(first, "process_resident_memory_bytes") > 0
            with silent_receiver(pair):
                repeat_until_logged(
                    d, lambda: flood(pair), r"change net.core.rmem_default from \(16384\) -> \(20480\)", look=1
                )
            second = scrape(m.group(1))
            assert total(second, "bpftune_changes_total", tuner="udp_buffer", tunable=RMEM_DEFAULT, ns="global") >= 1
            assert total(second, "bpftune_events_received_total", tuner="udp_buffer") >= 1
            assert total(second, "bpftune_sample_calls_total", tuner="udp_buffer") > total(
                first, "bpftune_sample_calls_total", tuner="udp_buffer"
            )
            live = total(second, "bpftune_tunable_value", tunable=RMEM_DEFAULT, ns="global")
            assert live == int(sysctl_get(RMEM_DEFAULT)) >= 20480
            assert total(second, "process_cpu_seconds_total") > 0

            time.sleep(1.2)  # at least two half-second pings
            pings = drain(sock).count("WATCHDOG=1")
            assert pings >= 2, "the event loop pings the watchdog every WATCHDOG_USEC/2"
            assert total(scrape(m.group(1)), "bpftune_sd_notify_total", message="WATCHDOG") >= pings
            d.proc.send_signal(signal.SIGTERM)
            stopping = messages_until(sock, "STOPPING=1", 30 * SLOW, d)
            assert "READY=1" not in stopping
            assert d.stop() == 0
    lines = d.output.splitlines()
    head = lines.index("bpftune: # Summary of changes made across all tuners:")
    rollback = next(i for i, line in enumerate(lines) if "Rolling back" in line)
    block = lines[head + 1 : rollback]
    assert block and all(re.match(r"bpftune: (# |sysctl -w |Sample )", line) for line in block), block
    assert not any("Summary" in line for line in lines[rollback:]), "the summary is one block, before rollback"


def test_detach_reports_start_and_keeps_a_pid_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "PYBPFTUNE_DEMO_STEPS": "0"}
    cmd = [str(BPFTUNE), "-D", "-a", "demo", "-l", str(demo_tuners_dir()), "--state-dir", str(state)]
    t0 = time.monotonic()
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=START_TIMEOUT)
    assert first.returncode == 0, first.stderr
    pidfile = state / "pybpftune.pid"
    pid = int(pidfile.read_text())
    try:
        assert os.getsid(pid) != os.getsid(0), "detached into its own session"
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1].endswith(b"bpftune")
        assert first.stderr == "" and time.monotonic() - t0 < START_TIMEOUT
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=START_TIMEOUT)
        assert second.returncode == 1
        assert second.stderr.strip() == (
            f"bpftune: another pybpftune daemon (pid {pid}) is running with state directory {state}"
        )
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()
    assert not pidfile.exists(), "a clean exit removes the pid file"
    bad = subprocess.run(
        [str(BPFTUNE), "-D", "-a", "nosuch", "--state-dir", str(tmp_path / "s2")],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    assert bad.returncode == 1
    assert len(bad.stderr.strip().splitlines()) == 1 and "nosuch" in bad.stderr, bad.stderr
