"""Test gates shared by the whole suite.

Kernel tests (marker ``kernel``) load BPF into the running kernel and need
root.  PYBPFTUNE_KERNEL_TESTS decides what happens when they cannot run:

* unset: run them if possible, else skip with the reason;
* ``1``: they must run: any skip of a kernel test is reported as a failure;
* ``0``: skip them.

VM tests (marker ``vm``) have the same three states in PYBPFTUNE_VM_TESTS,
and tests of the systemd service (marker ``systemd``: they need systemd as
PID 1, which the vm-systemd stage boots in the 6.1 guest) in
PYBPFTUNE_SYSTEMD_TESTS.

Kernel tests marked ``vm_only`` change state that belongs to the whole
machine (TCP's memory pool) in a way no shared host should see: they run
only inside the throwaway VMs (PYBPFTUNE_VM=1, set by tests/vm/vmtest.py)
and are skipped elsewhere, with the reason, even when kernel tests must run.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_BPF = ROOT / "tests" / "bpf"

GATES = {"kernel": "PYBPFTUNE_KERNEL_TESTS", "vm": "PYBPFTUNE_VM_TESTS", "systemd": "PYBPFTUNE_SYSTEMD_TESTS"}
IN_VM = os.environ.get("PYBPFTUNE_VM") == "1"
VM_ONLY = "vm_only: changes machine-wide state (e.g. TCP memory); runs only inside the throwaway VMs"


def _host_skips_vm_only(item: pytest.Item) -> bool:
    return not IN_VM and item.get_closest_marker("vm_only") is not None


def kernel_test_obstacle() -> str | None:
    """Why kernel tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "kernel tests need root"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "the kernel has no BTF (/sys/kernel/btf/vmlinux)"
    if not (TEST_BPF / "ringbuf_test.bpf.o").exists():
        return "BPF test objects are not built (run `make`)"
    return None


def systemd_test_obstacle() -> str | None:
    """Why the systemd service tests cannot run here, or None."""
    try:
        pid1 = Path("/proc/1/comm").read_text().strip()
    except OSError:
        pid1 = "?"
    if pid1 != "systemd" or not Path("/run/systemd/system").is_dir():
        return f"systemd is not PID 1 here ({pid1}); the vm-systemd stage boots it in the 6.1 guest"
    return kernel_test_obstacle()


@pytest.fixture(scope="session", autouse=True)
def _memlock() -> None:
    """Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (64 KiB on a stock
    Debian 5.10): lift it once, as the daemon does, for tests that load
    objects directly."""
    if os.geteuid() == 0:
        from pybpftune.support import raise_memlock

        raise_memlock()


def _gate(item: pytest.Item) -> tuple[str, str] | None:
    for marker, env in GATES.items():
        if item.get_closest_marker(marker) is not None:
            return marker, env
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    gate = _gate(item)
    if gate is None:
        return
    marker, env = gate
    if os.environ.get(env) == "0":
        pytest.skip(f"{env}=0")
    if marker in ("kernel", "systemd"):
        obstacle = kernel_test_obstacle() if marker == "kernel" else systemd_test_obstacle()
        if obstacle:
            pytest.skip(obstacle)
        if _host_skips_vm_only(item):
            pytest.skip(VM_ONLY)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    gate = _gate(item)
    if gate is None or not report.skipped or os.environ.get(gate[1]) != "1" or hasattr(report, "wasxfail"):
        return report
    if _host_skips_vm_only(item):
        return report  # skipped by design outside the VMs
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"{gate[1]}=1 but this test was skipped: {reason}"
    return report


@pytest.fixture
def test_object() -> Path:
    return TEST_BPF / "ringbuf_test.bpf.o"


def _variants() -> list[str]:
    return [v for v in os.environ.get("PYBPFTUNE_VARIANTS", "full,legacy").split(",") if v]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``variant``: PYBPFTUNE_VARIANTS (default both), except
    that tests marked ``all_variants`` always run with full and legacy."""
    explicit = any(
        "variant" in (m.args[0] if isinstance(m.args[0], (list, tuple)) else str(m.args[0]).replace(" ", "").split(","))
        for m in metafunc.definition.iter_markers("parametrize")
    )
    if "variant" in metafunc.fixturenames and not explicit:
        both = metafunc.definition.get_closest_marker("all_variants") is not None
        metafunc.parametrize("variant", ["full", "legacy"] if both else _variants())


@pytest.fixture
def variant_args(variant: str) -> tuple[str, ...]:
    """bpftune flags selecting the variant: -L for legacy."""
    return ("-L",) if variant == "legacy" else ()
