"""Events from the shared ring buffer, read through the shared C layout."""

from __future__ import annotations

from dataclasses import dataclass

from . import bindings, libbpf

HEADER_SIZE = libbpf.union_offset()
# Netns cookies count up from 1 (a 64-bit counter the kernel advances per new
# namespace, at most a per-CPU batch at a time): 2**48 of them would take
# centuries, while every kernel address lies above it (x86_64 and arm64
# kernels live at the top of the address space).  A value that high can only
# come from a BPF program that read the wrong memory: it is passed on, and
# logged, as the documented unknown value instead.
MAX_COOKIE = 1 << 48


def cookie_text(cookie: int) -> str:
    """A netns cookie as log lines show it: the number, or "unknown"."""
    return "unknown" if cookie == libbpf.NETNS_UNKNOWN or cookie >= MAX_COOKIE else str(cookie)


@dataclass(frozen=True)
class Update:
    """One proposed change: tunable id, old and new values (up to three)."""

    id: int
    old: tuple[int, int, int]
    new: tuple[int, int, int]


class Event:
    """One ring-buffer record (a private copy, safe to keep)."""

    __slots__ = ("_data", "_view")

    def __init__(self, data: bytes) -> None:
        if len(data) < libbpf.EVENT_SIZE:
            data = data + bytes(libbpf.EVENT_SIZE - len(data))
        self._data = data
        self._view = libbpf.event_view(data)

    @classmethod
    def build(
        cls,
        tuner_id: int,
        scenario_id: int,
        netns_cookie: int = 0,
        pid: int = 0,
        updates: list[Update] | None = None,
        text: str | None = None,
        raw: bytes | None = None,
    ) -> Event:
        """A synthetic event, as the BPF side would send it (for tests and replays)."""
        if len(updates or ()) > libbpf.MAX_UPDATES:
            raise ValueError(f"an event carries at most {libbpf.MAX_UPDATES} updates")
        record = bindings.BpftuneEvent(
            tuner_id=tuner_id,
            scenario_id=scenario_id,
            netns_cookie=netns_cookie,
            pid=pid,
            update=tuple(bindings.BpftunableUpdate(id=u.id, old=u.old, new=u.new) for u in updates or ()),
            str=text or "",
            raw_data=raw or b"",
        )
        return cls(record.pack())

    @property
    def data(self) -> bytes:
        return self._data

    @property
    def tuner_id(self) -> int:
        return int(self._view.tuner_id)

    @property
    def scenario_id(self) -> int:
        return int(self._view.scenario_id)

    @property
    def netns_cookie(self) -> int:
        """The event's namespace: a cookie, 0 for the initial namespace
        without cookie support, or NETNS_UNKNOWN ((u64)-1), also for any
        value that cannot be a cookie (see MAX_COOKIE)."""
        cookie = int(self._view.netns_cookie)
        return cookie if cookie < MAX_COOKIE else libbpf.NETNS_UNKNOWN

    @property
    def pid(self) -> int:
        return int(self._view.pid)

    def update(self, index: int = 0) -> Update:
        u = self._view.update[index]
        return Update(
            int(u.id), (int(u.old[0]), int(u.old[1]), int(u.old[2])), (int(u.new[0]), int(u.new[1]), int(u.new[2]))
        )

    @property
    def text(self) -> str:
        raw = bytes(self._data[HEADER_SIZE : HEADER_SIZE + libbpf.MAX_STR])
        return raw.split(b"\0", 1)[0].decode(errors="replace")

    @property
    def raw(self) -> bytes:
        return self._data[HEADER_SIZE:]

    def payload(self, type_name: str) -> libbpf.CData:
        """The union's bytes viewed as a struct from the shared header."""
        return libbpf.struct_view(type_name, self._data[HEADER_SIZE:])

    def __repr__(self) -> str:
        return (
            f"Event(tuner_id={self.tuner_id}, scenario_id={self.scenario_id}, "
            f"netns_cookie={self.netns_cookie}, pid={self.pid})"
        )
