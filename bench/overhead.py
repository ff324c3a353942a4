#!/usr/bin/env python3
"""What the daemon costs a workload: throughput and request/response latency
with and without it, the kernel-side cost of each BPF program, and the cost
of each event in the daemon.

    sudo .venv/bin/python bench/overhead.py                  # 5 rounds, 5 s per measurement
    sudo .venv/bin/python bench/overhead.py --rounds 7 --seconds 10 --json out.json --png out.png

Two namespaces joined by veth.  Each round measures both set-ups, in
alternating order (off, on; then on, off; ...): an iperf3 transfer (receiver
throughput) and a qperf ``tcp_lat`` run (one-byte request/response latency,
the seed's own latency test) without the daemon, and the same with
``bpftune -s -R`` (every tuner) started before and stopped after.  Reported:
median and spread (min-max) of each, and the difference of the medians.

While the daemon runs, ``kernel.bpf_stats_enabled`` is 1 (restored after):
for each of the daemon's programs, run count and run time during the iperf3
transfer (what bpftool reports as run_cnt and run_time_ns), per second of
traffic.  The daemon's CPU time over the transfer and the events it handled
(its exit summary) give the event path's cost per event under that mix.

Needs root, iperf3, qperf and bpftool (Debian packages).  matplotlib draws
``--png`` (a bench dependency, not a runtime one).
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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.kernel.harness import Daemon, NetnsPair, iperf3_retrying, netns_pair, run, sysctls  # noqa: E402

IPERF_PORT = 5301
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    setup: str  # "off" or "on"
    round: int
    throughput_mbit: float
    latency_us: float


@dataclass
class ProgCost:
    name: str
    type: str
    runs: int = 0
    run_time_ns: int = 0
    seconds: float = 0.0  # traffic seconds these were counted over

    @property
    def runs_per_s(self) -> float:
        return self.runs / self.seconds if self.seconds else 0.0

    @property
    def ns_per_run(self) -> float:
        return self.run_time_ns / self.runs if self.runs else 0.0

    @property
    def cpu_share(self) -> float:
        """Fraction of one CPU spent in this program during the traffic."""
        return self.run_time_ns / 1e9 / self.seconds if self.seconds else 0.0


@dataclass
class DaemonCost:
    traffic_s: float = 0.0
    cpu_s: float = 0.0  # daemon utime+stime over the transfers
    events: int = 0  # events handled over the daemon's whole run (exit summary)
    rounds: int = 0


@dataclass
class Result:
    samples: list[Sample] = field(default_factory=list)
    programs: dict[str, ProgCost] = field(default_factory=dict)
    daemon: DaemonCost = field(default_factory=DaemonCost)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def prog_stats() -> dict[int, dict[str, object]]:
    """id -> bpftool's JSON for every loaded program."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {int(p["id"]): p for p in json.loads(out or "[]")}


def throughput(pair: NetnsPair, seconds: float) -> float:
    """Receiver throughput of one iperf3 transfer, Mbit/s."""
    out = iperf3_retrying(
        ["ip", "netns", "exec", pair.client, "iperf3", "-c", pair.server_addr, "-p", str(IPERF_PORT),
         "-t", str(seconds), "-J"],
        seconds,
    )  # fmt: skip
    doc = json.loads(out)
    return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e6


def latency(pair: NetnsPair, seconds: float) -> float:
    """qperf tcp_lat: one-byte request/response latency, microseconds."""
    out = run(["qperf", pair.server_addr, "-t", str(int(seconds)), "-vu", "tcp_lat"], pair.client, timeout=seconds + 60)
    m = re.search(r"latency\s*=\s*([\d.]+)\s*(ns|us|ms|sec)", out)
    if not m:
        raise RuntimeError(f"qperf said: {out.strip()}")
    scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "sec": 1e6}[m.group(2)]
    return float(m.group(1)) * scale


def measure_once(pair: NetnsPair, seconds: float) -> tuple[float, float]:
    return throughput(pair, seconds), latency(pair, seconds)


def round_with_daemon(pair: NetnsPair, seconds: float, rnd: int, result: Result, state: str) -> Sample:
    before = set(prog_stats())
    d = Daemon(["-s", "-R", "--state-dir", state])
    try:
        d.started(900)
        ours = set(prog_stats()) - before
        with sysctls() as s:
            s.set("kernel.bpf_stats_enabled", 1)
            stats0 = prog_stats()
            cpu0 = cpu_seconds(d.proc.pid)
            t0 = time.monotonic()
            mbit = throughput(pair, seconds)
            traffic = time.monotonic() - t0
            cpu1 = cpu_seconds(d.proc.pid)
            stats1 = prog_stats()
        lat = latency(pair, seconds)
    finally:
        d.stop()
    for pid in ours:
        a, b = stats0.get(pid), stats1.get(pid)
        if a is None or b is None:
            continue
        name = str(b.get("name", pid))
        cost = result.programs.setdefault(name, ProgCost(name, str(b.get("type", ""))))
        cost.runs += int(b.get("run_cnt", 0)) - int(a.get("run_cnt", 0))  # type: ignore[call-overload]
        cost.run_time_ns += int(b.get("run_time_ns", 0)) - int(a.get("run_time_ns", 0))  # type: ignore[call-overload]
        cost.seconds += traffic
    m = re.search(r"Summary: (\d+) events handled from the ring buffer", d.output)
    result.daemon.traffic_s += traffic
    result.daemon.cpu_s += cpu1 - cpu0
    result.daemon.events += int(m.group(1)) if m else 0
    result.daemon.rounds += 1
    return Sample("on", rnd, mbit, lat)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def report(result: Result, where: str) -> str:
    off = [s for s in result.samples if s.setup == "off"]
    on = [s for s in result.samples if s.setup == "on"]
    lines = [
        where,
        "",
        "| set-up | throughput, Mbit/s: median (min-max) | tcp_lat, us: median (min-max) |",
        "|---|---|---|",
    ]
    for name, group in (("without the daemon", off), ("with the daemon", on)):
        lines.append(
            f"| {name} | {spread([s.throughput_mbit for s in group])} | {spread([s.latency_us for s in group])} |"
        )
    t_off, t_on = statistics.median(s.throughput_mbit for s in off), statistics.median(s.throughput_mbit for s in on)
    l_off, l_on = statistics.median(s.latency_us for s in off), statistics.median(s.latency_us for s in on)
    lines.append(
        f"| difference of the medians | {100 * (t_on - t_off) / t_off:+.2f} % | {100 * (l_on - l_off) / l_off:+.2f} % |"
    )
    lines += ["", "| program | type | runs/s | ns/run | CPU share |", "|---|---|---|---|---|"]
    total = 0.0
    for cost in sorted(result.programs.values(), key=lambda c: -c.run_time_ns):
        total += cost.cpu_share
        lines.append(
            f"| {cost.name} | {cost.type} | {cost.runs_per_s:,.0f} | {cost.ns_per_run:,.0f} "
            f"| {100 * cost.cpu_share:.3f} % |"
        )
    lines.append(f"| all of them | | | | {100 * total:.3f} % |")
    dc = result.daemon
    if dc.traffic_s:
        per_event = f"{1e6 * dc.cpu_s / dc.events:.0f} us" if dc.events else "-"
        lines += [
            "",
            f"daemon: {dc.cpu_s / dc.traffic_s * 100:.2f} % of a CPU during the transfers "
            f"({dc.cpu_s:.2f} s over {dc.traffic_s:.1f} s); {dc.events} events handled over "
            f"{dc.rounds} daemon runs ({dc.events / dc.traffic_s:.1f} per second of traffic); "
            f"CPU per event (upper bound: all CPU charged to events): {per_event}",
        ]
    return "\n".join(lines)


def draw(result: Result, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, metric, label in (
        (axes[0], "throughput_mbit", "iperf3 throughput, Mbit/s"),
        (axes[1], "latency_us", "qperf tcp_lat, us"),
    ):
        for i, setup in enumerate(("off", "on")):
            vals = [getattr(s, metric) for s in result.samples if s.setup == setup]
            ax.scatter([i] * len(vals), vals, alpha=0.6)
            ax.hlines(statistics.median(vals), i - 0.2, i + 0.2, color="black")
        ax.set_xticks([0, 1], ["without", "with daemon"])
        ax.set_title(label)
        ax.grid(alpha=0.3)
    progs = sorted(result.programs.values(), key=lambda c: -c.run_time_ns)
    axes[2].barh([c.name for c in progs], [100 * c.cpu_share for c in progs])
    axes[2].set_xlabel("% of one CPU during iperf3")
    axes[2].set_title("kernel-side cost per program")
    axes[2].invert_yaxis()
    axes[2].tick_params(axis="y", labelsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each measuring both set-ups (default 5)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 and qperf run (default 5)")
    parser.add_argument("--json", type=Path, help="write every sample and the costs here")
    parser.add_argument("--png", type=Path, help="draw the samples and the per-program cost here")
    parser.add_argument("--label", default="", help="what to call this run in the JSON and the picture")
    ns = parser.parse_args()
    if os.geteuid() != 0:
        print("overhead.py: needs root", file=sys.stderr)
        return 2
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    result = Result()
    with tempfile.TemporaryDirectory() as state, netns_pair("ovh") as pair:
        servers = [
            subprocess.Popen(["ip", "netns", "exec", pair.server, *cmd], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
            for cmd in (["iperf3", "-s", "-p", str(IPERF_PORT)], ["qperf"])
        ]  # fmt: skip
        try:
            time.sleep(1)
            measure_once(pair, 1)  # warm-up, not counted
            for rnd in range(ns.rounds):
                order = ("off", "on") if rnd % 2 == 0 else ("on", "off")
                for setup in order:
                    print(f"round {rnd + 1}/{ns.rounds}: {setup}", file=sys.stderr, flush=True)
                    if setup == "off":
                        mbit, lat = measure_once(pair, ns.seconds)
                        result.samples.append(Sample("off", rnd, mbit, lat))
                    else:
                        result.samples.append(round_with_daemon(pair, ns.seconds, rnd, result, state))
        finally:
            for p in servers:
                p.kill()
                p.wait()
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    where = (
        f"{platform.node()} kernel {os.uname().release}, {os.cpu_count()} CPUs; load average "
        f"{' '.join(load_before)} before, {' '.join(load_after)} after; {ns.rounds} rounds of {ns.seconds:g} s"
    )
    print(report(result, where))
    if ns.json:
        doc = {
            "bench": "overhead",
            "label": ns.label,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "kernel": os.uname().release,
            "in_vm": os.environ.get("PYBPFTUNE_VM") == "1",
            "load_before": load_before,
            "load_after": load_after,
            "samples": [asdict(s) for s in result.samples],
            "programs": {k: {**asdict(v), "runs_per_s": v.runs_per_s, "ns_per_run": v.ns_per_run,
                             "cpu_share": v.cpu_share} for k, v in result.programs.items()},
            "daemon": asdict(result.daemon),
        }  # fmt: skip
        ns.json.write_text(json.dumps(doc, indent=1) + "\n")
    if ns.png:
        draw(result, ns.png, f"overhead ({ns.label or os.uname().release})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
