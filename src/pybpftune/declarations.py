"""What a tuner declares and what its rules return: the tuning core's vocabulary.

A tuner is a declaration (its :class:`Tunable` s and :class:`Scenario` s) plus
rules that turn one event into a :class:`Decision`: the :class:`Proposal` s
for the tunable store's single write path and the :data:`Effect` s the
framework carries out (BPF globals and maps, backing off in a namespace).
This module is a leaf: the store, the tuner framework and the tuners depend
on it, never the other way round, so it imports nothing of ours at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, overload

if TYPE_CHECKING:  # types only: both are leaves too
    from .hostmem import HostMemory

INT_MAX = 2**31 - 1
Value = tuple[int, ...] | str
Values = tuple[int, ...]


class Setter(Protocol):
    """How one kind of tunable is read and written in a namespace."""

    def read(self, name: str, cookie: int) -> Value: ...

    def write(self, name: str, value: Value, cookie: int) -> None: ...


@dataclass(frozen=True)
class Tunable:
    """One thing a tuner may change.

    ``kind`` is "sysctl" (read/written under /proc/sys), "string" (a sysctl
    holding text), "custom" (read and written by ``setter``, given the
    daemon's namespaces, e.g. over netlink: journaled and restored like a
    sysctl) or "other" (per-socket settings BPF makes; only logged and
    counted).  ``lower``/``upper`` are hard bounds applied to every value of a
    proposal; ``ceiling`` is a hard cap computed from the host's memory, for
    tunables whose values the host must be able to back with memory;
    ``labels`` names the values in log lines ("min default max").
    ``restore_on_stop``: put back whenever the tuner stops, -R or not (state
    that only makes sense while the tuner runs).
    """

    id: int
    name: str
    num_values: int = 1
    namespaced: bool = False
    optional: bool = False
    kind: str = "sysctl"
    lower: int | None = None
    upper: int | None = INT_MAX
    labels: str = ""
    # Given the daemon's Namespaces (typed loosely: this module stays a leaf).
    setter: Callable[[Any], Setter] | None = None
    restore_on_stop: bool = False
    ceiling: Callable[[HostMemory], int] | None = field(default=None, compare=False)

    @property
    def is_sysctl(self) -> bool:
        return self.kind in ("sysctl", "string")

    @property
    def path(self) -> str:
        """The /proc/sys-relative path ("net/ipv4/tcp_rmem")."""
        return self.name.replace(".", "/")

    def display(self) -> str:
        return f"{self.name}({self.labels})" if self.labels else self.name


class Declares(Protocol):
    """Anything that declares tunables (a tuner class or instance)."""

    @property
    def tunables(self) -> tuple[Tunable, ...]: ...


class NamedDeclaration(Declares, Protocol):
    """A tuner class as configuration and the journal see it: a name and
    its tunables."""

    @property
    def name(self) -> str: ...


def known_tunables(classes: Iterable[Declares]) -> dict[str, Tunable]:
    """Name -> declaration of every tunable these tuners can change (the
    journal may name nothing else); the first declaration of a shared one."""
    out: dict[str, Tunable] = {}
    for cls in classes:
        for t in cls.tunables:
            if t.kind != "other":
                out.setdefault(t.name, t)
    return out


@dataclass(frozen=True)
class Scenario:
    id: int
    name: str
    description: str = ""


@dataclass(frozen=True)
class Proposal:
    """A rule's decision: set ``tunable`` to ``new`` in namespace ``netns_cookie``.

    ``announce``: a line logged once the change took effect (beside the
    store's own "what and why" line), for a tuner whose change needs more
    context than the values, e.g. the device and table it was made for.
    """

    tunable: int
    scenario: int
    netns_cookie: int
    new: tuple[int, ...]
    reason: str
    announce: str = field(default="", compare=False)


@dataclass(frozen=True)
class TextProposal:
    """Set a string tunable (kind "string") to ``text``."""

    tunable: int
    scenario: int
    netns_cookie: int
    text: str
    reason: str


# --- effects: what a decision asks the framework to do besides proposals ----------------


@dataclass(frozen=True)
class SetGlobal:
    """Write a global of the tuner's loaded BPF object (a mirrored limit)."""

    name: str
    value: int


@dataclass(frozen=True)
class MapUpdate:
    """Write one element of a map of the tuner's object (``value`` None: delete it)."""

    map: str
    key: bytes
    value: bytes | None


@dataclass(frozen=True)
class Disable:
    """The tuner backs off in a namespace: an administrator took over there."""

    netns_cookie: int
    reason: str


@dataclass(frozen=True)
class AdminWrite:
    """A process other than the daemon wrote a sysctl (the sysctl tuner's
    finding): every tuner managing it backs off in that namespace.
    ``netns_cookie`` None: the writer's namespace is unknown (it is gone)."""

    path: str
    netns_cookie: int | None
    pid: int
    command: str


@dataclass(frozen=True)
class NamespaceGone:
    """A network namespace was freed: the store closes what it held there."""

    netns_cookie: int
    why: str


@dataclass(frozen=True)
class Noted:
    """A change the BPF side made itself (a connection's setting): the store
    logs the what and why and counts it, as for a proposal."""

    tunable: int
    scenario: int
    netns_cookie: int
    old: str
    new: str
    reason: str


Effect = SetGlobal | MapUpdate | Disable | AdminWrite | NamespaceGone | Noted


@dataclass(frozen=True)
class Decision(Sequence[Proposal]):
    """What one event leads to: effects first (they describe the world the
    rules saw), then the proposals, then, if ``check_at`` is set, a tick no
    later than that monotonic time.  ``texts``: proposals for string
    tunables, carried out after the numeric ones.

    A sequence of its proposals, so rules read ``if decision:`` and
    ``decision[0].new``.
    """

    proposals: tuple[Proposal, ...] = ()
    effects: tuple[Effect, ...] = ()
    check_at: float | None = None
    texts: tuple[TextProposal, ...] = ()

    @classmethod
    def of(cls, proposals: Iterable[Proposal] = (), effects: Iterable[Effect] = ()) -> Decision:
        return cls(tuple(proposals), tuple(effects))

    def __add__(self, other: Decision) -> Decision:
        """Both decisions, this one first (the earlier check wins)."""
        checks = [c for c in (self.check_at, other.check_at) if c is not None]
        return Decision(
            self.proposals + other.proposals,
            self.effects + other.effects,
            min(checks, default=None),
            self.texts + other.texts,
        )

    @overload
    def __getitem__(self, index: int) -> Proposal: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Proposal]: ...

    def __getitem__(self, index: int | slice) -> Proposal | Sequence[Proposal]:
        return self.proposals[index]

    def __len__(self) -> int:
        return len(self.proposals)

    def __iter__(self) -> Iterator[Proposal]:
        return iter(self.proposals)

    def __bool__(self) -> bool:
        return bool(self.proposals or self.effects or self.texts or self.check_at is not None)


NOTHING = Decision()


class Steps:
    """bpftune's learning-rate arithmetic: steps of 2**-(6 - rate)."""

    def __init__(self, rate: int = 4) -> None:
        self.set_rate(rate)

    def set_rate(self, rate: int) -> None:
        """Change the step (a reload); every tuner shares this object."""
        if not 0 <= rate <= 4:
            # ValueError, not TunerError: errors.py is ours and this module is a leaf;
            # the daemon and config check the rate before it gets here.
            raise ValueError(f"learning rate {rate} is out of range: values 0-4 are supported")
        self.rate = rate
        self.shift = 6 - rate

    def grow(self, v: int) -> int:
        return v + (v >> self.shift)

    def shrink(self, v: int) -> int:
        return v - (v >> self.shift)

    def nearly_full(self, v: int, limit: int) -> bool:
        return v >= limit or v + (limit >> self.shift) >= limit

    def nearly_empty(self, v: int, limit: int) -> bool:
        return v <= (limit >> self.shift)

    @property
    def fraction(self) -> float:
        """One step as a fraction (0.25 at the default rate)."""
        return 1.0 / (1 << self.shift)
