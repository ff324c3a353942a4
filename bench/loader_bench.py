#!/usr/bin/env python3
"""Loader and ring-buffer benchmark (``make bench``; needs root and a BPF-capable kernel).

Prints numbers, not verdicts:

1. the support probe, then open+load+attach time of every packaged BPF object
   (both variants where they load here) through ``loader.load_object`` with a
   shared ``SharedMaps``, median of N runs, and the time to bring all of them
   up together on one ring buffer.  Objects from ``pybpftune.bpf.available()``
   are picked up automatically; the ring-buffer test object from tests/bpf is
   added as a labelled reference so the shared-ring path is measured even
   while few tuner objects exist;
2. how fast the shared ring buffer drains into a Python handler: an XDP
   program (tests/bpf/ringbuf_burst.bpf.c) run through BPF_PROG_TEST_RUN with
   ``repeat`` produces a burst of events in a producer thread while this thread
   polls the ``SharedMaps``, which dispatches each event by tuner id to a
   registered handler; repeated for several ring sizes to show the drops.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import threading
import time
import timeit
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pybpftune import bpf, libbpf
from pybpftune.errors import BpfError, BpfLoadError, BpfObjectError, NotSupported, PybpftuneError
from pybpftune.events import Event
from pybpftune.loader import load_object, load_reason
from pybpftune.objects import LoadedObject, OpenObject
from pybpftune.ringbuf import SharedMaps
from pybpftune.support import Support, probe_support

REPO = Path(__file__).resolve().parent.parent
TEST_BPF = REPO / "tests" / "bpf"
BURST_OBJECT = TEST_BPF / "ringbuf_burst.bpf.o"
BURST_PROGRAM = "bpftune_ringbuf_burst"
BURST_TUNER_ID = 7
# Reference objects from tests/bpf loaded alongside the packaged ones.
REFERENCE_OBJECTS = ("ringbuf_test",)
# BPFTUNE_RINGBUF_SIZE in src/bpf/pybpftune.bpf.h, used when size=None.
DEFAULT_RING_BYTES = 256 * 1024
RING_SIZES: tuple[int | None, ...] = (None, 4 << 20, 64 << 20, 256 << 20)
# One ring-buffer record: 8-byte header plus the 248-byte event, 8-aligned.
RECORD_BYTES = 8 + ((libbpf.EVENT_SIZE + 7) & ~7)
POLL_MS = 5  # timeout of each SharedMaps.poll() while the burst runs
PACKET = bytes(64)  # XDP test runs need at least an Ethernet header


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.2f} ms"


def size_label(size: int | None) -> str:
    n = DEFAULT_RING_BYTES if size is None else size
    text = f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"
    return text + (" (default)" if size is None else "")


# --- 1. support probe and object load times -----------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One object file to load: packaged tuner object or test reference."""

    name: str
    variant: str
    path: Path
    reference: bool = False

    @property
    def label(self) -> str:
        return f"{'[test] ' if self.reference else ''}{self.name} ({self.variant})"


def candidates() -> list[Candidate]:
    out: list[Candidate] = []
    for name in bpf.available():
        for variant in ("full", "legacy"):
            try:
                path = bpf.object_path(name, legacy=variant == "legacy")
            except BpfObjectError:
                continue
            out.append(Candidate(name, variant, path))
    for name in REFERENCE_OBJECTS:
        for variant, suffix in (("full", ".bpf.o"), ("legacy", ".bpf.legacy.o")):
            path = TEST_BPF / f"{name}{suffix}"
            if path.is_file():
                out.append(Candidate(name, variant, path, reference=True))
    return out


@contextmanager
def bench_cgroup(root: str | None) -> Iterator[int | None]:
    """A private child cgroup to attach cgroup programs to (never the root)."""
    if root is None:
        yield None
        return
    path = Path(root) / f"pybpftune-bench-{os.getpid()}"
    try:
        path.mkdir()
    except OSError as exc:
        print(f"  (cannot create {path}: {exc.strerror}; cgroup programs stay unattached)")
        yield None
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)
        path.rmdir()


def brief(exc: PybpftuneError) -> str:
    """One short line: libbpf's log tail is left out of load errors."""
    if isinstance(exc, BpfError):
        return f"{exc.what}: {exc.short()}"
    return str(exc)


def load(cand: Candidate, support: Support, ring: SharedMaps, cgroup_fd: int | None, tuner_id: int) -> LoadedObject:
    def configure(obj: OpenObject) -> None:
        if obj.has_global("tuner_id"):
            obj.set_global("tuner_id", tuner_id % libbpf.MAX_TUNERS)

    return load_object(cand.path, cand.name, support, shared=ring, cgroup_fd=cgroup_fd, configure=configure)


def bench_support(runs: int) -> Support:
    probe_support.cache_clear()
    t0 = time.perf_counter()
    support = probe_support()
    cold = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        probe_support.cache_clear()
        t0 = time.perf_counter()
        support = probe_support()
        times.append(time.perf_counter() - t0)
    print("== support probe (probe_support(), loads and attaches one program per kind)")
    print(f"  first call {ms(cold)}   median of {runs} {ms(statistics.median(times))}   level: {support.level}")
    return support


def bench_loads(support: Support, runs: int, cgroup_fd: int | None) -> None:
    print(f"\n== open+load+attach through loader.load_object, shared SharedMaps, median of {runs} (+1 warm-up)")
    print(f"  {'object':<30} {'load+attach':>11} {'close':>11}  forms chosen")
    loadable: dict[Candidate, float] = {}
    with SharedMaps() as ring:
        for tuner_id, cand in enumerate(candidates()):
            up: list[float] = []
            down: list[float] = []
            forms = ""
            try:
                for i in range(runs + 1):
                    t0 = time.perf_counter()
                    loaded = load(cand, support, ring, cgroup_fd, tuner_id)
                    t1 = time.perf_counter()
                    loaded.close()
                    t2 = time.perf_counter()
                    if i == 0:
                        forms = "; ".join(c.describe() for c in loaded.choices.values()) or "single-form"
                        continue
                    up.append(t1 - t0)
                    down.append(t2 - t1)
            except NotSupported as exc:
                print(f"  {cand.label:<30} skipped: not supported: {exc.reason}")
                continue
            except PybpftuneError as exc:
                print(f"  {cand.label:<30} failed: {type(exc).__name__}: {brief(exc)}")
                continue
            loadable[cand] = statistics.median(up)
            print(f"  {cand.label:<30} {ms(loadable[cand])} {ms(statistics.median(down))}  {forms}")

    together = [c for c in loadable if c.variant == support.default_variant]
    if not together:
        print(f"  all together: no {support.default_variant}-variant object loads here")
        return
    totals = []
    for _ in range(runs):
        brought_up: list[LoadedObject] = []
        with SharedMaps() as ring:
            t0 = time.perf_counter()
            try:
                for tuner_id, cand in enumerate(together):
                    brought_up.append(load(cand, support, ring, cgroup_fd, tuner_id))
                totals.append(time.perf_counter() - t0)
            finally:
                for obj in brought_up:
                    obj.close()
    total = statistics.median(totals)
    separate = sum(loadable[c] for c in together)
    names = ", ".join(c.label for c in together)
    print(
        f"  all {len(together)} {support.default_variant}-variant objects on one fresh SharedMaps: {ms(total)}"
        f"   (sum of separate medians {ms(separate).strip()}, ratio {total / separate:.2f})"
    )
    print(f"    objects: {names}")


# --- 2. ring-buffer drain -----------------------------------------------------


class CountingHandler:
    """What a tuner's event handler minimally does: read a field, keep state."""

    def __init__(self) -> None:
        self.count = 0
        self.scenarios = 0

    def __call__(self, event: Event) -> None:
        self.count += 1
        self.scenarios += event.scenario_id


@dataclass(frozen=True)
class DrainResult:
    ring_size: int | None
    produced: int
    sent: int
    dropped: int
    received: int
    handled: int
    scenarios: int
    elapsed: float
    produce_time: float
    consumer_cpu: float
    longest_call: float

    @property
    def rate(self) -> float:
        return self.received / self.elapsed if self.elapsed else 0.0

    @property
    def cost_us(self) -> float:
        return self.consumer_cpu / self.received * 1e6 if self.received else 0.0

    def consistency(self) -> str:
        """Empty when the counters add up, else what does not."""
        problems = []
        if self.sent + self.dropped != self.produced:
            problems.append(f"sent {self.sent} + dropped {self.dropped} != produced {self.produced}")
        if self.received != self.sent:
            problems.append(f"received {self.received} != sent {self.sent}")
        if self.handled != self.received or self.scenarios != self.handled:
            problems.append(f"handler saw {self.handled} (scenario sum {self.scenarios}), ring {self.received}")
        return "; ".join(problems)


def drain_once(path: Path, ring_size: int | None, events: int) -> DrainResult:
    with SharedMaps(size=ring_size) as ring:
        with OpenObject.from_path(path, "ringbuf_burst") as opened:
            ring.prepare(opened)
            opened.set_global("tuner_id", BURST_TUNER_ID)
            obj = opened.load()
        try:
            ring.adopt(obj)
            handler = CountingHandler()
            ring.register(BURST_TUNER_ID, handler)
            prog_fd = obj.program_fd(BURST_PROGRAM)
            done = threading.Event()
            produce_time: list[float] = []
            failures: list[BaseException] = []

            def produce() -> None:
                t = time.perf_counter()
                try:
                    libbpf.prog_test_run(prog_fd, PACKET, events)
                except BaseException as exc:
                    failures.append(exc)
                finally:
                    produce_time.append(time.perf_counter() - t)
                    done.set()

            producer = threading.Thread(target=produce, name="burst-producer")
            cpu0 = time.thread_time()
            t0 = time.perf_counter()
            longest = 0.0
            producer.start()
            while not done.is_set():
                c0 = time.perf_counter()
                ring.poll(POLL_MS)
                longest = max(longest, time.perf_counter() - c0)
            while True:
                c0 = time.perf_counter()
                n = ring.consume()
                longest = max(longest, time.perf_counter() - c0)
                if n <= 0:
                    break
            elapsed = time.perf_counter() - t0
            cpu = time.thread_time() - cpu0
            producer.join()
            if failures:
                raise failures[0]
            return DrainResult(
                ring_size=ring_size,
                produced=events,
                sent=obj.get_global("bpftune_events_sent"),
                dropped=obj.get_global("bpftune_ringbuf_drops"),
                received=ring.received,
                handled=handler.count,
                scenarios=handler.scenarios,
                elapsed=elapsed,
                produce_time=produce_time[0],
                consumer_cpu=cpu,
                longest_call=longest,
            )
        finally:
            obj.close()


def per_call_ns(fn: Callable[[], object], number: int = 100_000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e9


def bench_drain(events: int, runs: int) -> None:
    print(f"\n== ring-buffer drain: {events:,} events (XDP BPF_PROG_TEST_RUN repeat) into a Python handler")
    print(f"   record {RECORD_BYTES} bytes; median of {runs} runs by rate; consumer = this thread, producer = a thread")
    if not BURST_OBJECT.is_file():
        print(f"  {BURST_OBJECT} is missing: run `make`")
        return
    print(
        f"  {'ring':<17} {'produced':>9} {'received':>9} {'dropped':>9} {'drop%':>6} "
        f"{'elapsed':>11} {'events/s':>9} {'cpu/event':>9} {'cpu%':>4} {'kernel ev/s':>11} {'longest call':>12}"
    )
    lossless: DrainResult | None = None
    for size in RING_SIZES:
        try:
            results = sorted((drain_once(BURST_OBJECT, size, events) for _ in range(runs)), key=lambda r: r.rate)
        except BpfLoadError as exc:
            # The producer is an XDP program calling bpf_get_current_pid_tgid
            # (through bpftune_send_event), which older kernels (6.1) refuse to XDP.
            print(f"  skipped: this kernel refuses the burst producer ({load_reason(exc)})")
            return
        r = results[len(results) // 2]
        print(
            f"  {size_label(size):<17} {r.produced:>9,} {r.received:>9,} {r.dropped:>9,} "
            f"{100 * r.dropped / r.produced:>5.1f}% {ms(r.elapsed)} {r.rate:>9,.0f} "
            f"{r.cost_us:>6.2f} us {100 * r.consumer_cpu / r.elapsed:>4.0f} "
            f"{r.produced / r.produce_time:>11,.0f} {ms(r.longest_call)}"
        )
        for res in results:
            if problem := res.consistency():
                print(f"    counters do not add up: {problem}")
        if r.dropped == 0:
            lossless = r
    capacity = DEFAULT_RING_BYTES // RECORD_BYTES
    print(f"  (the default ring holds {capacity:,} records; received - capacity = drained while the burst ran)")
    print("  (cpu/event: consumer thread CPU per received event; cpu%: its share of one CPU; kernel ev/s: produced")
    print("   per second of BPF_PROG_TEST_RUN, drops included; events/s drops when cpu% does: other load)")
    print(f"  (longest call: the longest single poll({POLL_MS})/consume(); libbpf drains until the ring is empty)")

    # Where the per-event time goes, measured without the kernel.
    handler = CountingHandler()
    event = Event.build(BURST_TUNER_ID, 1)
    data = event.data
    handler_ns = per_call_ns(lambda: handler(event))
    event_ns = per_call_ns(lambda: Event(data))
    print("  per-event cost split (Python only, no kernel):")
    print(f"    handler (reads event.scenario_id, counts)      {handler_ns:7.0f} ns")
    print(f"    Event(bytes) construction                      {event_ns:7.0f} ns")
    if lossless is not None:
        rest = lossless.cost_us * 1e3 - handler_ns - event_ns
        print(
            f"    rest: libbpf callback, copy, dispatch, polling {rest:7.0f} ns"
            f"  (of {lossless.cost_us * 1e3:.0f} ns consumer CPU per event, lossless run)"
        )


# --- main ------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="events per burst (default 1,000,000)")
    parser.add_argument("--load-runs", type=int, default=5, help="runs per load timing (default 5)")
    parser.add_argument("--drain-runs", type=int, default=3, help="bursts per ring size (default 3)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("loader_bench needs root (it loads BPF programs)", file=sys.stderr)
        return 1

    start = time.perf_counter()
    print(f"pybpftune loader bench  {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %z}")
    print(
        f"kernel {platform.release()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"libbpf {libbpf.version()}, load average {os.getloadavg()[0]:.2f}\n"
    )
    support = bench_support(args.load_runs)
    with bench_cgroup(support.cgroup2) as cgroup_fd:
        bench_loads(support, args.load_runs, cgroup_fd)
    bench_drain(args.events, args.drain_runs)
    print(f"\nbench took {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
