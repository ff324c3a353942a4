"""The cgroup v2 root: an existing cgroup2 mount is found through symbolic
links (bpftune's default -c /var/run/bpftune/cgroupv2 goes through the
/var/run -> /run link) and reused, never mounted over."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pybpftune import cgroup
from pybpftune.cgroup import CgroupRoot, _is_cgroup2_mount
from pybpftune.procfs import _unescape
from pybpftune.state import StateDir
from pybpftune.support import find_cgroup2


def test_mount_fields_are_unescaped() -> None:
    assert _unescape("/run/a\\040b\\011c\\134d") == "/run/a b\tc\\d"


def test_a_mount_reached_through_a_symlink_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found = find_cgroup2()
    if found is None:
        pytest.skip("no cgroup2 mount here")
    mount = Path(found)
    link = tmp_path / "var-run"
    link.symlink_to(mount.parent)  # like /var/run -> /run
    through_link = link / mount.name
    assert _is_cgroup2_mount(through_link)

    def no_mount(*args: object) -> int:
        raise AssertionError(f"mounted over an existing cgroup2 mount: {args}")

    monkeypatch.setattr(cgroup, "_libc", type("NoMount", (), {"mount": no_mount, "umount2": no_mount})())
    root = CgroupRoot(StateDir(tmp_path / "state"), through_link)
    try:
        fd = root.open()
        assert os.path.samestat(os.fstat(fd), os.stat(mount))
        assert root.path == mount
    finally:
        root.close()  # not ours: nothing is unmounted
    assert mount.is_dir()
