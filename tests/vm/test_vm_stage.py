"""The VM stage fails, not skips, when a kernel test's BPF program is broken.

Runs the stage's own command (pytest -m "kernel and guest" with the gate at
1) in the 6.1 guest over a working loader test and a test whose fentry
program the verifier rejects; the stage must exit non-zero and say why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parents[2]


def test_broken_fentry_program_fails_the_61_stage() -> None:
    python = ROOT / ".venv" / "bin" / "python"
    cmd = [
        sys.executable if not python.exists() else "python3",
        str(ROOT / "tests" / "vm" / "vmtest.py"),
        "--kernel",
        "6.1",
        "--",
        str(python),
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-m",
        "kernel and guest",
        "tests/kernel/test_loader.py::test_two_objects_feed_one_ring_buffer",
        "tests/vm/stage_probe/check_broken_fentry.py",
    ]
    env = {**os.environ, "PYBPFTUNE_KERNEL_TESTS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # pytest's "tests failed", not a VM failure (125) or timeout (124)
    assert "2 passed" in out and "1 failed" in out, out
    assert "check_broken_fentry.py::test_broken_fentry_object_loads" in out
    assert "connect" in out and "fentry" in out  # the error names the signal and its form
