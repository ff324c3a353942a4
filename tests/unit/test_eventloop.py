"""The event loop: readers, timers, signals, errors, and no wake-ups while idle."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from pybpftune.eventloop import EventLoop


def test_reader_runs_when_fd_is_readable() -> None:
    r, w = os.pipe()
    got: list[bytes] = []
    with EventLoop() as loop:
        loop.add_reader(r, lambda: got.append(os.read(r, 10)))
        loop.run_once(0)
        assert got == []
        os.write(w, b"x")
        loop.run_once(1)
        assert got == [b"x"]
        loop.remove_reader(r)
        loop.remove_reader(r)  # twice is fine
    os.close(r)
    os.close(w)


def test_timers_run_in_order_and_cancel() -> None:
    now = [0.0]
    calls: list[str] = []
    with EventLoop(clock=lambda: now[0]) as loop:
        loop.call_at(2.0, lambda: calls.append("b"))
        loop.call_at(1.0, lambda: calls.append("a"))
        loop.call_at(1.5, lambda: calls.append("never")).cancel()
        every = loop.call_every(1.0, lambda: calls.append("tick"))
        now[0] = 2.5
        loop.run_once(0)
        assert calls == ["a", "tick", "b"]
        every.cancel()
        now[0] = 10.0
        loop.run_once(0)
        assert calls == ["a", "tick", "b"]


def test_idle_loop_sleeps_until_the_timer_is_due() -> None:
    with EventLoop() as loop:
        loop.call_later(0.2, loop.stop)
        t0 = time.monotonic()
        loop.run()
        took = time.monotonic() - t0
    assert 0.15 < took < 2
    # One wake-up for the timer, not one per fixed-rate poll.
    assert loop.wakeups <= 2


def test_a_signal_stops_a_blocked_loop_at_once() -> None:
    seen: list[int] = []
    with EventLoop() as loop:
        loop.stop_on([signal.SIGUSR1], seen.append)
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        t0 = time.monotonic()
        loop.run()  # no timer, no reader: only the signal can end this
        assert time.monotonic() - t0 < 5
    assert seen == [signal.SIGUSR1]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_a_failing_callback_is_reported_and_the_loop_goes_on() -> None:
    errors: list[tuple[str, BaseException]] = []
    calls: list[int] = []

    def boom() -> None:
        raise RuntimeError("boom")

    with EventLoop(on_error=lambda name, exc: errors.append((name, exc))) as loop:
        loop.call_later(0, boom, "bad timer")
        loop.call_later(0, lambda: calls.append(1))
        loop.run_once(0)
    assert [n for n, _ in errors] == ["bad timer"]
    assert calls == [1]


def test_without_an_error_handler_the_exception_propagates() -> None:
    def boom() -> None:
        raise RuntimeError("boom")

    with EventLoop() as loop:
        loop.call_later(0, boom)
        with pytest.raises(RuntimeError):
            loop.run_once(0)


def test_another_thread_hands_work_to_a_blocked_loop() -> None:
    ran: list[str] = []
    with EventLoop() as loop:

        def from_thread() -> None:
            loop.call_soon_threadsafe(lambda: ran.append(threading.current_thread().name), "handed over")
            loop.call_soon_threadsafe(loop.stop)

        threading.Timer(0.1, from_thread).start()
        t0 = time.monotonic()
        loop.run()  # nothing else would wake it
        assert time.monotonic() - t0 < 5
    assert ran == [threading.main_thread().name]
    loop.call_soon_threadsafe(lambda: None)  # after close: dropped, no write to a stale fd


def test_on_signal_runs_on_the_loop_and_the_loop_goes_on() -> None:
    """SIGHUP (reload): the callback runs from the loop, which keeps running
    (until its timer stops it); close() puts the old disposition back."""
    seen: list[int] = []
    before = signal.getsignal(signal.SIGHUP)  # SIG_IGN under nohup
    with EventLoop() as loop:
        loop.on_signal(signal.SIGHUP, seen.append)
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGHUP)).start()
        loop.call_later(0.5, loop.stop)
        t0 = time.monotonic()
        loop.run()
        assert time.monotonic() - t0 >= 0.45
    assert seen == [signal.SIGHUP]
    assert signal.getsignal(signal.SIGHUP) == before


def test_a_writer_runs_while_its_fd_takes_data() -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    sent: list[int] = []

    def write() -> None:
        try:
            sent.append(os.write(w, b"x" * 65536))
        except BlockingIOError:
            loop.remove_writer(w)

    with EventLoop() as loop:
        loop.add_writer(w, write, "pipe")
        for _ in range(20):
            loop.run_once(0)
        assert sum(sent) >= 4096  # the pipe filled, then the writer took itself off
    os.close(r)
    os.close(w)
