#!/usr/bin/env python3
"""What a daemon costs, measured from outside: start-up, fds, threads, memory, idle CPU, exit.

    sudo .venv/bin/python bench/footprint.py                       # pybpftune, full variant
    sudo .venv/bin/python bench/footprint.py --legacy --runs 2     # full and legacy, twice each
    sudo .venv/bin/python bench/footprint.py --compare "/usr/sbin/bpftune -s"   # and another daemon

The same method for every daemon, so any two can be compared in one run (an
operator with bpftune installed passes it to ``--compare``):

* a poller reads /proc/PID/fd every 50 ms and counts the BPF program, map
  and link fds; **start-up** is the time from exec to the last change of
  those counts (every tuner attached), **first attach** the first link;
* **idle CPU** is utime+stime between ``--idle-from`` and ``--idle-to``
  seconds after exec (30 and 45 by default), with no traffic;
* **peak RSS** is VmHWM just before the stop; RSS, fds and threads too;
* **exit** is the time from SIGINT to the process's end;
* ``--admin-write S`` writes net.ipv4.tcp_rmem (its own value) S seconds
  after exec and reports when the daemon's output said "modified sysctl".

Runs are interleaved (A B A B ...).  A table goes to stdout; ``--json`` and
``--png`` write the figures and the start-up timelines (matplotlib is a bench
dependency: ``pip install matplotlib``).  Needs root; each daemon is started
with ``-s`` added if not given (logs to stderr, which the bench reads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BPFTUNE = Path(sys.executable).parent / "bpftune"
CLK_TCK = os.sysconf("SC_CLK_TCK")
POLL_S = 0.05
KINDS = {"anon_inode:bpf-prog": "progs", "anon_inode:bpf-map": "maps", "anon_inode:bpf_link": "links"}
ADMIN_SYSCTL = "net/ipv4/tcp_rmem"


@dataclass
class Sample:
    t: float
    progs: int
    maps: int
    links: int
    fds: int
    threads: int
    rss_kb: int


@dataclass
class Run:
    label: str
    argv: list[str]
    startup_s: float | None = None
    first_attach_s: float | None = None
    progs: int = 0
    maps: int = 0
    links: int = 0
    fds: int = 0
    threads: int = 0
    rss_kb: int = 0
    peak_rss_kb: int = 0
    idle_cpu_s: float | None = None
    idle_wakeups: int | None = None
    exit_s: float | None = None
    exit_code: int | None = None
    admin_write_s: float | None = None
    admin_seen_s: float | None = None
    samples: list[Sample] = field(default_factory=list)
    output_tail: list[str] = field(default_factory=list)


def bpf_fds(pid: int) -> tuple[dict[str, int], int]:
    counts = {"progs": 0, "maps": 0, "links": 0}
    total = 0
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return counts, 0
    for name in names:
        total += 1
        try:
            kind = KINDS.get(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            continue
        if kind:
            counts[kind] += 1
    return counts, total


def status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def cpu_s(pid: int) -> float | None:
    """utime + stime of the whole process (all threads), seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wakeups(pid: int) -> int:
    """Voluntary + involuntary context switches of all threads: how often it woke."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total


def measure(label: str, argv: list[str], idle_from: float, idle_to: float, admin_write: float | None) -> Run:
    run = Run(label, argv)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stdout is not None
        # extend() consumes lazily: each line is stamped as it arrives
        lines.extend((time.monotonic() - t0, raw.decode(errors="replace").rstrip()) for raw in proc.stdout)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    last: tuple[int, int, int] | None = None
    cpu_from = wake_from = None
    wrote = admin_write is None
    try:
        while True:
            t = time.monotonic() - t0
            if proc.poll() is not None:
                break
            counts, total = bpf_fds(proc.pid)
            st = status(proc.pid)
            key = (counts["progs"], counts["maps"], counts["links"])
            if key != last:
                if last is not None or any(key):
                    run.startup_s = t
                if counts["links"] and run.first_attach_s is None:
                    run.first_attach_s = t
                last = key
            run.samples.append(Sample(round(t, 3), *key, total, st.get("Threads", 0), st.get("VmRSS", 0)))
            if not wrote and admin_write is not None and t >= admin_write:
                wrote = True
                path = Path("/proc/sys") / ADMIN_SYSCTL
                path.write_text(path.read_text())
                run.admin_write_s = time.monotonic() - t0
            if cpu_from is None and t >= idle_from:
                cpu_from, wake_from = cpu_s(proc.pid), wakeups(proc.pid)
            if t >= idle_to:
                cpu_to, wake_to = cpu_s(proc.pid), wakeups(proc.pid)
                if cpu_from is not None and cpu_to is not None:
                    run.idle_cpu_s = round(cpu_to - cpu_from, 3)
                if wake_from is not None:
                    run.idle_wakeups = wake_to - wake_from
                st = status(proc.pid)
                run.peak_rss_kb, run.rss_kb, run.threads = st.get("VmHWM", 0), st.get("VmRSS", 0), st.get("Threads", 0)
                run.progs, run.maps, run.links = key
                run.fds = total
                break
            time.sleep(POLL_S)
    finally:
        t_int = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            run.exit_s = round(time.monotonic() - t_int, 3)
        run.exit_code = proc.returncode
        reader.join(5)
    if run.admin_write_s is not None:
        seen = [t for t, line in lines if "modified sysctl" in line and t >= run.admin_write_s]
        run.admin_seen_s = round(seen[0], 2) if seen else None
    run.output_tail = [line for _t, line in lines[-5:]]
    return run


def thin(samples: list[Sample]) -> list[Sample]:
    """The samples where a count changed, and one a second otherwise (the JSON stays small)."""
    out: list[Sample] = []
    for s in samples:
        last = out[-1] if out else None
        if (
            last is None
            or (s.progs, s.maps, s.links, s.threads) != (last.progs, last.maps, last.links, last.threads)
            or s.t - last.t >= 1.0
        ):
            out.append(s)
    return out


def with_stderr_flag(argv: list[str]) -> list[str]:
    if any(a in ("-s", "--stderr") or (re.fullmatch(r"-[a-zA-Z]*s[a-zA-Z]*", a) is not None) for a in argv[1:]):
        return argv
    return [*argv, "-s"]


def fmt(v: float | int | None, unit: str = "", digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}{unit}" if isinstance(v, float) else f"{v}{unit}"


def table(runs: list[Run]) -> str:
    head = (
        "| daemon | start-up | first attach | progs/maps/links | fds | threads | RSS | peak RSS | idle CPU "
        "| idle wake-ups | exit | admin write seen |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        admin = "-"
        if r.admin_write_s is not None:
            admin = f"{r.admin_seen_s - r.admin_write_s:.2f} s after" if r.admin_seen_s is not None else "never"
        out.append(
            f"| {r.label} | {fmt(r.startup_s, ' s')} | {fmt(r.first_attach_s, ' s')} | {r.progs}/{r.maps}/{r.links} "
            f"| {r.fds} | {r.threads} | {r.rss_kb / 1024:.1f} MB | {r.peak_rss_kb / 1024:.1f} MB "
            f"| {fmt(r.idle_cpu_s, ' s', 3)} | {fmt(r.idle_wakeups)} | {fmt(r.exit_s, ' s')} | {admin} |"
        )
    return "\n".join(out)


def draw(runs: list[Run], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in runs:
        xs = [s.t for s in r.samples if s.t <= (r.startup_s or 0) + 3]
        ys = [s.progs + s.maps + s.links for s in r.samples if s.t <= (r.startup_s or 0) + 3]
        ax.step(xs, ys, where="post", label=f"{r.label} (start-up {fmt(r.startup_s, ' s')})")
    ax.set_xlabel("seconds since exec")
    ax.set_ylabel("BPF program + map + link fds")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="runs of each daemon, interleaved (default 1)")
    parser.add_argument("--legacy", action="store_true", help="also run every daemon with -L (legacy variant)")
    parser.add_argument("--compare", action="append", default=[], metavar="CMD", help="another daemon's command line")
    parser.add_argument(
        "--cmd", default=f"{BPFTUNE} -s", help="pybpftune's command line (default: the venv's bpftune -s)"
    )
    parser.add_argument("--idle-from", type=float, default=30.0, help="idle window start, s after exec (30)")
    parser.add_argument("--idle-to", type=float, default=45.0, help="idle window end, s after exec (45)")
    parser.add_argument("--admin-write", type=float, default=None, metavar="S", help="write tcp_rmem S s after exec")
    parser.add_argument("--json", type=Path, help="write the figures (and timelines) here")
    parser.add_argument("--png", type=Path, help="draw the start-up timelines here")
    parser.add_argument("--label", default="", help="what to call this run in the JSON and the picture")
    ns = parser.parse_args()
    if os.geteuid() != 0:
        print("footprint.py: needs root (the daemons load BPF)", file=sys.stderr)
        return 2
    daemons = [("pybpftune", with_stderr_flag(shlex.split(ns.cmd)))]
    daemons += [(f"compare{i + 1 if len(ns.compare) > 1 else ''}", with_stderr_flag(shlex.split(c))) for i, c in
                enumerate(ns.compare)]  # fmt: skip
    if ns.legacy:
        daemons = [d for label, argv in daemons for d in ((label, argv), (f"{label} -L", [*argv, "-L"]))]
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    runs: list[Run] = []
    for i in range(ns.runs):
        for label, argv in daemons:
            print(f"run {i + 1}/{ns.runs}: {label}: {shlex.join(argv)}", file=sys.stderr, flush=True)
            run = measure(label, argv, ns.idle_from, ns.idle_to, ns.admin_write)
            if run.exit_code not in (0, None) and run.startup_s is None:
                print(f"  {label} exited {run.exit_code}: " + " | ".join(run.output_tail), file=sys.stderr)
            runs.append(run)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    where = f"{platform.node()} kernel {os.uname().release}, {os.cpu_count()} CPUs"
    print(f"\n{where}; load average {' '.join(load_before)} before, {' '.join(load_after)} after\n")
    print(table(runs))
    if ns.json:
        doc = {
            "bench": "footprint",
            "label": ns.label,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "kernel": os.uname().release,
            "in_vm": os.environ.get("PYBPFTUNE_VM") == "1",
            "load_before": load_before,
            "load_after": load_after,
            "idle_window_s": [ns.idle_from, ns.idle_to],
            "runs": [{**asdict(r), "samples": [asdict(x) for x in thin(r.samples)]} for r in runs],
        }
        ns.json.write_text(json.dumps(doc, indent=1) + "\n")
    if ns.png:
        draw(runs, ns.png, f"start-up: BPF fds over time ({ns.label or os.uname().release})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
