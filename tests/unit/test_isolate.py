"""isolate.run and isolate.Stream: jobs in a forked child, their values and fds back, errors typed."""

from __future__ import annotations

import os
import signal

import pytest

from pybpftune import isolate
from pybpftune.errors import AttachError, BpfError, BpfLoadError, BpfObjectError, NotSupported, PybpftuneError


def test_value_and_fds_come_back() -> None:
    def job() -> tuple[object, list[int]]:
        r, w = os.pipe()
        os.write(w, b"from the child")
        return ({"pid": os.getpid(), "names": [("map", "a")]}, 7), [r, w]

    before = set(os.listdir("/proc/self/fd"))
    value, fds = isolate.run(job, "test")
    try:
        info, seven = value
        assert seven == 7 and info["names"] == [("map", "a")]
        assert info["pid"] != os.getpid()
        assert os.read(fds[0], 100) == b"from the child"
    finally:
        for fd in fds:
            os.close(fd)
    assert set(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize(
    "exc",
    [
        BpfLoadError("obj", 13, ["line 1", "R1 invalid mem access"], "bpftune_x__fentry"),
        AttachError("attaching obj:prog", 95),
        BpfError("map update", 7),
        NotSupported("obj signal s", "no form left"),
        BpfObjectError("obj is not an ELF file"),
        PybpftuneError("plain"),
    ],
)
def test_errors_come_back_typed(exc: PybpftuneError) -> None:
    def job() -> tuple[object, list[int]]:
        raise exc

    with pytest.raises(type(exc)) as info:
        isolate.run(job, "test")
    got = info.value
    assert type(got) is type(exc) and str(got) == str(exc)
    if isinstance(exc, BpfLoadError):
        assert isinstance(got, BpfLoadError)
        assert got.log_tail == exc.log_tail and got.program == exc.program and got.errno == 13


def test_a_bug_in_the_child_keeps_its_traceback() -> None:
    def job() -> tuple[object, list[int]]:
        raise ValueError("a bug")

    with pytest.raises(isolate.IsolatedError, match="ValueError: a bug"):
        isolate.run(job, "test")


def test_a_child_that_dies_is_reported() -> None:
    def job() -> tuple[object, list[int]]:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    with pytest.raises(isolate.IsolatedError, match=r"test: the loading process ended without an answer.*SIGKILL"):
        isolate.run(job, "test")


def _pipe_job(text: bytes) -> isolate.Job:
    def job() -> tuple[object, list[int]]:
        r, w = os.pipe()
        os.write(w, text)
        os.close(w)
        return text.decode(), [r]

    return job


def test_a_stream_answers_each_job_in_order_and_a_failure_is_its_own() -> None:
    def fails() -> tuple[object, list[int]]:
        raise NotSupported("second", "no form left")

    before = set(os.listdir("/proc/self/fd"))
    with isolate.Stream([(_pipe_job(b"one"), "first"), (fails, "second"), (_pipe_job(b"three"), "third")]) as stream:
        assert len(stream) == 3
        value, fds = stream.next()
        assert value == "one" and os.read(fds[0], 10) == b"one"
        os.close(fds[0])
        with pytest.raises(NotSupported, match="no form left"):
            stream.next()
        value, fds = stream.next()
        assert value == "three" and os.read(fds[0], 10) == b"three"
        os.close(fds[0])
        assert len(stream) == 0
        with pytest.raises(isolate.IsolatedError, match="no job left"):
            stream.next()
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_stream_closed_early_ends_its_child_and_leaks_nothing() -> None:
    def slow() -> tuple[object, list[int]]:
        import time

        time.sleep(30)
        return None, []

    before = set(os.listdir("/proc/self/fd"))
    stream = isolate.Stream([(_pipe_job(b"one"), "first"), (_pipe_job(b"two"), "second"), (slow, "slow")])
    _, fds = stream.next()
    os.close(fds[0])
    stream.close()  # "second" was sent and never taken; "slow" is killed
    stream.close()
    with pytest.raises(isolate.IsolatedError, match="second: the loading process was ended"):
        stream.next()
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_stream_child_that_dies_fails_the_rest() -> None:
    def dies() -> tuple[object, list[int]]:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    with isolate.Stream([(_pipe_job(b"one"), "first"), (dies, "second"), (_pipe_job(b"x"), "third")]) as stream:
        _, fds = stream.next()
        os.close(fds[0])
        with pytest.raises(
            isolate.IsolatedError, match=r"second: the loading process ended without an answer.*SIGKILL"
        ):
            stream.next()
        with pytest.raises(isolate.IsolatedError, match="third: the loading process was ended"):
            stream.next()
