"""Not collected by default: tests/vm/test_vm_stage.py runs it inside the 6.1
guest to show that a broken fentry program fails the VM stage.

It is a kernel test like any other: it requires the object's one signal to
load, and the program in tests/bpf/broken_fentry.bpf.c does not verify."""

from __future__ import annotations

from pathlib import Path

import pytest

from pybpftune.loader import load_object
from pybpftune.support import probe_support

pytestmark = [pytest.mark.kernel, pytest.mark.guest]

BROKEN = Path(__file__).resolve().parents[2] / "bpf" / "broken_fentry.bpf.o"


def test_broken_fentry_object_loads() -> None:
    with load_object(BROKEN, "broken", probe_support()) as loaded:
        assert loaded.choices["connect"].chosen == "fentry"
