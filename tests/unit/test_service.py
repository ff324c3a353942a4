"""The service pieces against real sockets and files, without root or BPF:
sd_notify and the watchdog decision, journald's native protocol with our
fields, syslog's ident after a fork, the pid file, capability numbers, the
metrics exposition, and the unit installer (checked by systemd-analyze)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pybpftune import caps
from pybpftune.errors import PybpftuneError
from pybpftune.install import main as service_main
from pybpftune.install import render_unit
from pybpftune.log import JournalHandler, SyslogHandler
from pybpftune.service import Notifier, parse_metrics_address, watchdog_interval
from pybpftune.state import StateDir

# --- sd_notify ----------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    out = []
    sock.settimeout(0.2)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except TimeoutError:
        return out


def test_notifier_sends_ready_status_watchdog_stopping(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    assert n.enabled and n.watchdog == 2.0
    n.ready("tuning with 2 tuners")
    n.ping()
    n.stopping()
    n.close()
    assert received(sock) == [
        "STATUS=tuning with 2 tuners\n",
        "READY=1\n",
        "WATCHDOG=1\n",
        "STOPPING=1\n",
        "STATUS=stopping: summary, rollback, detaching programs\n",
    ]
    assert n.sent == {"STATUS": 2, "READY": 1, "WATCHDOG": 1, "STOPPING": 1}


def test_notifier_abstract_socket() -> None:
    name = f"pybpftune-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        n.ready("ok")
        assert received(sock) == ["STATUS=ok\n", "READY=1\n"]
    finally:
        sock.close()


def test_notifier_without_socket_is_silent(tmp_path: Path) -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog is None
    n.ready("x")
    n.ping()
    assert not n.sent
    # A manager that went away (socket removed) never fails the daemon.
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    gone.ready("x")
    gone.stopping()
    assert not gone.sent


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "abc"}, None),
        ({"WATCHDOG_USEC": "3000000"}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "4242"}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, pid=4242) == expected


# --- journald -----------------------------------------------------------------------------


def parse_journal_datagram(data: bytes) -> dict[str, str]:
    """journald's native protocol: KEY=value lines, or KEY\\n<u64 le length><bytes>\\n."""
    fields: dict[str, str] = {}
    while data:
        nl = data.index(b"\n")
        line = data[:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            data = data[nl + 1 :]
        else:
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            fields[line.decode()] = data[nl + 9 : nl + 9 + size].decode()
            assert data[nl + 9 + size : nl + 10 + size] == b"\n"
            data = data[nl + 10 + size :]
    return fields


def test_journal_handler_sends_bpftune_fields(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    handler = JournalHandler(path)
    logger = logging.getLogger("pybpftune.test.journal")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        fields = {
            "tuner": "tcp_buffer",
            "tunable": "net.ipv4.tcp_rmem",
            "scenario": "need to increase TCP buffer size(s)",
            "netns_cookie": 4096,
            "global_ns": True,
            "old": (4096, 131072, 6291456),
            "new": (4096, 131072, 7864320),
            "reason": "need to increase max buffer size to maximize throughput",
            "advice": False,
            "bad-key.x": "sanitised",
        }
        logger.info("Due to %s change %s", "x", "y", extra={"bpftune": fields})
        got = parse_journal_datagram(sock.recv(65536))
        logger.warning("two\nlines")
        multi = parse_journal_datagram(sock.recv(65536))
    finally:
        logger.removeHandler(handler)
        handler.close()
        sock.close()
    assert got["MESSAGE"] == "Due to x change y"
    assert got["SYSLOG_IDENTIFIER"] == "bpftune" and got["PRIORITY"] == "6"
    assert got["SYSLOG_PID"] == str(os.getpid())
    assert got["BPFTUNE_TUNER"] == "tcp_buffer"
    assert got["BPFTUNE_TUNABLE"] == "net.ipv4.tcp_rmem"
    assert got["BPFTUNE_NETNS_COOKIE"] == "4096"
    assert got["BPFTUNE_GLOBAL_NS"] == "1" and got["BPFTUNE_ADVICE"] == "0"
    assert got["BPFTUNE_OLD"] == "4096 131072 6291456"
    assert got["BPFTUNE_NEW"] == "4096 131072 7864320"
    assert got["BPFTUNE_REASON"].startswith("need to increase max buffer")
    assert got["BPFTUNE_BAD_KEY_X"] == "sanitised"
    assert all(re.fullmatch(r"[A-Z0-9_]+", k) for k in got)
    assert multi["MESSAGE"] == "two\nlines" and multi["PRIORITY"] == "4"


def test_syslog_ident_is_the_logging_process(tmp_path: Path) -> None:
    """The ident's pid is taken when a record is sent: a forked (-D) child
    logs under its own pid, not its parent's."""
    path = tmp_path / "log"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    handler = SyslogHandler(address=str(path), facility=SyslogHandler.LOG_DAEMON)
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("pybpftune", logging.INFO, __file__, 1, "hello", None, None)
    try:
        child = os.fork()
        if child == 0:
            handler.emit(record)
            os._exit(0)
        os.waitpid(child, 0)
        from_child = sock.recv(4096).decode()
        handler.emit(record)
        from_parent = sock.recv(4096).decode()
    finally:
        handler.close()
        sock.close()
    assert from_child.startswith(f"<30>bpftune[{child}]: hello")  # daemon.info
    assert from_parent.startswith(f"<30>bpftune[{os.getpid()}]: hello")


# --- pid file -----------------------------------------------------------------------------


def test_pid_file_is_locked_and_removed(tmp_path: Path) -> None:
    first = StateDir(tmp_path / "state")
    path = first.lock()
    assert path.read_text() == f"{os.getpid()}\n"
    second = StateDir(tmp_path / "state")
    with pytest.raises(PybpftuneError, match=rf"another pybpftune daemon \(pid {os.getpid()}\) is running"):
        second.lock()
    first.unlock()
    assert not path.exists()
    # A stale file (its daemon died: no lock held) is taken over.
    path.write_text("999999\n")
    second.lock()
    assert path.read_text() == f"{os.getpid()}\n"
    second.unlock()


# --- capabilities ---------------------------------------------------------------------------


def test_capability_numbers_match_the_kernel_header() -> None:
    header = Path("/usr/include/linux/capability.h")
    if not header.exists():
        pytest.skip("linux/capability.h is not installed")
    defined = dict(re.findall(r"#define\s+(CAP_[A-Z_]+)\s+(\d+)\s*$", header.read_text(), re.M))
    for name, number in caps.CAP_NUMBERS.items():
        assert int(defined[name]) == number, name
    assert set(caps.CAP_NUMBERS) == set(defined), "a capability was added or renamed"


def test_capability_masks() -> None:
    m = caps.mask(caps.RUNTIME_CAPS)
    assert m == (1 << 12) | (1 << 19) | (1 << 21)
    assert set(caps.names(m)) == caps.RUNTIME_CAPS
    assert caps.names(1 << 45) == ["cap_45"]
    with pytest.raises(caps.CapsError):
        caps.mask(["CAP_NOPE"])
    assert {"CapEff", "CapPrm", "CapBnd", "CapInh"} <= set(caps.status())


def test_drop_to_in_a_child_process() -> None:
    """The real capset/prctl calls, in a forked child so this process keeps its own."""
    if os.geteuid() != 0 or not caps.status()["CapEff"] >> caps.CAP_NUMBERS["CAP_SETPCAP"] & 1:
        pytest.skip("needs CAP_SETPCAP to drop the bounding set")
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        try:
            kept = caps.drop_to({"CAP_NET_ADMIN"})
            st = caps.status()
            nnp = "NoNewPrivs:\t1" in Path("/proc/self/status").read_text()
            os.write(w, f"{kept} {st['CapEff']} {st['CapPrm']} {st['CapBnd']} {st['CapInh']} {nnp}".encode())
        finally:
            os._exit(0)
    os.close(w)
    reply = os.read(r, 200).decode().split()
    os.close(r)
    os.waitpid(child, 0)
    net_admin = str(1 << 12)
    assert reply == [net_admin, net_admin, net_admin, net_admin, "0", "True"]


# --- metrics --------------------------------------------------------------------------------


def test_metrics_address() -> None:
    assert parse_metrics_address("9557", 1) == ("127.0.0.1", 9557)
    assert parse_metrics_address(":9557", 1) == ("127.0.0.1", 9557)
    assert parse_metrics_address("0.0.0.0:80", 1) == ("0.0.0.0", 80)
    assert parse_metrics_address("[::1]:9557", 1) == ("::1", 9557)
    assert parse_metrics_address("[::1]", 7) == ("::1", 7)
    assert parse_metrics_address("localhost", 7) == ("localhost", 7)
    assert parse_metrics_address("127.0.0.1:0", 1) == ("127.0.0.1", 0)  # any free port (logged)
    for bad in ("x:y", "1.2.3.4:-1", "1.2.3.4:70000", "[::1", "[::1]x"):
        with pytest.raises(PybpftuneError):
            parse_metrics_address(bad, 1)


def test_collector_exposes_changes_values_and_events(tmp_path: Path) -> None:
    from pybpftune.daemon import Daemon, DaemonConfig
    from pybpftune.metrics import DaemonCollector
    from pybpftune.sysctl import MemorySysctl
    from pybpftune.tuner import Proposal, TunerContext
    from tests.tuners.demo_tuner import DemoTuner

    backend = MemorySysctl({"net.ipv4.tcp_fin_timeout": (60,)})
    daemon = Daemon(DaemonConfig(state_dir=tmp_path / "state"), backend=backend)
    try:
        glob = daemon.namespaces.global_cookie
        backend.global_cookie = glob
        backend.values = {(glob, "net.ipv4.tcp_fin_timeout"): (60,)}
        ctx = TunerContext(daemon.store, daemon.namespaces, daemon.steps)
        tuner = DemoTuner(ctx, 0)
        daemon.store.register(tuner)
        daemon.tuners.append(tuner)
        daemon.disabled["broken"] = "test"
        for v in (61, 62):
            assert tuner.apply(Proposal(0, 0, glob, (v,), "demo step"))
        assert tuner.apply(Proposal(0, 0, 12345, (70,), "demo step"))  # another namespace
        daemon.ring.received_by_tuner[0] = 7
        for _ in range(2):
            daemon.loss.malformed_event()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(DaemonCollector(daemon))
        text = generate_latest(registry).decode()
    finally:
        daemon.close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("bpftune_changes_total", tuner="demo", scenario="demo step", tunable="net.ipv4.tcp_fin_timeout",
                 ns="global") == 2  # fmt: skip
    assert value("bpftune_changes_total", tuner="demo", scenario="demo step", tunable="net.ipv4.tcp_fin_timeout",
                 ns="non-global") == 1  # fmt: skip
    assert value("bpftune_tunable_value", tuner="demo", tunable="net.ipv4.tcp_fin_timeout", ns="non-global",
                 netns_cookie="12345", index="0") == 70  # fmt: skip
    assert ("bpftune_tunable_value", "global") in {(n, dict(lb)["ns"]) for n, lb in samples if "ns" in dict(lb)}
    assert value("bpftune_tuner_state", tuner="demo", state="active") == 1
    assert value("bpftune_tuner_state", tuner="broken", state="disabled") == 1
    assert value("bpftune_events_received_total", tuner="demo") == 7
    assert value("bpftune_events_dropped_total", reason="malformed") == 2
    assert value("bpftune_events_dropped_total", reason="ring_buffer_full") == 0


# --- the unit and its installer ---------------------------------------------------------------


def test_installer_writes_a_unit_systemd_accepts(tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "bpftune"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    units, env = tmp_path / "units", tmp_path / "default" / "pybpftune"
    args = ["install", "--bpftune", str(fake), "--unit-dir", str(units), "--env-file", str(env), "--no-reload"]
    result = CliRunner().invoke(service_main, args)
    assert result.exit_code == 0, result.output
    unit = (units / "pybpftune.service").read_text()
    assert f"ExecStart={fake} $PYBPFTUNE_OPTS" in unit and f"EnvironmentFile=-{env}" in unit
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "NoNewPrivileges=yes", "ProtectHome=yes\n",
                 "ProtectSystem=strict", "RuntimeDirectory=pybpftune"):  # fmt: skip
        assert line in unit
    # A private /tmp would hide this fake bpftune: it lives in pytest's tmp_path.
    assert str(fake.resolve()).startswith("/tmp/") and "PrivateTmp=no\n" in unit
    bounding = re.search(r"^CapabilityBoundingSet=(.*)$", unit, re.M)
    assert bounding is not None and set(bounding.group(1).split()) >= caps.RUNTIME_CAPS
    assert 'PYBPFTUNE_OPTS=""' in env.read_text()
    env.write_text('PYBPFTUNE_OPTS="-R"\n')  # the operator's edit survives a reinstall
    assert CliRunner().invoke(service_main, args).exit_code == 0
    assert env.read_text() == 'PYBPFTUNE_OPTS="-R"\n'
    if shutil.which("systemd-analyze"):
        proc = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(units / "pybpftune.service")], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
    with pytest.raises(Exception, match="absolute path"):
        render_unit(Path("relative/bpftune"), env)
    # An interpreter under /root (pyenv) must stay reachable: home only read-only.
    fake.write_text("#!/root/.pyenv/versions/3.11.7/bin/python3.11\n")
    assert "ProtectHome=read-only\n" in render_unit(fake, env)


def test_bad_metrics_address_is_one_line_exit_2() -> None:
    from pybpftune.cli import main

    result = CliRunner().invoke(main, ["--metrics", "localhost:http"])
    assert result.exit_code == 2
    assert (
        result.output.strip()
        == "bpftune: bad metrics port 'http' in 'localhost:http': expected 0-65535 (0: any free port)"
    )


def test_private_tmp_only_where_the_installation_is_not_in_tmp() -> None:
    from pybpftune import install

    assert install.private_tmp(Path("/tmp/checkout/.venv/bin/bpftune")) == "no"
    assert install.private_tmp(Path("/var/tmp/x/bin/bpftune")) == "no"
    import pybpftune

    in_tmp = str(Path(pybpftune.__file__).resolve()).startswith(("/tmp/", "/var/tmp/"))
    assert install.private_tmp(Path("/usr/local/bin/bpftune")) == ("no" if in_tmp else "yes")
