"""neigh_table tuner: keep the neighbour tables' GC thresholds ahead of their use.

The kernel has one ARP table (arp_cache) and one IPv6 neighbour table
(ndisc_cache), each shared by every device of every network namespace; their
gc_thresh1/2/3 are table-wide and can only be changed from the initial
namespace.  When a table's entries approach gc_thresh3 (or the kernel refused
an entry because the table was full) the thresholds grow in learning-rate
steps over rtnetlink (RTM_SETNEIGHTBL), never past a bound computed from the
addresses of the device whose entry triggered it: per address
max(2**host_bits, 256) * 4 (INT_MAX at 64 host bits or more), and never past
what memory can back: a table full to gc_thresh3 within 1/128 of RAM (the
bound a /64 on the device would otherwise leave at INT_MAX).  When a table
grown past the kernel default (gc_thresh3 1024) has nearly emptied, they
shrink one step, never below the defaults 128/512/1024.

Unlike bpftune, the device's addresses are read in the device's own
namespace (the event names it by cookie, or by namespace inode on kernels
without cookies).  The request names only the table: bpftune also names the
device's parameters (NDTA_PARMS with only an ifindex), which changes nothing
and fails for a device in another namespace.

The thresholds are "custom" tunables: the store reads and writes them through
:class:`NeighThresholds`, so their originals are journaled before the first
write like any sysctl's, survive kill -9, are capped and restored by -R.  A
threshold changed by anyone else (sysctl or netlink) makes the tuner back off.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .. import libbpf
from ..bindings import NeighTableFlag, NeighTableScenario, NeighTableStats, NeighTableTunable
from ..errors import NotSupported
from ..events import Event
from ..hostmem import HostMemory
from ..netns import Namespaces, NetnsGone
from ..store import ACTIVE
from ..sysctl import SysctlMissing
from ..tuner import INT_MAX, NOTHING, Decision, Disable, Proposal, Scenario, Steps, Tunable, Tuner
from .common import SayOnce

if TYPE_CHECKING:
    from ..tuner import TunerContext

log = logging.getLogger("pybpftune.tuner.neigh_table")


DEFAULTS = (128, 512, 1024)  # the kernel's gc_thresh1/2/3
ADDRESS_FLOOR = 256  # bpftune counts at least a /24's worth of hosts per address
PER_HOST = 4  # ... and four entries per possible host
# The memory cap: a table full to gc_thresh3 (an entry with its hardware
# header cache is a few hundred bytes; 512 with slab overhead) within 1/128
# of RAM, and never below the kernel's default gc_thresh3.
NEIGH_ENTRY_BYTES = 512
NEIGH_MEM_SHARE = 128

Thresholds = tuple[int, int, int]


@dataclass(frozen=True)
class Family:
    family: int
    table: str
    tunable: int
    bits: int  # address length


FAMILIES: dict[int, Family] = {
    socket.AF_INET: Family(socket.AF_INET, "arp_cache", NeighTableTunable.ARP_THRESHOLDS, 32),
    socket.AF_INET6: Family(socket.AF_INET6, "ndisc_cache", NeighTableTunable.NDISC_THRESHOLDS, 128),
}


@dataclass(frozen=True)
class Table:
    """A neighbour table as the kernel reports it now."""

    name: str
    family: int
    thresholds: Thresholds
    entries: int


@dataclass(frozen=True)
class Device:
    """The device an event's entry belongs to, and where it lives."""

    ifindex: int
    name: str
    netns_cookie: int
    netns_inum: int

    def describe(self) -> str:
        return f"dev '{self.name}' (ifindex {self.ifindex})"


# --- the rules (pure) ---------------------------------------------------------------


def address_bound(prefixlens: Iterable[int], bits: int) -> int:
    """bpftune's upper bound for gc_thresh3 from a device's prefix lengths:
    the sum over addresses of max(2**host_bits, 256) * 4; INT_MAX once any
    address has 64 host bits or more.  A device without addresses of the
    family gets the floor of one address (1024)."""
    prefixlens = list(prefixlens)
    if not prefixlens:
        return ADDRESS_FLOOR * PER_HOST
    total = 0
    for plen in prefixlens:
        host_bits = bits - min(max(plen, 0), bits)
        if host_bits >= 64:
            return INT_MAX
        total += max(1 << host_bits, ADDRESS_FLOOR) * PER_HOST
        if total >= INT_MAX:
            return INT_MAX
    return total


def neigh_cap(memory: HostMemory) -> int:
    """The most any gc_thresh of a table may be."""
    return max(DEFAULTS[2], min(INT_MAX, memory.total_bytes // NEIGH_MEM_SHARE // NEIGH_ENTRY_BYTES))


def grow_thresholds(
    current: Thresholds, entries: int, bound: int, steps: Steps, refused: bool = False
) -> Thresholds | None:
    """New thresholds when ``entries`` nearly fill gc_thresh3 (or the kernel
    refused an entry): learning-rate steps until the table is no longer nearly
    full, gc_thresh3 capped at ``bound``, the order 1 <= 2 <= 3 kept.  None when
    nothing is to be done or gc_thresh3 already reached the bound."""
    t1, t2, t3 = current
    if t3 >= bound or t3 >= INT_MAX:
        return None
    if not refused and not steps.nearly_full(entries, t3):
        return None
    n1, n2, n3 = t1, t2, t3
    while True:
        n1 = min(steps.grow(n1), INT_MAX)
        n2 = min(steps.grow(n2), INT_MAX)
        n3 = min(max(steps.grow(n3), n3 + 1), bound, INT_MAX)
        if n3 >= bound or not steps.nearly_full(entries, n3):
            break
    n2 = min(n2, n3)
    n1 = min(n1, n2)
    return (n1, n2, n3)


def shrink_thresholds(current: Thresholds, entries: int, steps: Steps) -> Thresholds | None:
    """One step down for a table grown past the default gc_thresh3 that has
    nearly emptied; a threshold never goes below its kernel default (and one
    already below it stays where it is)."""
    t3 = current[2]
    if t3 <= DEFAULTS[2] or not steps.nearly_empty(entries, t3):
        return None
    new = tuple(v if v <= d else max(steps.shrink(v), d) for v, d in zip(current, DEFAULTS, strict=True))
    n1, n2, n3 = new
    n2 = min(n2, n3)
    n1 = min(n1, n2)
    return (n1, n2, n3)


# --- the kernel's side: rtnetlink, in the right namespace ---------------------------------


class NeighBackend(Protocol):
    def table(self, family: int) -> Table | None: ...

    def prefixes(self, device: Device, family: int) -> list[int] | None:
        """Prefix lengths of the device's addresses of ``family``; None when
        the device (or its namespace) cannot be found."""
        ...

    def set_thresholds(self, table: Table, new: Thresholds, ifindex: int | None) -> None: ...


class RtnlNeigh:
    """The real tables and addresses, over rtnetlink (pyroute2)."""

    def __init__(self, namespaces: Namespaces) -> None:
        self.namespaces = namespaces

    def table(self, family: int) -> Table | None:
        fam = FAMILIES[family]
        with self.namespaces.rtnl() as ipr:
            for msg in ipr.get_ntables(family=family):
                if msg.get_attr("NDTA_NAME") != fam.table or msg.get_attr("NDTA_THRESH3") is None:
                    continue
                config = msg.get_attr("NDTA_CONFIG")
                entries = int(config["entries"]) if config is not None else 0
                t1, t2, t3 = (int(msg.get_attr(f"NDTA_THRESH{i}")) for i in (1, 2, 3))
                return Table(fam.table, family, (t1, t2, t3), entries)
        return None

    def _rtnl_of(self, device: Device) -> Any:
        """A netlink handle in the device's namespace (by cookie, or by inode
        on kernels without cookies)."""
        if device.netns_cookie != libbpf.NETNS_UNKNOWN:
            return self.namespaces.rtnl(device.netns_cookie)
        return self.namespaces.rtnl(inode=device.netns_inum)

    def prefixes(self, device: Device, family: int) -> list[int] | None:
        try:
            with self._rtnl_of(device) as ipr:
                links = ipr.get_links(device.ifindex)
                if not links or links[0].get_attr("IFLA_IFNAME") != device.name:
                    return None
                return [int(a["prefixlen"]) for a in ipr.get_addr(family=family, index=device.ifindex)]
        except NetnsGone:
            return None
        except OSError as exc:  # pyroute2's NetlinkError is an OSError (e.g. no such device)
            log.debug("cannot read the addresses of %s: %s", device.describe(), exc)
            return None

    def set_thresholds(self, table: Table, new: Thresholds, ifindex: int | None) -> None:
        from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
        from pyroute2.netlink.rtnl import RTM_SETNEIGHTBL
        from pyroute2.netlink.rtnl.ndtmsg import ndtmsg

        msg = ndtmsg()
        msg["family"] = table.family
        attrs: list[tuple[str, Any]] = [
            ("NDTA_NAME", table.name),
            ("NDTA_THRESH1", new[0]),
            ("NDTA_THRESH2", new[1]),
            ("NDTA_THRESH3", new[2]),
        ]
        if ifindex is not None:
            attrs.append(("NDTA_PARMS", {"attrs": [("NDTPA_IFINDEX", ifindex)]}))
        msg["attrs"] = attrs
        with self.namespaces.rtnl() as ipr:
            status = getattr(ipr, "asyncore", None)
            if status is not None and "nlm_generator" not in status.status:
                status.status["nlm_generator"] = False  # pyroute2 0.9's sync IPRoute leaves it unset
            tuple(ipr.nlm_request(msg, RTM_SETNEIGHTBL, NLM_F_REQUEST | NLM_F_ACK))


@dataclass
class MemoryNeigh:
    """Tables and addresses in memory, for rules driven by synthetic events."""

    tables: dict[int, Table] = field(default_factory=dict)
    # (netns cookie, ifindex, family) -> prefix lengths; a missing key: no such device
    addresses: dict[tuple[int, int, int], list[int]] = field(default_factory=dict)
    writes: list[tuple[str, Thresholds, int | None]] = field(default_factory=list)

    def table(self, family: int) -> Table | None:
        return self.tables.get(family)

    def prefixes(self, device: Device, family: int) -> list[int] | None:
        return self.addresses.get((device.netns_cookie, device.ifindex, family))

    def set_thresholds(self, table: Table, new: Thresholds, ifindex: int | None) -> None:
        self.writes.append((table.name, new, ifindex))
        self.tables[table.family] = Table(table.name, table.family, new, table.entries)


class NeighThresholds:
    """The store's setter for a table's thresholds: read and written over
    rtnetlink (tables are global: the namespace cookie is not used)."""

    def __init__(self, backend: NeighBackend) -> None:
        self.backend = backend

    def _table(self, name: str) -> Table:
        for family, fam in FAMILIES.items():
            if name == f"neigh.{fam.table}.gc_thresh":
                table = self.backend.table(family)
                if table is None:
                    raise SysctlMissing(f"no {fam.table} table here")
                return table
        raise SysctlMissing(f"{name} is not a neighbour table's thresholds")

    def read(self, name: str, cookie: int) -> tuple[int, ...]:
        return self._table(name).thresholds

    def write(self, name: str, value: tuple[int, ...] | str, cookie: int) -> None:
        if isinstance(value, str) or len(value) != 3:
            raise SysctlMissing(f"{name} takes three thresholds")
        self.backend.set_thresholds(self._table(name), (value[0], value[1], value[2]), None)


def _setter(namespaces: Namespaces) -> NeighThresholds:
    """What the store uses to restore thresholds when this tuner is not
    running (journal recovery, bpftune --restore)."""
    return NeighThresholds(RtnlNeigh(namespaces))


# --- the tuner ------------------------------------------------------------------------


def _sysctls(proto: str) -> tuple[Tunable, ...]:
    """net.<proto>.neigh.default.*, ids NeighTableTunable.<PROTO>_<NAME>."""
    names = ("gc_interval", "gc_stale_time", "gc_thresh1", "gc_thresh2", "gc_thresh3")
    return tuple(
        Tunable(NeighTableTunable[f"{proto}_{n}".upper()], f"net.{proto}.neigh.default.{n}", 1, optional=True)
        for n in names
    )


LABELS = "gc_thresh1 gc_thresh2 gc_thresh3"


class NeighTableTuner(Tuner):
    name = "neigh_table"
    description = "grows (and shrinks back) the neighbour tables' GC thresholds over rtnetlink"
    bpf_name = "neigh_table_tuner"
    tunables = (
        # The sysctls (initial namespace only) are watched, not written: an
        # administrator's write makes the tuner back off.
        *_sysctls("ipv4"),
        *_sysctls("ipv6"),
        Tunable(
            NeighTableTunable.ARP_THRESHOLDS,
            "neigh.arp_cache.gc_thresh",
            3,
            kind="custom",
            labels=LABELS,
            setter=_setter,
            ceiling=neigh_cap,
        ),
        Tunable(
            NeighTableTunable.NDISC_THRESHOLDS,
            "neigh.ndisc_cache.gc_thresh",
            3,
            kind="custom",
            optional=True,
            labels=LABELS,
            setter=_setter,
            ceiling=neigh_cap,
        ),
    )
    scenarios = (
        Scenario(
            NeighTableScenario.FULL,
            "neighbour table nearly full",
            "neighbour table is nearly full, increase its GC thresholds",
        ),
        Scenario(
            NeighTableScenario.GROWN,
            "neighbour table grown excessively",
            "neighbour table cannot grow past its device's bound",
        ),
        Scenario(
            NeighTableScenario.EMPTY,
            "neighbour table nearly empty",
            "neighbour table is nearly empty, reduce its GC thresholds",
        ),
    )
    # Creations are the signal that matters; without removals the tables only
    # never shrink back.
    optional_signals = frozenset({"neigh_remove"})

    def __init__(self, ctx: TunerContext, tuner_id: int, backend: NeighBackend | None = None) -> None:
        super().__init__(ctx, tuner_id)
        self.backend: NeighBackend = backend if backend is not None else RtnlNeigh(ctx.namespaces)
        # The store writes through our backend (a fake one in unit tests).
        ctx.store.provide_setter(_setter, NeighThresholds(self.backend))
        self._said = SayOnce(log)  # "can no longer update" lines given

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        try:
            self.current(NeighTableTunable.IPV4_GC_THRESH3)
        except SysctlMissing:
            raise NotSupported(
                self.name,
                "net.ipv4.neigh.default is absent: the neighbour tables' thresholds are global and can only be "
                "changed from the initial network namespace",
            ) from None

    # --- rules ----------------------------------------------------------------------------

    def _global_active(self) -> bool:
        return self.ctx.store.netns_state(self, self.ctx.namespaces.global_cookie) == ACTIVE

    def _device(self, event: Event, stats: NeighTableStats) -> Device:
        return Device(stats.ifindex, stats.dev, event.netns_cookie, stats.netns_inum)

    def decide(self, event: Event) -> Decision:
        """Reads the live table (the event may be stale) and, to bound a
        growth, the addresses of the event's device."""
        if event.scenario_id not in (NeighTableScenario.FULL, NeighTableScenario.EMPTY):
            return NOTHING
        stats = NeighTableStats.unpack(event.raw)
        fam = FAMILIES.get(stats.family)
        if fam is None:
            return NOTHING
        if not self._global_active():
            log.debug("neigh_table is disabled in the global namespace; ignoring %s", fam.table)
            return NOTHING
        table = self.backend.table(fam.family)
        if table is None:
            log.debug("no %s table here (IPv6 off?); ignoring the event", fam.table)
            return NOTHING
        mine = self.ctx.store.written(self, fam.tunable, self.ctx.namespaces.global_cookie)
        if mine is not None and mine != table.thresholds:
            # Someone else (sysctl or `ip ntable`) owns them now: back off.
            why = f"the {table.name} thresholds were changed from ({_fmt(mine)}) to ({_fmt(table.thresholds)})"
            return Decision(effects=(Disable(self.ctx.namespaces.global_cookie, f"{why} outside pybpftune"),))
        device = self._device(event, stats)
        if event.scenario_id == NeighTableScenario.EMPTY:
            return self._shrink(fam, table, device)
        return self._grow(fam, table, device, refused=bool(stats.flags & NeighTableFlag.F_REFUSED))

    def _where(self, device: Device) -> str:
        if device.netns_cookie == libbpf.NETNS_UNKNOWN:
            return "non-global ns"
        return self.ctx.namespaces.describe(device.netns_cookie)

    def _shrink(self, fam: Family, table: Table, device: Device) -> Decision:
        new = self._limited(fam, table, shrink_thresholds(table.thresholds, table.entries, self.steps))
        if new is None:
            return NOTHING
        reason = f"neighbour table {table.name} nearly empty ({table.entries} entries),"
        announce = (
            f"reduced thresholds for {table.name} table, {device.describe()} in {self._where(device)}, "
            f"from ({_fmt(table.thresholds)}) to ({_fmt(new)}): {table.entries} entries"
        )
        return self._change(fam, NeighTableScenario.EMPTY, new, reason, announce)

    def _grow(self, fam: Family, table: Table, device: Device, refused: bool) -> Decision:
        if not refused and not self.steps.nearly_full(table.entries, table.thresholds[2]):
            return NOTHING
        where = self._where(device)
        prefixes = self.backend.prefixes(device, fam.family)
        if prefixes is None:
            # Usually a namespace that vanished right after its entry was made.
            log.debug(
                "cannot read the addresses of %s in %s to bound the %s thresholds; not changing them",
                device.describe(),
                where,
                table.name,
            )
            return NOTHING
        by_address, by_memory = address_bound(prefixes, fam.bits), self.highest(fam.tunable)
        bound = min(by_address, by_memory)
        log.debug(
            "computed max %d for %s table thresholds from %s prefixes %s (memory cap %d)",
            bound,
            table.name,
            device.describe(),
            prefixes,
            by_memory,
        )
        new = self._limited(fam, table, grow_thresholds(table.thresholds, table.entries, bound, self.steps, refused))
        if new is None:
            if table.thresholds[2] >= bound:
                self._said.info(
                    (table.name, device.name, bound, table.thresholds[2]),
                    "can no longer update thresholds for %s table, %s in %s: gc_thresh3 %d has reached the "
                    "computed max %d for %s (%d entries)",
                    table.name,
                    device.describe(),
                    where,
                    table.thresholds[2],
                    bound,
                    "its addresses" if by_address <= by_memory else "the host's memory",
                    table.entries,
                )
            return NOTHING
        why = "an entry was refused" if refused else f"{table.entries} entries of gc_thresh3 {table.thresholds[2]}"
        reason = f"neighbour table {table.name} nearly full ({why}),"
        announce = (
            f"updated thresholds for {table.name} table, {device.describe()} in {where}, "
            f"from ({_fmt(table.thresholds)}) to ({_fmt(new)}), computed max {bound}"
        )
        return self._change(fam, NeighTableScenario.FULL, new, reason, announce)

    def _change(self, fam: Family, scenario: int, new: Thresholds, reason: str, announce: str) -> Decision:
        """New thresholds for a table: always the global namespace's (the tables are global)."""
        glob = self.ctx.namespaces.global_cookie
        return Decision((Proposal(fam.tunable, scenario, glob, new, reason, announce),))

    def _limited(self, fam: Family, table: Table, new: Thresholds | None) -> Thresholds | None:
        """``new`` within the operator's floors and caps; None if that leaves
        nothing to change."""
        if new is None:
            return None
        glob = self.ctx.namespaces.global_cookie
        limited = self.ctx.store.bound(self, fam.tunable, glob, table.thresholds, new)
        if limited == table.thresholds:
            log.debug("%s thresholds (%s) held by the configured limits", table.name, _fmt(table.thresholds))
            return None
        return (limited[0], limited[1], limited[2])

    def command(self, tunable: Tunable, values: tuple[int | str, ...]) -> str | None:
        if tunable.id in (NeighTableTunable.ARP_THRESHOLDS, NeighTableTunable.NDISC_THRESHOLDS):
            table = tunable.name.split(".")[1]
            t1, t2, t3 = values
            return f"ip ntable change name {table} thresh1 {t1} thresh2 {t2} thresh3 {t3}"
        return super().command(tunable, values)


def _fmt(values: Iterable[int]) -> str:
    return " ".join(str(v) for v in values)


TUNER = NeighTableTuner
