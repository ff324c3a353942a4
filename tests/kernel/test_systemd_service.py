"""The service as an operator runs it, under a real systemd (PID 1).

docs/deploy.md's steps, as a test: install the unit with the one command,
start it, see READY (``systemctl start`` of a Type=notify unit returns once
READY=1 arrived), read the structured journal fields of a change, scrape the
metrics and see the change counted after traffic.  Also: the capabilities
left under the unit's bounding set, the watchdog (a stopped daemon is killed
and restarted, and the restarted one finds the journal of originals the dead
one left in the preserved RuntimeDirectory), and -D logging to journald under
its own pid.

These tests need systemd as PID 1: the vm-systemd stage boots the Debian 6.1
guest that way (``tests/vm/vmtest.py --init systemd``) and runs this file.
The guest's root is a throwaway overlay, so /etc and /run changes vanish.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pybpftune import caps

from .harness import BPFTUNE, SLOW, START_TIMEOUT, netns_pair, sysctl_get, sysctls
from .test_service import thread_caps, total
from .test_udp_buffer_tuner import RMEM_DEFAULT, RMEM_MAX, flood, silent_receiver

pytestmark = pytest.mark.systemd

UNIT = "pybpftune.service"
SERVICE = Path(sys.executable).parent / "pybpftune-service"
ENV_FILE = Path("/etc/default/pybpftune")
DROPIN = Path("/etc/systemd/system/pybpftune.service.d/10-test.conf")
METRICS = "http://127.0.0.1:9557/metrics"


def sh(*cmd: str, check: bool = True, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        logs = ""
        if cmd[0] == "systemctl":
            tail = subprocess.run(["journalctl", "--no-pager", "-n", "40", "-u", UNIT], capture_output=True, text=True)
            logs = "\njournal:\n" + tail.stdout
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}{logs}")
    return proc.stdout


def show(*props: str) -> dict[str, str]:
    out = sh("systemctl", "show", UNIT, *(f"-p{p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(*matches: str, since: str = "") -> list[dict[str, str]]:
    args = ["journalctl", "--no-pager", "-o", "json", *matches]
    if since:
        args += ["--since", since]
    return [json.loads(line) for line in sh(*args).splitlines() if line.strip()]


def wait(what: str, check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.5)


@pytest.fixture
def installed() -> Iterator[None]:
    """`pybpftune-service install`, options in the environment file, and a
    test drop-in (a short watchdog, a quick restart)."""
    out = sh(str(SERVICE), "install")
    assert f"wrote /etc/systemd/system/{UNIT}" in out and f"wrote {ENV_FILE}" in out, out
    ENV_FILE.write_text('PYBPFTUNE_OPTS="--metrics 127.0.0.1:9557 -R -a udp_buffer -a sysctl"\n')
    DROPIN.parent.mkdir(parents=True, exist_ok=True)
    DROPIN.write_text("[Service]\nWatchdogSec=15s\nTimeoutAbortSec=3s\nRestartSec=1s\n")
    sh("systemctl", "daemon-reload")
    try:
        yield
    finally:
        subprocess.run(["systemctl", "stop", UNIT], capture_output=True, timeout=300)
        DROPIN.unlink(missing_ok=True)
        sh(str(SERVICE), "uninstall")


@pytest.fixture
def small_rmem() -> Iterator[None]:
    """Small UDP buffer defaults, set before the daemon starts: a write while
    it runs would be an administrator's, and the sysctl tuner would make
    udp_buffer back off."""
    with sysctls() as s:
        s.set(RMEM_MAX, 16384)
        s.set(RMEM_DEFAULT, 16384)
        yield


def test_operator_flow_ready_journal_metrics_watchdog(small_rmem: None, installed: None) -> None:
    t0 = time.strftime("%Y-%m-%d %H:%M:%S")
    # Returns once READY=1 arrived (or fails if the daemon died first).
    sh("systemctl", "enable", "--now", UNIT, timeout=START_TIMEOUT)
    st = show("ActiveState", "SubState", "StatusText", "MainPID", "NRestarts", "WatchdogUSec", "Type")
    assert (st["Type"], st["ActiveState"], st["SubState"]) == ("notify", "active", "running"), st
    assert st["StatusText"] == "tuning with 2 tuners: sysctl, udp_buffer", st
    pid = int(st["MainPID"])
    wanted = caps.mask(caps.RUNTIME_CAPS)
    for tid, c in thread_caps(pid).items():
        assert (c["CapEff"], c["CapPrm"], c["CapBnd"], c["CapInh"]) == (wanted, wanted, wanted, 0), (tid, c)

    with netns_pair("pbtsd") as pair:
        with silent_receiver(pair):

            def changed() -> bool:
                flood(pair)
                return bool(journal("-u", UNIT, "BPFTUNE_TUNER=udp_buffer", f"BPFTUNE_TUNABLE={RMEM_DEFAULT}"))

            wait("a journaled rmem_default change", changed, 60 * SLOW)
        entries = journal("-u", UNIT, "BPFTUNE_TUNER=udp_buffer", f"BPFTUNE_TUNABLE={RMEM_DEFAULT}")
        why = next(e for e in entries if e["MESSAGE"].startswith("Due to"))
        assert why["SYSLOG_IDENTIFIER"] == "bpftune" and why["_PID"] == str(pid)
        assert why["BPFTUNE_OLD"] == "16384" and why["BPFTUNE_NEW"] == "20480", why
        assert why["BPFTUNE_GLOBAL_NS"] == "1" and why["BPFTUNE_SCENARIO"] and why["BPFTUNE_REASON"]
        assert why["BPFTUNE_NETNS_COOKIE"].isdigit()
        assert "change net.core.rmem_default from (16384) -> (20480)" in why["MESSAGE"]
        assert int(sysctl_get(RMEM_DEFAULT)) >= 20480
        # Queries reach the hardened service (capabilities reduced and all),
        # and `systemctl reload` re-reads its configuration.
        q = subprocess.run([str(BPFTUNE), "-q", "changes"], capture_output=True, text=True, timeout=30)
        assert q.returncode == 0 and f"changed {RMEM_DEFAULT} (16384) -> (20480)" in q.stdout, (q.stdout, q.stderr)
        sh("systemctl", "reload", UNIT)
        wait(
            "a configuration reload",
            lambda: any(" reloaded: " in e["MESSAGE"] for e in journal("-u", UNIT, f"_PID={pid}")),
            30,
        )

        text = urllib.request.urlopen(METRICS, timeout=30).read().decode()
        from prometheus_client.parser import text_string_to_metric_families

        samples = {
            (x.name, tuple(sorted(x.labels.items()))): x.value
            for family in text_string_to_metric_families(text)
            for x in family.samples
        }
        assert total(samples, "bpftune_changes_total", tuner="udp_buffer", tunable=RMEM_DEFAULT) >= 1
        assert total(samples, "bpftune_events_received_total", tuner="udp_buffer") >= 1

        # The watchdog: pings arrive; a stopped (wedged) daemon is killed and restarted.
        wait("a watchdog ping", lambda: show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"] != "0", 30)
        os.kill(pid, signal.SIGSTOP)
        wait(
            "a restart after the watchdog fired",
            lambda: show("NRestarts")["NRestarts"] == "1" and show("ActiveState")["ActiveState"] == "active",
            START_TIMEOUT + 60,
        )
    assert any("Watchdog timeout" in e["MESSAGE"] for e in journal("-u", UNIT, since=t0))
    again = int(show("MainPID")["MainPID"])
    assert again != pid
    said = [e["MESSAGE"] for e in journal("-u", UNIT, f"_PID={again}")]
    assert any("a previous daemon left" in m and "original value(s) journaled" in m for m in said), said

    sh("systemctl", "stop", UNIT, timeout=120)
    last = [e["MESSAGE"] for e in journal("-u", UNIT, f"_PID={again}")]
    assert last[-1] == "bpftune stopped", last[-5:]
    assert show("Result")["Result"] == "success"


def test_detached_daemon_logs_to_the_journal_under_its_own_pid(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.run(
        [str(BPFTUNE), "-D", "-a", "sysctl", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    pid = int((state / "pybpftune.pid").read_text())
    try:
        wait(
            "the daemon's start in the journal",
            lambda: "bpftune started" in [e["MESSAGE"] for e in journal(f"_PID={pid}", "SYSLOG_IDENTIFIER=bpftune")],
            60 * SLOW,
        )
        started = journal(f"_PID={pid}", "SYSLOG_IDENTIFIER=bpftune")
        assert any(e["MESSAGE"].startswith("tuner sysctl started") for e in started)
        assert all(e["SYSLOG_PID"] == str(pid) for e in started)
    finally:
        os.kill(pid, signal.SIGTERM)
    wait("the daemon's exit", lambda: not Path(f"/proc/{pid}").exists(), 60 * SLOW)
    assert not (state / "pybpftune.pid").exists()
