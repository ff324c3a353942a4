"""isolate.run: a job in a forked child, its value and fds back, its errors typed."""

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
