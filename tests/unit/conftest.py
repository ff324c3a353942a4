"""Unit tests see one fixed host: 8 GiB, 4 KiB pages, 4 cpus, zones giving
2,000,000 buffer-usable pages.  The memory caps (hostmem, Tunable.ceiling)
then do not depend on the machine the tests run on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pybpftune import hostmem
from pybpftune.hostmem import HostMemory
from pybpftune.testing import TunerHarness

UNIT_HOST = HostMemory(total_bytes=8 << 30, zone_pages=2_000_000, page_size=4096, cpus=4)


@pytest.fixture(autouse=True)
def _fixed_host_memory() -> Iterator[HostMemory]:
    with hostmem.override(UNIT_HOST) as memory:
        yield memory


@pytest.fixture
def harness() -> type[TunerHarness[Any]]:
    """``harness.build(TunerClass, sysctls={...})``: any tuner over in-memory
    sysctls, a synthetic clock and synthetic namespace counters."""
    return TunerHarness
