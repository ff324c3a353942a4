"""Tests of the VM runner itself: they really boot Debian's 6.1 kernel under qemu.

Gated by PYBPFTUNE_VM_TESTS: unset runs them when qemu is installed and the kernel is
cached or Debian's mirror is reachable (else skips with the reason); ``1`` makes such a
skip a failure; ``0`` skips them.  Each test boots at most once (the round-trip checks
share one boot), so a warm cache keeps the whole file well under a minute.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.vm import vmtest

pytestmark = pytest.mark.vm

RUNNER = Path(vmtest.__file__).resolve()
KERNEL = "6.1"


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def _runner(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> Result:
    r = subprocess.run(
        [sys.executable, str(RUNNER), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    return Result(r.returncode, r.stdout, r.stderr)


def _unavailable(reason: str) -> None:
    if os.environ.get("PYBPFTUNE_VM_TESTS") == "1":
        pytest.fail(f"PYBPFTUNE_VM_TESTS=1 but the VM tests cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The 6.1 kernel's release, after making sure it is downloaded and cached."""
    if os.environ.get("PYBPFTUNE_VM_TESTS") == "0":
        pytest.skip("PYBPFTUNE_VM_TESTS=0")
    reason = vmtest.unavailable_reason(KERNEL)
    if reason:
        _unavailable(reason)
    r = _runner("--kernel", KERNEL, "--prepare", cwd=tmp_path_factory.mktemp("prepare"), timeout=900)
    if r.returncode != 0:
        _unavailable(f"cannot prepare kernel {KERNEL}: {r.stderr.strip()}")
    package, version, rel = r.stdout.split()
    assert package.startswith("linux-image-6.1.") and version.startswith("6.1.")
    return rel


@pytest.fixture(scope="module")
def roundtrip(release: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    """One boot that exercises output, exit code, environment and the writable directory."""
    work = tmp_path_factory.mktemp("checkout")
    script = (
        'echo "out:$PYBPFTUNE_VMTEST_PROBE:$(pwd)"; '
        "echo err-line >&2; "
        "uname -r > uname.txt; "
        "echo written-in-guest > from-guest.txt; "
        "exit 7"
    )
    env = {**os.environ, "PYBPFTUNE_VMTEST_PROBE": "probe 'quoted' $value"}
    return _runner("--kernel", KERNEL, "--timeout", "120", "--", "sh", "-c", script, cwd=work, env=env), work


def test_output_and_exit_code_come_back(roundtrip: tuple[Result, Path]) -> None:
    result, work = roundtrip
    assert result.returncode == 7, result.stderr
    assert result.stdout == f"out:probe 'quoted' $value:{work.resolve()}\n"
    assert result.stderr == "err-line\n"


def test_current_directory_is_writable_from_guest(roundtrip: tuple[Result, Path]) -> None:
    _, work = roundtrip
    assert (work / "from-guest.txt").read_text() == "written-in-guest\n"


def test_guest_runs_the_requested_kernel(roundtrip: tuple[Result, Path], release: str) -> None:
    _, work = roundtrip
    assert (work / "uname.txt").read_text().strip() == release
    assert release.startswith("6.1.")


def test_timeout_is_124_with_one_line(release: str, tmp_path: Path) -> None:
    r = _runner("--kernel", KERNEL, "--timeout", "5", "--", "sh", "-c", "echo started; sleep 600", cwd=tmp_path)
    assert r.returncode == vmtest.EXIT_TIMEOUT, r.stderr
    assert r.stdout == "started\n"
    assert r.stderr.splitlines() == ["vmtest: timeout: sh -c 'echo started; sleep 600' did not finish within 5s"]


def test_unknown_package_is_a_clear_error(release: str, tmp_path: Path) -> None:
    package = "linux-image-6.1.0-999-amd64"
    r = _runner("--kernel", package, "--", "true", cwd=tmp_path)
    assert r.returncode == vmtest.EXIT_KERNEL, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmtest: ") and package in lines[0], r.stderr
