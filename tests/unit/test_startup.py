"""Start-up machinery without the kernel: the per-boot support cache (and
what it refuses), the load thread, and ticks that run only when due."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

import pytest

from pybpftune.daemon import Daemon, DaemonConfig
from pybpftune.startup import Future, LoadThread
from pybpftune.state import StateDir
from pybpftune.support import PROBE_PROGRAMS, KindSupport, kinds_from_text, kinds_to_text
from pybpftune.tuner import Tuner, TunerContext

KEY = "1 boot-id 6.1.0 1.1 0.1.0 7584:1"


def all_kinds() -> dict[str, KindSupport]:
    return {
        k: KindSupport(k, True, k != "kprobe", "" if k != "kprobe" else "attach refused: ENOENT")
        for k in PROBE_PROGRAMS
    }


def test_cached_kinds_round_trip_under_their_key_only() -> None:
    text = kinds_to_text(KEY, all_kinds())
    assert kinds_from_text(text, KEY) == all_kinds()
    assert kinds_from_text(text, KEY.replace("boot-id", "other-boot")) is None  # rebooted: probe again
    assert kinds_from_text(text, "") is None  # no key (no boot id): no cache


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: "not json",
        lambda d: json.dumps([]),
        lambda d: json.dumps({**d, "kinds": []}),
        lambda d: json.dumps({**d, "kinds": {k: v for k, v in d["kinds"].items() if k != "tp_btf"}}),
        lambda d: json.dumps({**d, "kinds": {**d["kinds"], "tp_btf": [1, 1, ""]}}),
        lambda d: json.dumps({**d, "kinds": {**d["kinds"], "tp_btf": [True, True]}}),
        lambda d: json.dumps({**d, "kinds": {**d["kinds"], "tp_btf": [True, True, "works but has a reason"]}}),
        lambda d: json.dumps({**d, "kinds": {**d["kinds"], "kprobe": [True, False, "x" * 501]}}),
        lambda d: json.dumps({**d, "kinds": {**d["kinds"], "kprobe": [True, False, "line\nbreak"]}}),
    ],
)
def test_a_damaged_or_forged_cache_is_ignored(mangle) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(kinds_to_text(KEY, all_kinds()))
    assert kinds_from_text(mangle(doc), KEY) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="cache files are trusted only when root-owned; needs root to create")
def test_cache_files_are_read_only_when_only_root_can_write_them(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.write_cache("support", "hello")
    assert state.read_cache("support") == "hello"
    (tmp_path / "support.cache").chmod(0o666)
    assert state.read_cache("support") is None
    (tmp_path / "support.cache").unlink()
    (tmp_path / "elsewhere").write_text("hello")
    (tmp_path / "support.cache").symlink_to(tmp_path / "elsewhere")
    assert state.read_cache("support") is None
    assert state.read_cache("missing") is None


def test_load_thread_runs_jobs_in_order_and_close_drops_the_rest() -> None:
    loader = LoadThread()
    gate = threading.Event()
    seen: list[object] = []
    first, second = Future(), Future()
    loader.submit(lambda: gate.wait(5) and "first", first.set)
    loader.submit(lambda: "second", second.set)
    loader.submit(lambda: seen.append("third"), lambda r, e: None)
    gate.set()
    assert first.result() == "first" and second.result() == "second"

    def boom() -> None:
        raise RuntimeError("load failed")

    failed = Future()
    loader.submit(boom, failed.set)
    with pytest.raises(RuntimeError, match="load failed"):
        failed.result()
    blocker = threading.Event()
    loader.submit(lambda: blocker.wait(0.2), lambda r, e: None)
    loader.submit(lambda: seen.append("dropped"), lambda r, e: None)
    loader.close()  # waits for the running job, drops the queued one
    loader.close()
    assert seen == ["third"]  # the queued job after close() never ran


class Ticking(Tuner):
    name = "ticking"

    def __init__(self, ctx: TunerContext, tuner_id: int) -> None:
        super().__init__(ctx, tuner_id)
        self.ticks: list[float] = []

    def tick(self, now: float) -> float | None:
        self.ticks.append(now)
        return now + 0.05 if len(self.ticks) < 3 else math.inf


def test_ticks_run_when_due_and_stop_when_a_tuner_needs_none(tmp_path: Path) -> None:
    d = Daemon(DaemonConfig(state_dir=tmp_path, cache_dir=None))
    try:
        tuner = Ticking(TunerContext(d.store, d.namespaces, d.steps, request_tick=d._request_tick), 0)
        d.tuners.append(tuner)
        d._request_tick(tuner, time.monotonic())
        d.loop.call_later(0.6, d.loop.stop)
        d.loop.run()
        assert len(tuner.ticks) == 3  # then math.inf: no more
        assert d.loop.wakeups <= 6  # three ticks and the stop, not a poll
        # A tick asked for later comes; an earlier request replaces a later one.
        tuner.tick_at(time.monotonic() + 10)
        tuner.tick_at(time.monotonic() + 0.05)
        d.loop._stopping = False
        d.loop.call_later(0.3, d.loop.stop)
        d.loop.run()
        assert len(tuner.ticks) == 4
    finally:
        d.close()
