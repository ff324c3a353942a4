"""DirWatcher on real directories: which changes count as a file added or removed."""

from __future__ import annotations

import os
import random
import select
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pybpftune.errors import PybpftuneError
from pybpftune.inotify import ADDED, GONE, REMOVED, DirEvent, DirWatcher


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, DirWatcher]]:
    d = tmp_path / "watched"
    d.mkdir()
    with DirWatcher([d]) as w:
        yield d, w


def events(w: DirWatcher) -> list[tuple[str, str]]:
    return [(e.kind, e.path.name) for e in w.read_events()]


def test_a_file_counts_once_it_is_written_and_closed(watched: tuple[Path, DirWatcher]) -> None:
    d, w = watched
    assert w.read_events() == []
    f = open(d / "a_tuner.py", "w")  # noqa: SIM115 - the test needs it open across the check
    f.write("x = 1\n")
    f.flush()
    assert events(w) == [], "created and still being written: not yet"
    f.close()
    assert events(w) == [(ADDED, "a_tuner.py")]
    (d / "a_tuner.py").unlink()
    assert events(w) == [(REMOVED, "a_tuner.py")]


def test_the_fd_becomes_readable(watched: tuple[Path, DirWatcher]) -> None:
    d, w = watched
    assert select.select([w], [], [], 0)[0] == []
    (d / "b_tuner.py").write_text("")
    assert select.select([w], [], [], 1)[0] == [w]
    assert w.read_events() == [DirEvent(ADDED, d / "b_tuner.py")]


def test_moves_links_and_directories(watched: tuple[Path, DirWatcher], tmp_path: Path) -> None:
    d, w = watched
    outside = tmp_path / "outside_tuner.py"
    outside.write_text("")
    events(w)
    os.rename(outside, d / "m_tuner.py")
    assert events(w) == [(ADDED, "m_tuner.py")]
    os.rename(d / "m_tuner.py", outside)
    assert events(w) == [(REMOVED, "m_tuner.py")]
    (d / "s_tuner.py").symlink_to(outside)
    assert events(w) == [(ADDED, "s_tuner.py")], "a symlink is whole when created"
    os.link(outside, d / "h_tuner.py")
    assert events(w) == [(ADDED, "h_tuner.py")], "so is a hard link"
    (d / "sub").mkdir()
    assert events(w) == [(ADDED, "sub")]


def test_a_deleted_directory_is_gone(tmp_path: Path) -> None:
    d = tmp_path / "gone"
    d.mkdir()
    with DirWatcher([d]) as w:
        d.rmdir()
        assert w.read_events() == [DirEvent(GONE, d)]
        assert w.directories == []
        (tmp_path / "x").write_text("")
        assert w.read_events() == []


def test_a_moved_directory_is_gone(tmp_path: Path) -> None:
    d = tmp_path / "moving"
    d.mkdir()
    with DirWatcher([d]) as w:
        d.rename(tmp_path / "moved")
        assert w.read_events() == [DirEvent(GONE, d)]
        (tmp_path / "moved" / "late_tuner.py").write_text("")
        assert w.read_events() == []


def test_errors_and_close(tmp_path: Path) -> None:
    with pytest.raises(PybpftuneError, match=r"cannot watch .*missing: No such file or directory"):
        DirWatcher([tmp_path / "missing"])
    (tmp_path / "file").write_text("")
    with pytest.raises(PybpftuneError, match="Not a directory"):
        DirWatcher([tmp_path / "file"])
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(PybpftuneError, match="Not a directory"):
        DirWatcher([tmp_path / "link"])  # a symlinked directory is not followed
    w = DirWatcher([tmp_path])
    w.close()
    w.close()
    with pytest.raises(PybpftuneError, match="closed"):
        w.read_events()


def test_records_are_parsed_defensively(watched: tuple[Path, DirWatcher]) -> None:
    """Truncated or nonsense records (unknown watches, odd lengths, names with
    slashes or without a terminator) never raise and never name a path
    outside the watched directory."""
    d, w = watched
    rng = random.Random(14)
    wd = next(iter(w._dirs))
    for _ in range(2000):
        chunks = []
        for _ in range(rng.randrange(1, 4)):
            name = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 24)))
            length = rng.choice([len(name), rng.randrange(0, 64)])
            mask = rng.choice([0x8, 0x80, 0x100, 0x200, 0x40, 0x4000, rng.getrandbits(32)]) & ~(0x8000 | 0x800)
            chunks.append(struct.pack("iIII", rng.choice([wd, wd + 1, -1]), mask, 0, length) + name)
        data = b"".join(chunks)[: rng.randrange(0, 200)]
        for event in w._parse(data):
            assert event.path == d or event.path.parent == d
    assert w.directories == [d]
