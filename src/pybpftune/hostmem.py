"""How much memory the host has, as the memory caps of the tuners need it.

Two numbers, read once per process (they change only with memory hotplug):

* ``MemTotal`` from /proc/meminfo (falling back to sysconf's physical pages);
* the kernel's buffer-usable pages, ``nr_free_buffer_pages()``, which sizes
  tcp_mem and udp_mem at boot: the sum over the Normal zones of
  /proc/zoneinfo of (managed - high), or over the DMA32 zones when that is 0.

The zone estimate is unusable on some machines (no Normal or DMA32 zone, a
/proc/zoneinfo hidden or faked by a container runtime): then the buffer pages
are estimated from MemTotal, never left at 0, so no cap derived from them is
ever "unlimited".  Nothing here trusts the files: a missing, truncated,
oversized or garbled file gives the fallback, never an exception.

Tests override the numbers with :func:`override` (or give a tuner its own
:class:`HostMemory`, see ``Tuner.memory``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

MEMINFO = "/proc/meminfo"
ZONEINFO = "/proc/zoneinfo"
# /proc/zoneinfo is a few KiB per zone; a machine with hundreds of nodes
# stays far below this.  More is not a zoneinfo: read no further.
READ_LIMIT = 8 << 20
# When nothing at all can be learnt, caps are those of a machine this size:
# a cap that stops growth early is safe, one that never stops it is not.
ASSUMED_BYTES = 1 << 30
# No value beyond this is believable (2**52 bytes: 4 PiB).
MAX_BYTES = 1 << 52


def _page_size() -> int:
    try:
        size = os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 4096
    return size if 0 < size <= 1 << 24 else 4096


PAGE_SIZE = _page_size()


@dataclass(frozen=True)
class HostMemory:
    """The host's memory: total bytes, the zone estimate of buffer-usable
    pages (0: unusable), the page size and the number of cpus."""

    total_bytes: int
    zone_pages: int = 0
    page_size: int = PAGE_SIZE
    cpus: int = 1

    @property
    def total_pages(self) -> int:
        return max(1, self.total_bytes // self.page_size)

    @property
    def buffer_pages(self) -> int:
        """Pages the kernel considers usable for buffers (its
        nr_free_buffer_pages): the zone estimate when it is usable and
        believable (not above the total), else the total pages."""
        if 0 < self.zone_pages <= self.total_pages:
            return self.zone_pages
        return self.total_pages

    @property
    def buffer_estimated(self) -> bool:
        """True when the zone estimate was unusable and MemTotal stands in."""
        return not 0 < self.zone_pages <= self.total_pages

    def describe(self) -> str:
        source = "estimated from MemTotal" if self.buffer_estimated else "from /proc/zoneinfo"
        return (
            f"{self.total_bytes >> 20} MiB of memory, {self.buffer_pages} buffer-usable pages ({source}), "
            f"{self.cpus} cpu(s)"
        )


def _number(word: str) -> int | None:
    """A decimal count as /proc prints it; None for anything else (signs,
    hex, unicode digits, absurd lengths)."""
    if not word or len(word) > 20 or not word.isascii() or not word.isdigit():
        return None
    return int(word)


def parse_mem_total(meminfo: str) -> int:
    """MemTotal of /proc/meminfo in bytes; 0 when absent or unbelievable."""
    for line in meminfo.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "MemTotal:":
            kib = _number(words[1])
            if kib is None or (len(words) > 2 and words[2] != "kB"):
                return 0
            total = kib * 1024
            return total if 0 < total <= MAX_BYTES else 0
    return 0


def parse_zone_pages(zoneinfo: str) -> int:
    """The kernel's nr_free_buffer_pages from /proc/zoneinfo: the sum of
    (managed - high) over the Normal zones, or over the DMA32 zones when that
    is 0; 0 when neither zone is there (or the file makes no sense)."""
    totals: dict[str, int] = {}
    zone: str | None = None
    fields: dict[str, int] = {}

    def close() -> None:
        if zone is not None:
            totals[zone] = totals.get(zone, 0) + max(0, fields.get("managed", 0) - fields.get("high", 0))

    for line in zoneinfo.splitlines():
        words = line.split()
        if len(words) == 4 and words[0] == "Node" and words[2] == "zone":
            close()
            zone, fields = words[3], {}
        elif zone is not None and len(words) == 2 and words[0] in ("managed", "high"):
            value = _number(words[1])
            if value is not None:
                fields.setdefault(words[0], value)  # the zone's own, not a later per-cpu "high"
    close()
    pages = totals.get("Normal", 0) or totals.get("DMA32", 0)
    return pages if pages * PAGE_SIZE <= MAX_BYTES else 0


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read(READ_LIMIT + 1)
    except OSError:
        return None
    if len(data) > READ_LIMIT:
        return None
    return data.decode("ascii", errors="replace")


def _sysconf_total() -> int:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0
    total = pages * size
    return total if 0 < total <= MAX_BYTES else 0


def read_host_memory(meminfo: str | None = None, zoneinfo: str | None = None) -> HostMemory:
    """The host's memory now, from the given texts or the /proc files."""
    meminfo = _read(MEMINFO) if meminfo is None else meminfo
    zoneinfo = _read(ZONEINFO) if zoneinfo is None else zoneinfo
    total = parse_mem_total(meminfo) if meminfo is not None else 0
    total = total or _sysconf_total() or ASSUMED_BYTES
    zone = parse_zone_pages(zoneinfo) if zoneinfo is not None else 0
    return HostMemory(total, zone, PAGE_SIZE, max(1, os.cpu_count() or 1))


_cached: HostMemory | None = None


def host_memory() -> HostMemory:
    """The host's memory, read at the first call of the process."""
    global _cached
    if _cached is None:
        _cached = read_host_memory()
    return _cached


@contextmanager
def override(memory: HostMemory) -> Iterator[HostMemory]:
    """Make :func:`host_memory` return ``memory`` for a while (tests)."""
    global _cached
    before, _cached = _cached, memory
    try:
        yield memory
    finally:
        _cached = before
