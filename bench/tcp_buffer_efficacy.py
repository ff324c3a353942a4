#!/usr/bin/env python3
"""tcp_buffer efficacy: starved buffers on a 50 ms, 200 Mbit/s path.

Two namespaces joined by veth; netem on both ends gives 25 ms each way (50 ms
RTT) and 200 Mbit/s (bandwidth-delay product 1.25 MB).  A client sends to a
server in back-to-back transfers (iperf3, a new connection each, 5 s each by
default) for 30 s, in three set-ups:

* starved:    tcp_rmem and tcp_wmem "4096 65536 131072" in both namespaces;
* tuned:      the same, with ``bpftune -s -a tcp_buffer`` running;
* hand-tuned: tcp_rmem "4096 131072 16777216", tcp_wmem "4096 16384 16777216".

It prints the receiver's goodput per second of every transfer, the first
connection's mean (its window scale is fixed at its handshake from the starved
limits), and the ratio to hand-tuned of the connections opened 10 s or more
after the first transfer's start (the target is >= 95 %), plus the limits the
daemon ended with and its change lines with their times.

Runs as root on a kernel with sch_netem; on the development host (no netem)
run it in the 6.1 VM:

    python3 tests/vm/vmtest.py --kernel 6.1 --timeout 1800 -- \\
        /work/main/.venv/bin/python bench/tcp_buffer_efficacy.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.kernel.harness import Daemon, NetnsPair, netns_pair, run, sysctl_get, sysctls  # noqa: E402

STARVED = "4096 65536 131072"
STARVED_RMEM = STARVED
STARVED_WMEM = STARVED
HAND_RMEM = "4096 131072 16777216"
HAND_WMEM = "4096 16384 16777216"
ONE_WAY_DELAY = "25ms"
RATE = "200mbit"
BDP = 200e6 / 8 * 0.050
LATE_S = 10.0


@dataclass
class Transfer:
    start: float  # seconds after the first transfer's start
    per_second: list[float]  # receiver goodput, Mbit/s
    daemon_cpu: float | None = None  # daemon CPU seconds during the transfer
    ss: list[str] = field(default_factory=list)  # --ss: sender/receiver state once a second

    @property
    def mean(self) -> float:
        return statistics.fmean(self.per_second) if self.per_second else 0.0


@dataclass
class Run:
    name: str
    transfers: list[Transfer] = field(default_factory=list)
    daemon_lines: list[tuple[float, str]] = field(default_factory=list)
    limits: dict[str, str] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)

    def late_mean(self) -> float:
        late = [t for t in self.transfers if t.start >= LATE_S]
        return statistics.fmean([t.mean for t in late]) if late else 0.0


class TimedDaemon(Daemon):
    """The harness daemon, remembering when each line arrived."""

    def __init__(self, args: list[str]) -> None:
        self.times: list[float] = []
        super().__init__(args)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self.times.append(time.monotonic())
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()


OFFLOADS = True
DAEMON_EXTRA: list[str] = []
DUMP: str | None = None
SS = False
DAEMON_PID: int | None = None

SS_FIELDS = (
    "cwnd",
    "rtt",
    "delivery_rate",
    "busy",
    "rwnd_limited",
    "sndbuf_limited",
    "notsent",
    "unacked",
    "rcv_space",
    "rcv_rtt",
    "rcv_ssthresh",
)


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process, in seconds."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ss_line(ns: str, port: int, side: str) -> str | None:
    """One condensed `ss -tinm` line for the data connection on ``port``."""
    flt = f"dport = :{port}" if side == "snd" else f"sport = :{port}"
    text = run(["ss", "-tinmH", "state", "established", flt], ns, check=False)
    best = None
    for block in re.split(r"\n(?=\S)", text.strip()):
        words = block.split()
        if not words:
            continue
        info = {}
        for w in words:
            if w.startswith("skmem:("):
                info["skmem"] = w[len("skmem:(") : -1]
            elif ":" in w and w.split(":", 1)[0] in SS_FIELDS:
                k, v = w.split(":", 1)
                info[k] = v
            elif w == "app_limited":
                info["app_limited"] = "1"
        if "cwnd" not in info and side == "snd":
            continue
        line = " ".join(f"{k}:{v}" for k, v in info.items())
        # the data connection moves the most: keep the longest report
        if best is None or len(line) > len(best):
            best = line
    return f"{side} {best}" if best else None


class SsSampler:
    """Once a second: the sender's and receiver's socket state (``--ss``)."""

    def __init__(self, pair: NetnsPair, port: int) -> None:
        self.pair, self.port = pair, port
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            for ns, side in ((self.pair.client, "snd"), (self.pair.server, "rcv")):
                line = ss_line(ns, self.port, side)
                if line:
                    self.lines.append(f"{time.monotonic() - self._t0:5.1f} {line}")

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(10)
        return self.lines


def shape(pair: NetnsPair) -> None:
    """25 ms each way and 200 Mbit/s (with --no-offloads, GSO/TSO off so
    netem's rate applies per wire packet; costs CPU the VM may not have)."""
    for ns, dev in ((pair.client, pair.client_dev), (pair.server, pair.server_dev)):
        if not OFFLOADS:
            run(["ethtool", "-K", dev, "gso", "off", "tso", "off"], ns, check=False)
        run(["tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", ONE_WAY_DELAY, "rate", RATE], ns)


@contextmanager
def path_with(rmem: str, wmem: str) -> Iterator[NetnsPair]:
    with sysctls() as s, netns_pair("pbteff") as pair:
        for ns in (pair.server, pair.client):
            s.set("net.ipv4.tcp_rmem", rmem, ns)
            s.set("net.ipv4.tcp_wmem", wmem, ns)
        shape(pair)
        run(["ping", "-c", "1", "-W", "5", pair.server_addr], pair.client, check=False)
        yield pair


COUNTERS = (
    "TcpRetransSegs",
    "TcpExtTCPLostRetransmit",
    "TcpExtTCPRcvQDrop",
    "TcpExtPruneCalled",
    "TcpExtTCPOFODrop",
    "TcpExtTCPHystartTrainDetect",
    "TcpExtTCPHystartDelayDetect",
)


def counters(pair: NetnsPair) -> dict[str, int]:
    """TCP counters of interest, summed over both namespaces."""
    out: dict[str, int] = {}
    for ns in (pair.client, pair.server):
        text = run(["nstat", "-a", "-z", *COUNTERS], ns, check=False)
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] in COUNTERS:
                out[parts[0]] = out.get(parts[0], 0) + int(parts[1])
    return out


def transfer(pair: NetnsPair, port: int, seconds: int) -> Transfer:
    """One iperf3 transfer client -> server; its client start time (absolute,
    fixed up by the caller) and receiver goodput per second in Mbit/s."""
    cpu0 = cpu_seconds(DAEMON_PID)
    sampler = SsSampler(pair, port) if SS else None
    server = subprocess.Popen(
        ["ip", "netns", "exec", pair.server, "iperf3", "-s", "-1", "-J", "-i", "1", "-p", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            started = time.monotonic()
            client = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    pair.client,
                    "iperf3",
                    "-c",
                    pair.server_addr,
                    "-p",
                    str(port),
                    "-t",
                    str(seconds),
                ],
                capture_output=True,
                text=True,
                timeout=seconds + 120,
            )
            if client.returncode == 0:
                break
            if "unable to connect" not in client.stderr or time.monotonic() > deadline:
                raise RuntimeError(f"iperf3 client failed: {client.stderr.strip()}")
            time.sleep(0.2)
        out, _ = server.communicate(timeout=60)
    finally:
        server.kill()
        server.wait()
        ss = sampler.stop() if sampler else []
    report = json.loads(out)
    rates = [iv["sum"]["bits_per_second"] / 1e6 for iv in report["intervals"] if iv["sum"]["seconds"] > 0.5]
    cpu1 = cpu_seconds(DAEMON_PID)
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return Transfer(started, rates, cpu, ss)


def workload(pair: NetnsPair, total: int, each: int, base_port: int) -> list[Transfer]:
    transfers = []
    t0: float | None = None
    n = 0
    while True:
        t = transfer(pair, base_port + n, each)
        t0 = t.start if t0 is None else t0
        t.start -= t0
        transfers.append(t)
        n += 1
        if time.monotonic() - t0 >= total:
            return transfers


def measure(name: str, total: int, each: int, legacy: bool, base_port: int) -> Run:
    result = Run(name)
    if name == "hand-tuned":
        with path_with(HAND_RMEM, HAND_WMEM) as pair:
            result.transfers = workload(pair, total, each, base_port)
            result.counters = counters(pair)
        return result
    with path_with(STARVED_RMEM, STARVED_WMEM) as pair:
        if name == "starved":
            result.transfers = workload(pair, total, each, base_port)
            result.counters = counters(pair)
            return result
        with tempfile.TemporaryDirectory() as state:
            args = ["-s", "-a", "tcp_buffer", "--state-dir", state, *(["-L"] if legacy else []), *DAEMON_EXTRA]
            d = TimedDaemon(args)
            global DAEMON_PID
            with d:
                d.started(600)
                DAEMON_PID = d.proc.pid
                begin = time.monotonic()
                result.transfers = workload(pair, total, each, base_port)
                result.counters = counters(pair)
                result.limits = {
                    "server tcp_rmem": sysctl_get("net.ipv4.tcp_rmem", pair.server),
                    "server tcp_wmem": sysctl_get("net.ipv4.tcp_wmem", pair.server),
                    "client tcp_rmem": sysctl_get("net.ipv4.tcp_rmem", pair.client),
                    "client tcp_wmem": sysctl_get("net.ipv4.tcp_wmem", pair.client),
                }
                d.stop()
                DAEMON_PID = None
                if DUMP is not None:
                    with open(DUMP, "w") as f:
                        for t, line in zip(d.times, d.lines, strict=False):
                            f.write(f"{t - begin:8.3f} {line}\n")
                result.daemon_lines = [
                    (t - begin, line)
                    for t, line in zip(d.times, d.lines, strict=False)
                    if "Due to" in line or "Buffer events" in line or "Sample '" in line
                ]
    return result


def report(runs: list[Run], each: int) -> None:
    by_name = {r.name: r for r in runs}
    print(f"# path: {ONE_WAY_DELAY} each way, {RATE}, BDP {BDP / 1e6:.2f} MB; transfers of {each} s back to back")
    for r in runs:
        print(f"\n## {r.name}")
        for i, t in enumerate(r.transfers):
            per_second = " ".join(f"{v:6.1f}" for v in t.per_second)
            cpu = f"   daemon CPU {t.daemon_cpu:.2f} s" if t.daemon_cpu is not None else ""
            print(f"conn {i + 1:2d} opened at {t.start:5.1f} s: {per_second}   mean {t.mean:6.1f} Mbit/s{cpu}")
            for line in t.ss:
                print(f"    {line}")
        for key, value in r.limits.items():
            print(f"final {key}: {value}")
        if r.counters:
            print("counters: " + ", ".join(f"{k.removeprefix('Tcp')} {v}" for k, v in r.counters.items()))
        for when, line in r.daemon_lines:
            print(f"  {when:6.2f} s {line.removeprefix('bpftune: ')}")
    hand = by_name.get("hand-tuned")
    if hand is None:
        return
    print("\n## ratios to hand-tuned")
    for r in runs:
        if r is hand or not r.transfers:
            continue
        first = r.transfers[0].mean / hand.transfers[0].mean if hand.transfers[0].mean else 0.0
        late = r.late_mean() / hand.late_mean() if hand.late_mean() else 0.0
        print(
            f"{r.name:8s} first connection {r.transfers[0].mean:6.1f} Mbit/s ({first:5.1%});"
            f" connections opened at >= {LATE_S:.0f} s {r.late_mean():6.1f} Mbit/s ({late:5.1%})"
        )
    print(f"hand-tuned first connection {hand.transfers[0].mean:6.1f}; later ones {hand.late_mean():6.1f} Mbit/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=30, help="length of each run (default 30)")
    parser.add_argument("--each", type=int, default=5, help="length of each transfer (default 5)")
    parser.add_argument("--legacy", action="store_true", help="run the daemon with -L")
    parser.add_argument(
        "--only", choices=("starved", "tuned", "hand-tuned"), action="append", help="run only these set-ups"
    )
    parser.add_argument("--no-offloads", action="store_true", help="switch GSO/TSO off on the veth pair")
    parser.add_argument("--hand-max", type=int, help="maximum of the hand-tuned tcp_rmem/tcp_wmem (default 16 MiB)")
    parser.add_argument("--dump", help="write the daemon's timed output (run with -d) to this file")
    parser.add_argument("--ss", action="store_true", help="print sender and receiver socket state once a second")
    parser.add_argument("--hand-rmem", help="hand-tuned tcp_rmem (all three values)")
    parser.add_argument("--hand-wmem", help="hand-tuned tcp_wmem (all three values)")
    parser.add_argument("--starved-rmem", help="starved and tuned set-ups' initial tcp_rmem (all three values)")
    parser.add_argument("--starved-wmem", help="starved and tuned set-ups' initial tcp_wmem (all three values)")
    parser.add_argument("--json", type=Path, help="write every connection's goodput per second (and the rest) here")
    parser.add_argument("--png", type=Path, help="draw goodput per second of each set-up here (needs matplotlib)")
    args = parser.parse_args()
    global OFFLOADS, DUMP, HAND_RMEM, HAND_WMEM, SS, STARVED_RMEM, STARVED_WMEM
    STARVED_RMEM = args.starved_rmem or STARVED
    STARVED_WMEM = args.starved_wmem or STARVED
    SS = args.ss
    OFFLOADS = not args.no_offloads
    if args.hand_max:
        HAND_RMEM = f"4096 131072 {args.hand_max}"
        HAND_WMEM = f"4096 16384 {args.hand_max}"
    if args.hand_rmem:
        HAND_RMEM = args.hand_rmem
    if args.hand_wmem:
        HAND_WMEM = args.hand_wmem
    if args.dump:
        DUMP = args.dump
        DAEMON_EXTRA.append("-d")
    if os.geteuid() != 0:
        print("needs root (namespaces, netem, BPF)", file=sys.stderr)
        return 2
    print(f"# {platform.node()} kernel {platform.release()}, {'legacy' if args.legacy else 'full'} variant")
    names = args.only or ["starved", "tuned", "hand-tuned"]
    runs = []
    for i, name in enumerate(names):
        runs.append(measure(name, args.seconds, args.each, args.legacy, 5300 + 100 * i))
    report(runs, args.each)
    if args.json:
        write_json(runs, args.json, args)
    if args.png:
        draw(runs, args.png)
    return 0


def write_json(runs: list[Run], path: Path, args: argparse.Namespace) -> None:
    doc = {
        "bench": "tcp_buffer_efficacy",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "kernel": platform.release(),
        "in_vm": os.environ.get("PYBPFTUNE_VM") == "1",
        "variant": "legacy" if args.legacy else "full",
        "load": Path("/proc/loadavg").read_text().split()[:3],
        "path": {"one_way_delay": ONE_WAY_DELAY, "rate": RATE, "bdp_bytes": BDP},
        "seconds": args.seconds,
        "each": args.each,
        "runs": [
            {
                "name": r.name,
                "transfers": [{"start": t.start, "per_second": t.per_second, "mean": t.mean,
                               "daemon_cpu": t.daemon_cpu} for t in r.transfers],
                "limits": r.limits,
                "counters": r.counters,
                "daemon_lines": r.daemon_lines,
                "late_mean": r.late_mean(),
            }
            for r in runs
        ],
    }  # fmt: skip
    path.write_text(json.dumps(doc, indent=1) + "\n")


def draw(runs: list[Run], path: Path, kernel: str | None = None) -> None:
    """Receiver goodput per second over the run, one line per set-up
    (connection boundaries show as the dips of each new slow start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for r in runs:
        xs: list[float] = []
        ys: list[float] = []
        for t in r.transfers:
            xs.extend(t.start + i + 0.5 for i in range(len(t.per_second)))
            ys.extend(t.per_second)
        ax.plot(xs, ys, marker=".", label=f"{r.name} (first {r.transfers[0].mean:.1f}, ≥ {LATE_S:.0f} s "
                f"{r.late_mean():.1f} Mbit/s)" if r.transfers else r.name)  # fmt: skip
    ax.set_xlabel("seconds since the first transfer")
    ax.set_ylabel("receiver goodput, Mbit/s")
    ax.set_title(f"tcp_buffer efficacy: {ONE_WAY_DELAY} each way, {RATE} ({kernel or platform.release()})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
