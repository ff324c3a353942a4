"""hostmem: the host's memory as the caps need it; hostile files never hurt."""

from __future__ import annotations

import random

import pytest

from pybpftune import hostmem
from pybpftune.hostmem import HostMemory, parse_mem_total, parse_zone_pages, read_host_memory

MEMINFO = "MemTotal:        8000000 kB\nMemFree:         7000000 kB\n"
ZONEINFO = """Node 0, zone      DMA
  pages free     3840
        high     45
        managed  3840
Node 0, zone    DMA32
  pages free     400000
        high     1000
        managed  500000
Node 0, zone   Normal
  pages free     1500000
        min      10000
        high     20000
        managed  1800000
  pagesets
    cpu: 0
              count: 10
              high:  378
Node 0, zone  Movable
        high     0
        managed  0
"""


def test_mem_total_and_zone_estimate() -> None:
    mem = read_host_memory(MEMINFO, ZONEINFO)
    assert mem.total_bytes == 8000000 * 1024
    assert mem.zone_pages == 1800000 - 20000
    assert mem.buffer_pages == 1780000 and not mem.buffer_estimated


def test_normal_zones_of_every_node_add_up() -> None:
    second_node = "Node 1, zone   Normal\n  pages free     5000000\n        high     20000\n        managed  1000000\n"
    assert parse_zone_pages(ZONEINFO + second_node) == (1800000 - 20000) + (1000000 - 20000)


def test_dma32_when_normal_gives_nothing() -> None:
    no_normal = ZONEINFO.split("Node 0, zone   Normal")[0]
    assert parse_zone_pages(no_normal) == 500000 - 1000


@pytest.mark.parametrize(
    "zoneinfo",
    [
        "",  # hidden by a container runtime
        "Node 0, zone  Movable\n        high 0\n        managed 0\n",  # no Normal, no DMA32
        ZONEINFO.replace("managed  1800000", "managed  10").replace("managed  500000", "managed  0"),  # all high
    ],
)
def test_an_unusable_zone_estimate_falls_back_to_memtotal(zoneinfo: str) -> None:
    mem = read_host_memory(MEMINFO, zoneinfo)
    assert mem.zone_pages == 0
    assert mem.buffer_estimated
    assert mem.buffer_pages == 8000000 * 1024 // mem.page_size


def test_a_zone_estimate_above_the_total_is_not_believed() -> None:
    mem = HostMemory(total_bytes=1 << 30, zone_pages=10**9, page_size=4096)
    assert mem.buffer_pages == (1 << 30) // 4096 and mem.buffer_estimated


def test_without_meminfo_the_total_comes_from_sysconf_or_an_assumed_size() -> None:
    mem = read_host_memory("", "")
    assert 0 < mem.total_bytes <= hostmem.MAX_BYTES
    assert mem.buffer_pages > 0


@pytest.mark.parametrize(
    "meminfo",
    [
        "MemTotal: -5 kB\n",
        "MemTotal: ١٢٣ kB\n",  # unicode digits
        "MemTotal: 0x100 kB\n",
        "MemTotal: 99999999999999999999999999 kB\n",
        "MemTotal: 100 MB\n",
        "MemTotal:\n",
        "\x00\xff garbage",
    ],
)
def test_hostile_meminfo_is_unknown(meminfo: str) -> None:
    assert parse_mem_total(meminfo) == 0


def test_random_bytes_never_raise() -> None:
    rng = random.Random(9)
    for _ in range(300):
        text = bytes(rng.randrange(256) for _ in range(rng.randrange(200))).decode("latin-1")
        text += rng.choice(["", "\nNode 0, zone Normal\n managed 5\n high x\n", "\nMemTotal: 12 kB\n"])
        mem = read_host_memory(text, text)
        assert mem.total_pages > 0 and mem.buffer_pages > 0


def test_huge_zone_counts_are_not_believed() -> None:
    assert parse_zone_pages("Node 0, zone Normal\n managed 99999999999999999999\n high 0\n") == 0


def test_read_once_per_process_and_overridable() -> None:
    # The unit tests' fixture overrides it already (tests/unit/conftest.py).
    first = hostmem.host_memory()
    assert hostmem.host_memory() is first
    other = HostMemory(1 << 30)
    with hostmem.override(other):
        assert hostmem.host_memory() is other
    assert hostmem.host_memory() is first
