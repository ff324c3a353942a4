"""The tunable store: the one owner of every tunable's state.

Every change any tuner makes goes through it, whatever the kind: numeric
sysctls, string sysctls, and values a tuner's own setter changes (neighbour
thresholds over netlink).  It alone knows, per tunable and namespace, the
original (one per sysctl per namespace, whichever tuner touches it first),
what we last wrote, the bounds and caps, the per-namespace state (active,
manual, gone), advice mode, the journal and rollback.  Tuners get a narrow
interface: propose a change (``apply``), read the current value, read the
original; never the records.

The journal (journal.py) is written before every write it announces, so a
daemon killed at any moment leaves enough behind: the next start adopts the
originals (or restores them with -R), and a value that is no longer what we
wrote was changed by someone else and is left alone.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .config import Limits, TunableLimits
from .declarations import Noted, Proposal, Scenario, Setter, TextProposal, Tunable
from .errors import PybpftuneError, TunerError
from .history import Change, History, now
from .journal import Key, Pending, Record, Value, boot_id, compacted, describe, same
from .netns import Namespaces, NetnsGone
from .state import StateDir
from .sysctl import SysctlBackend, SysctlMissing, format_values

if TYPE_CHECKING:
    from .declarations import AdminWrite

log = logging.getLogger("pybpftune")

ACTIVE, MANUAL, GONE = "active", "manual", "gone"
GONE_LOGGED_MAX = 4096
REPLICATE = "# To replicate this change on another system, run the following as a privileged user in a terminal:"
Values = tuple[int, ...]


class Tuner(Protocol):
    """What the store needs of a tuner (tuner.Tuner is one; the store does
    not import the framework, which depends on it)."""

    @property
    def name(self) -> str: ...

    @property
    def tunables(self) -> tuple[Tunable, ...]: ...

    def tunable(self, tunable_id: int) -> Tunable: ...

    def scenario(self, scenario_id: int) -> Scenario: ...

    def ceiling(self, tunable_id: int) -> int | None: ...

    def command(self, tunable: Tunable, values: tuple[int | str, ...]) -> str | None: ...

    def netns_disabled(self, netns_cookie: int) -> None: ...


__all__ = ["Setter", "Tuner", "TunableStore"]


class SysctlSetter:
    def __init__(self, backend: SysctlBackend) -> None:
        self.backend = backend

    def read(self, name: str, cookie: int) -> Value:
        return self.backend.read(name, cookie)

    def write(self, name: str, value: Value, cookie: int) -> None:
        assert not isinstance(value, str)
        self.backend.write(name, value, cookie)


class TextSetter(SysctlSetter):
    def read(self, name: str, cookie: int) -> Value:
        return self.backend.read_text(name, cookie)

    def write(self, name: str, value: Value, cookie: int) -> None:
        assert isinstance(value, str)
        self.backend.write_text(name, value, cookie)


@dataclass
class Entry:
    """One tunable in one namespace that we changed (or a dead daemon did)."""

    tunable: Tunable
    cookie: int
    global_ns: bool
    original: Value
    written: Value | None = None
    tuners: set[str] = field(default_factory=set)  # running tuners that changed it
    owner: str = ""  # the tuner that first changed it (journaled)

    @property
    def key(self) -> Key:
        return (self.tunable.name, self.cookie)

    @property
    def kind(self) -> str:
        return _journal_kind(self.tunable)

    def pending(self) -> Pending:
        return Pending(
            self.kind,
            self.tunable.name,
            self.cookie,
            self.global_ns,
            self.owner,
            self.original,
            [] if self.written is None else [self.written],
        )


def bounded(
    tunable: Tunable, old: Values, new: Values, limits: Limits | None = None, ceiling: int | None = None
) -> Values:
    """``new`` within the tunable's hard bounds, its memory cap and the
    operator's limits.

    The hard bounds and the memory cap (``ceiling``: what the host can back,
    see Tunable.ceiling) always hold, whatever the operator configured: a
    value beyond the memory cap is brought down to it.  A configured cap
    stops growth and a floor stops shrinking, but neither moves a value on
    its own: a value already beyond one (an administrator's choice) is left
    where it is rather than pulled back by a change the tuner never proposed."""
    top = tunable.upper
    if ceiling is not None:
        top = ceiling if top is None else min(top, ceiling)
    if top is not None and tunable.lower is not None:
        top = max(top, tunable.lower)

    def hard(v: int) -> int:
        if tunable.lower is not None:
            v = max(v, tunable.lower)
        return v if top is None else min(v, top)

    out = []
    for i, v in enumerate(new):
        v = hard(v)
        o = old[i] if i < len(old) else v
        if limits is not None:
            cap, floor = limits.cap_at(i), limits.floor_at(i)
            if cap is not None and v > o and v > cap:
                v = max(o, cap)
            if floor is not None and v < o and v < floor:
                v = min(o, floor)
        out.append(hard(v))
    return tuple(out)


def _plain(values: tuple[int | str, ...]) -> str:
    return " ".join(str(v) for v in values)


class JournalWriter:
    """Appends the store's journal records; the sequence continues the file's."""

    def __init__(self, state: StateDir, boot: str | None = None, first_seq: int = 1) -> None:
        self.state = state
        self.boot = boot if boot is not None else boot_id()
        self.seq = first_seq

    def _record(self, e: Entry, op: str, value: Value | None = None, how: str = "") -> str:
        rec = Record(self.seq, op, self.boot, e.kind, e.tunable.name, e.cookie, e.global_ns, e.owner, value, how)
        self.seq += 1
        return rec.to_json()

    def original(self, e: Entry, new: Value) -> None:
        self.state.append_journal([self._record(e, "original", e.original), self._record(e, "wrote", new)])

    def wrote(self, e: Entry, value: Value) -> None:
        self.state.append_journal([self._record(e, "wrote", value)])

    def done(self, e: Entry, how: str) -> None:
        self.state.append_journal([self._record(e, "done", how=how)])

    def rewrite(self, entries: Iterable[Entry], foreign: Iterable[Pending] = ()) -> None:
        records = compacted([*(e.pending() for e in entries), *foreign], self.boot, self.seq)
        self.seq += len(records)
        self.state.replace_journal([r.to_json() for r in records])


class TunableStore:
    def __init__(
        self,
        backend: SysctlBackend,
        namespaces: Namespaces,
        state: StateDir | None = None,
        advice: bool = False,
        limits: Mapping[str, TunableLimits] | None = None,
    ) -> None:
        self.backend = backend
        self.namespaces = namespaces
        self.state = state
        self.journal = JournalWriter(state) if state is not None else None
        self.advice = advice
        self._limits: Mapping[str, TunableLimits] = dict(limits or {})
        self._held_said: set[tuple[str, str, int]] = set()
        self.history = History()
        self._declared: dict[tuple[str, int], Tunable] = {}  # (tuner, tunable id) -> declaration
        self._initial: dict[str, Value] = {}  # tunable name -> global value at registration
        self._entries: dict[Key, Entry] = {}  # (tunable name, cookie) -> what we changed, journal order
        self._counts: dict[tuple[str, int], Counter[tuple[int, bool]]] = {}
        self._netns_state: dict[tuple[str, int], str] = {}
        # Bounded: namespaces come and go for as long as the daemon runs.
        self._gone_logged: dict[int, None] = {}
        self._setters: dict[object, Setter] = {}
        self._left_said: set[Key] = set()
        # Journaled by an earlier daemon for tunables no tuner we know
        # declares (a plugin not loaded now): never written, but kept.
        self._foreign: list[Pending] = []
        # The journal is rewritten only by a store that read it first: one
        # that never did (start-up failed early) must not drop what it holds.
        self._journal_read = False

    # --- registration and reads ----------------------------------------------------

    def register(self, tuner: Tuner) -> None:
        """Declare a tuner's tunables and read each sysctl's global value.  A
        tuner started again keeps what it changed: the originals stay the
        ones journaled."""
        for t in tuner.tunables:
            if t.is_sysctl and t.name not in self._initial:
                try:
                    value = self.setter(t).read(t.name, self.namespaces.global_cookie)
                except SysctlMissing:
                    if not t.optional:
                        raise TunerError(f"tuner {tuner.name}: sysctl {t.name} does not exist") from None
                else:
                    if not isinstance(value, str) and len(value) != t.num_values:
                        raise TunerError(
                            f"tuner {tuner.name}: {t.name} has {len(value)} values, expected {t.num_values}"
                        )
                    self._initial[t.name] = value
            self._declared[(tuner.name, t.id)] = t
            self._counts.setdefault((tuner.name, t.id), Counter())

    def setter(self, t: Tunable) -> Setter:
        """The setter of a tunable's kind (one per kind, made on first use)."""
        factory: object = t.setter if t.setter is not None else t.kind
        found = self._setters.get(factory)
        if found is None:
            if t.setter is not None:
                found = t.setter(self.namespaces)
            elif t.kind == "string":
                found = TextSetter(self.backend)
            elif t.kind == "sysctl":
                found = SysctlSetter(self.backend)
            else:
                raise TunerError(f"{t.name} ({t.kind}) has no setter: changes to it can only be noted")
            self._setters[factory] = found
        return found

    def provide_setter(self, factory: object, setter: Setter) -> None:
        """Use ``setter`` for the tunables whose declared setter is ``factory``
        (a tuner hands over the instance bound to its own backend)."""
        self._setters[factory] = setter

    def _cookie(self, tunable: Tunable, netns_cookie: int | None) -> int:
        if netns_cookie is None or not tunable.namespaced:
            return self.namespaces.global_cookie
        return netns_cookie

    @property
    def limits(self) -> Mapping[str, TunableLimits]:
        """Operator floors and caps per tunable name (the configuration file)."""
        return self._limits

    @limits.setter
    def limits(self, limits: Mapping[str, TunableLimits]) -> None:
        """Replaced as a whole on reload; each hold is said again."""
        self._limits = dict(limits)
        self._held_said.clear()

    def bound(self, tuner: Tuner, tunable_id: int, netns_cookie: int, old: Values, new: Values) -> Values:
        """``new`` within the hard bounds and configured limits (for a rule
        that wants to know before it proposes)."""
        t = tuner.tunable(tunable_id)
        return self._bounded(tuner, t, self._cookie(t, netns_cookie), old, new)

    def _bounded(self, tuner: Tuner, t: Tunable, cookie: int, old: Values, new: Values) -> Values:
        limits = self.limits_for(t, cookie)
        ceiling = tuner.ceiling(t.id)
        out = bounded(t, old, new, limits, ceiling)
        if limits is not None and out != bounded(t, old, new, None, ceiling):
            # The operator's limit, not the tuner, decided: say so once per
            # tunable and namespace (until the limits change), not per event.
            key = (tuner.name, t.name, cookie)
            if key not in self._held_said:
                self._held_said.add(key)
                log.info(
                    "%s wanted %s at (%s) in %s; the configured limits (%s) hold it at (%s)",
                    tuner.name,
                    t.name,
                    format_values(new),
                    self.namespaces.describe(cookie),
                    limits.describe(),
                    format_values(out),
                )
        return out

    def limits_for(self, t: Tunable, cookie: int) -> Limits | None:
        configured = self.limits.get(t.name)
        return None if configured is None else configured.for_namespace(self.namespaces.is_global(cookie))

    def current(self, tuner: Tuner, tunable_id: int, netns_cookie: int | None = None) -> Values:
        t = tuner.tunable(tunable_id)
        value = self.setter(t).read(t.name, self._cookie(t, netns_cookie))
        if isinstance(value, str):
            raise TunerError(f"{t.name} is a string sysctl; use current_text")
        return value

    def current_text(self, tuner: Tuner, tunable_id: int, netns_cookie: int | None = None) -> str:
        t = tuner.tunable(tunable_id)
        return self.backend.read_text(t.name, self._cookie(t, netns_cookie))

    def original(
        self, tuner: Tuner, tunable_id: int, netns_cookie: int | None = None, initial: bool = True
    ) -> Values | None:
        """The value before pybpftune changed this tunable in that namespace
        (journaled, possibly by an earlier daemon); unchanged in the global
        namespace: its value when the tuner registered (unless ``initial`` is
        false); else None."""
        value = self._original(tuner, tunable_id, netns_cookie, initial)
        return None if isinstance(value, str) else value

    def original_text(self, tuner: Tuner, tunable_id: int, netns_cookie: int | None = None) -> str | None:
        value = self._original(tuner, tunable_id, netns_cookie)
        return value if isinstance(value, str) else None

    def _original(self, tuner: Tuner, tunable_id: int, netns_cookie: int | None, initial: bool = True) -> Value | None:
        t = tuner.tunable(tunable_id)
        cookie = self._cookie(t, netns_cookie)
        entry = self._entries.get((t.name, cookie))
        if entry is not None:
            return entry.original
        return self._initial.get(t.name) if initial and self.namespaces.is_global(cookie) else None

    def written(self, tuner: Tuner, tunable_id: int, netns_cookie: int | None) -> Values | None:
        """The value last written for this tunable in that namespace, if any."""
        t = tuner.tunable(tunable_id)
        entry = self._entries.get((t.name, self._cookie(t, netns_cookie)))
        value = None if entry is None else entry.written
        return None if isinstance(value, str) else value

    def changed_here(self, tuner: Tuner, tunable_id: int) -> list[int]:
        """Namespaces where this tuner's tunable has a value we wrote."""
        t = tuner.tunable(tunable_id)
        return [c for (name, c), e in self._entries.items() if name == t.name and e.written is not None]

    # --- views for queries ---------------------------------------------------------------

    def counts(self, tuner: Tuner) -> list[tuple[str, str, bool, int]]:
        """(tunable, scenario, global namespace?, times) for every scenario seen."""
        out = []
        for t in tuner.tunables:
            for (scenario_id, is_global), n in sorted(self._counts.get((tuner.name, t.id), Counter()).items()):
                out.append((t.name, tuner.scenario(scenario_id).name, is_global, n))
        return out

    def scenario_counts(self, tuner: Tuner, tunable_id: int) -> Counter[tuple[int, bool]]:
        """(scenario id, global ns?) -> changes made for one tunable (a copy)."""
        return Counter(self._counts.get((tuner.name, tunable_id), Counter()))

    def _entries_of(self, tuner: Tuner) -> list[Entry]:
        names = {t.name for t in tuner.tunables}
        return [e for e in self._entries.values() if e.tunable.name in names and _changed_by(e, tuner)]

    def changed_values(self, tuner: Tuner) -> list[tuple[Tunable, int, tuple[int | str, ...], tuple[int | str, ...]]]:
        """(tunable, namespace cookie, original, last written) of every
        tunable this tuner changed, in namespaces that still exist."""
        out: list[tuple[Tunable, int, tuple[int | str, ...], tuple[int | str, ...]]] = []
        for e in self._entries_of(tuner):
            if e.written is None or self.netns_state(tuner, e.cookie) == GONE:
                continue
            t = next(d for d in tuner.tunables if d.name == e.tunable.name)  # this tuner's declaration
            out.append((t, e.cookie, _tuple(e.original), _tuple(e.written)))
        return out

    # --- per-namespace state ---------------------------------------------------------

    def netns_state(self, tuner: Tuner, netns_cookie: int) -> str:
        if self.namespaces.is_gone(netns_cookie):
            return GONE
        return self._netns_state.get((tuner.name, netns_cookie), ACTIVE)

    def manual_namespaces(self, tuner: Tuner) -> list[int]:
        """Namespaces where an administrator took over from this tuner."""
        return [c for (name, c), state in self._netns_state.items() if name == tuner.name and state == MANUAL]

    def disable(self, tuner: Tuner, netns_cookie: int, why: str) -> None:
        """Stop tuning in one namespace (an administrator took over there)."""
        if self._netns_state.get((tuner.name, netns_cookie)) == MANUAL:
            return
        self._netns_state[(tuner.name, netns_cookie)] = MANUAL
        log.info(
            "%s; disabling '%s' for namespace cookie %d",
            why,
            tuner.name,
            netns_cookie,
            extra={"bpftune": {"tuner": tuner.name, "netns_cookie": netns_cookie, "state": MANUAL, "reason": why}},
        )
        log.info(
            "setting state of netns (cookie %d) to manual for tuner '%s' (%s)",
            netns_cookie,
            tuner.name,
            self.namespaces.describe(netns_cookie),
        )
        tuner.netns_disabled(netns_cookie)

    def mark_gone(self, netns_cookie: int, why: str) -> bool:
        """A namespace vanished: forget it for every tuner and close what we
        held there; said once (at info only if we held something there).
        True if the namespace registry still knew it."""
        held = False
        for (tuner_name, cookie), _state in list(self._netns_state.items()):
            if cookie == netns_cookie:
                self._netns_state[(tuner_name, cookie)] = GONE
                held = True
        known = self.namespaces.mark_gone(netns_cookie)
        for entry in list(self._entries.values()):
            if entry.cookie == netns_cookie:
                self._close(entry, "gone")
                held = True
        self.history.forget_namespace(netns_cookie)
        if netns_cookie not in self._gone_logged:
            self._gone_logged[netns_cookie] = None
            while len(self._gone_logged) > GONE_LOGGED_MAX:
                del self._gone_logged[next(iter(self._gone_logged))]
            log.log(
                logging.INFO if held else logging.DEBUG, "network namespace (cookie %d) is gone: %s", netns_cookie, why
            )
        return known

    # --- the write path --------------------------------------------------------------

    def apply(self, tuner: Tuner, proposal: Proposal) -> Values | None:
        """Carry out one proposal: the values written (bounds and caps may
        have made them smaller than proposed), None if nothing changed."""
        t = tuner.tunable(proposal.tunable)
        if t.kind == "string" or t.kind == "other":
            raise TunerError(f"{t.name} is not numeric and settable; use a TextProposal or Noted for it")
        if len(proposal.new) != t.num_values:
            raise TunerError(f"proposal for {t.name} has {len(proposal.new)} values, expected {t.num_values}")
        found = self._current_where_active(tuner, t, proposal.netns_cookie)
        if found is None:
            return None
        cookie, old = found
        if isinstance(old, str):
            return None
        new = self._bounded(tuner, t, cookie, old, proposal.new)
        if new == old or not self._change(tuner, t, proposal, cookie, old, new):
            return None
        return new

    def apply_text(self, tuner: Tuner, p: TextProposal) -> bool:
        """Set a string sysctl (e.g. a list of congestion controls); True if it changed."""
        t = tuner.tunable(p.tunable)
        if t.kind != "string":
            raise TunerError(f"{t.name} is not a string sysctl")
        found = self._current_where_active(tuner, t, p.netns_cookie)
        if found is None:
            return False
        cookie, old = found
        if not isinstance(old, str):
            return False
        new = " ".join(p.text.split())
        return not same(new, old) and self._change(tuner, t, p, cookie, old, new)

    def _current_where_active(self, tuner: Tuner, t: Tunable, netns_cookie: int | None) -> tuple[int, Value] | None:
        """(cookie, current value) where the tuner may act; None where it is
        off (an administrator took over) or the value cannot be read."""
        cookie = self._cookie(t, netns_cookie)
        if self.netns_state(tuner, cookie) != ACTIVE:
            log.debug("Skipping update of %s: '%s' is disabled in netns cookie %d", t.name, tuner.name, cookie)
            return None
        old = self._read(t, cookie)
        return None if old is None else (cookie, old)

    def _change(
        self, tuner: Tuner, t: Tunable, p: Proposal | TextProposal, cookie: int, old: Value, new: Value
    ) -> bool:
        """Write ``new`` (or, in advice mode, only say so); True if written."""
        shown_old, shown_new = (old,) if isinstance(old, str) else old, (new,) if isinstance(new, str) else new
        if self.advice:
            self._count(tuner, t, p.scenario, cookie)
            self._log_change(tuner, t, p, cookie, shown_old, shown_new, advice=True)
            return False
        if not self._write(tuner, t, cookie, old, new, p.scenario):
            return False
        self._log_change(tuner, t, p, cookie, shown_old, shown_new)
        return True

    def _read(self, t: Tunable, cookie: int) -> Value | None:
        try:
            return self.setter(t).read(t.name, cookie)
        except NetnsGone as exc:
            self.mark_gone(cookie, str(exc))
        except SysctlMissing:
            pass
        return None

    def _write(self, tuner: Tuner, t: Tunable, cookie: int, old: Value, new: Value, scenario: int) -> bool:
        """Journal, then write; True if written."""
        entry = self._entries.get((t.name, cookie))
        if entry is None:
            entry = Entry(t, cookie, self.namespaces.is_global(cookie), old, owner=tuner.name)
            if self.journal is not None:
                self.journal.original(entry, new)
            self._entries[(t.name, cookie)] = entry
        elif self.journal is not None:
            self.journal.wrote(entry, new)
        entry.tuners.add(tuner.name)
        try:
            self.setter(t).write(t.name, new, cookie)
        except NetnsGone as exc:
            self.mark_gone(cookie, str(exc))
            return False
        except (OSError, PybpftuneError) as exc:
            log.warning("could not set %s to (%s): %s", t.name, describe(new), getattr(exc, "strerror", None) or exc)
            if entry.written is None and same(old, entry.original):
                self._forget(entry)  # nothing of ours is there: no entry to keep
            elif self.journal is not None:
                self.journal.wrote(entry, old)  # what stayed, so a later restore knows it is ours
            return False
        entry.written = new
        self._count(tuner, t, scenario, cookie)
        return True

    def _count(self, tuner: Tuner, t: Tunable, scenario: int, cookie: int) -> None:
        self._counts.setdefault((tuner.name, t.id), Counter())[(scenario, self.namespaces.is_global(cookie))] += 1

    def note(self, tuner: Tuner, n: Noted) -> None:
        """Log and count a change made by other means (a connection's
        congestion control, set by BPF)."""
        t = tuner.tunable(n.tunable)
        cookie = self._cookie(t, n.netns_cookie)
        self._count(tuner, t, n.scenario, cookie)
        self._log_change(tuner, t, n, cookie, (n.old,), (n.new,), advice=self.advice)

    def _log_change(
        self,
        tuner: Tuner,
        t: Tunable,
        p: Proposal | TextProposal | Noted,
        cookie: int,
        old: tuple[int | str, ...],
        new: tuple[int | str, ...],
        advice: bool = False,
    ) -> None:
        scenario = tuner.scenario(p.scenario)
        where = self.namespaces.describe(cookie)
        command = self.command(tuner, t, new, cookie)
        change = Change(
            now(),
            tuner.name,
            t.name,
            scenario.name,
            cookie,
            self.namespaces.is_global(cookie),
            tuple(old),
            tuple(new),
            p.reason,
            advice,
            command,
        )
        # The same advice again (nothing was written, so the tuner keeps
        # deciding the same): remembered and counted, logged only at debug.
        level = logging.INFO if self.history.record(change) else logging.DEBUG
        fields = {
            "tuner": tuner.name,
            "tunable": t.name,
            "scenario": scenario.name,
            "netns_cookie": cookie,
            "global_ns": self.namespaces.is_global(cookie),
            "old": old,
            "new": new,
            "reason": p.reason,
            "advice": advice,
        }
        log.log(
            level,
            "Scenario '%s' occurred for tunable '%s' in %s. %s",
            scenario.name,
            t.name,
            where,
            scenario.description,
            extra={"bpftune": fields},
        )
        verb = "would change" if advice else "change"
        log.log(
            level,
            "Due to %s %s %s from (%s) -> (%s)",
            p.reason,
            verb,
            t.display(),
            _plain(old),
            _plain(new),
            extra={"bpftune": fields},
        )
        if advice:
            log.log(
                level,
                "Advice: %s",
                command or f"no command can apply {t.name} ({tuner.name} sets it itself); run without --advise",
                extra={"bpftune": fields},
            )

    def command(self, tuner: Tuner, t: Tunable, values: tuple[int | str, ...], cookie: int) -> str | None:
        """The shell command that sets ``t`` to ``values`` in the namespace of
        ``cookie``; None where none can (a per-connection setting, or a
        namespace we know no path to)."""
        body = tuner.command(t, values)
        if body is None:
            return None
        if not t.namespaced or self.namespaces.is_global(cookie):
            return body
        prefix = self.namespaces.command_prefix(cookie)
        return None if prefix is None else f"{prefix} {body}"

    # --- admin writes ------------------------------------------------------------------

    def matches_sysctl(self, tuner: Tuner, path: str) -> list[Tunable]:
        """Tunables of ``tuner`` whose /proc/sys path ends with ``path``."""
        return [t for t in tuner.tunables if t.is_sysctl and (t.path == path or t.path.endswith("/" + path))]

    def back_off(self, tuners: Iterable[Tuner], write: AdminWrite) -> None:
        """An administrator wrote a sysctl: every tuner managing it stops in
        the writer's namespace (or, the writer gone, wherever the value is no
        longer what we wrote)."""
        for tuner in tuners:
            for tunable in self.matches_sysctl(tuner, write.path):
                cookies = (
                    [write.netns_cookie] if write.netns_cookie is not None else self._changed_outside(tuner, tunable)
                )
                for cookie in cookies:
                    self.disable(
                        tuner,
                        cookie,
                        f"pid {write.pid}, cmd '{write.command}' modified sysctl '{tunable.name}' "
                        f"that tuner '{tuner.name}' uses",
                    )

    def _changed_outside(self, tuner: Tuner, t: Tunable) -> list[int]:
        out = []
        for cookie in self.changed_here(tuner, t.id):
            try:
                if self.current(tuner, t.id, cookie) != self.written(tuner, t.id, cookie):
                    out.append(cookie)
            except Exception:  # the namespace went away meanwhile
                continue
        if not out:
            log.debug("could not tell where %s was written; its writer is gone", t.name)
        return out

    # --- summary ----------------------------------------------------------------------

    def summary(self, tuner: Tuner) -> list[str]:
        lines: list[str] = []
        glob = self.namespaces.global_cookie
        for t in tuner.tunables:
            for (scenario_id, is_global), n in sorted(self._counts.get((tuner.name, t.id), Counter()).items()):
                s = tuner.scenario(scenario_id)
                where = "global ns" if is_global else "non-global ns"
                head = f"# Summary: scenario '{s.name}' occurred {n} times for tunable '{t.name}'"
                lines.append(f"{head} in {where}. {s.description}")
            entry = self._entries.get((t.name, glob))
            if not t.is_sysctl or entry is None or entry.written is None or not _changed_by(entry, tuner):
                continue
            lines.append(
                f"# sysctl '{t.name}' changed from ({describe(entry.original)}) -> ({describe(entry.written)})"
            )
            if t.kind != "string":
                lines.append(REPLICATE)
                lines.append(f'sysctl -w {t.name}="{describe(entry.written)}"')
        return lines

    # --- restoring -----------------------------------------------------------------------

    def rollback(self, tuner: Tuner) -> int:
        """Restore what this tuner changed, where no other running tuner
        shares the change and no administrator took over; the rest stays
        journaled.  Returns how many values were written back."""
        restored = 0
        for entry in self._entries_of(tuner):
            entry.tuners.discard(tuner.name)
            if entry.tuners:
                continue  # another running tuner still tunes it: restored when it stops
            restored += self._restore(entry, manual=self.netns_state(tuner, entry.cookie) == MANUAL)
        return restored

    def release(self, tuner: Tuner) -> int:
        """A tuner stops: restore the tunables it declares ``restore_on_stop``
        (state it sets up only while it runs), -R or not."""
        names = {t.name for t in tuner.tunables if t.restore_on_stop}
        restored = 0
        for entry in self._entries_of(tuner):
            if entry.tunable.name in names:
                entry.tuners.discard(tuner.name)
                if not entry.tuners:
                    restored += self._restore(entry, manual=self.netns_state(tuner, entry.cookie) == MANUAL)
        return restored

    def rollback_all(self) -> int:
        """Restore every entry still journaled (a -R exit, after every tuner
        stopped: what earlier daemons or removed tuners changed)."""
        manual = {c for (_name, c), state in self._netns_state.items() if state == MANUAL}
        return sum(self._restore(e, manual=e.cookie in manual and not e.tuners) for e in list(self._entries.values()))

    def _restore(self, entry: Entry, manual: bool = False) -> int:
        """Put one original back, if what is there is still ours; journal the
        outcome only once it is certain.  1 if it wrote."""
        where = self.namespaces.describe(entry.cookie)
        name = entry.tunable.name
        if manual:
            log.info("leaving %s in %s as the administrator set it (tuning there was handed over)", name, where)
            self._close(entry, "left")
            return 0
        try:
            current = self.setter(entry.tunable).read(name, entry.cookie)
        except (NetnsGone, SysctlMissing):
            self._close(entry, "gone")
            return 0
        except (OSError, PybpftuneError) as exc:
            log.warning("could not read %s in %s to restore it: %s", name, where, exc)
            return 0
        if same(current, entry.original):
            self._close(entry, "restored")
            return 0
        if entry.written is not None and not same(current, entry.written):
            self._left(entry, current)
            return 0
        log.info(
            "Rolling back %s values for '%s' from (%s) to original values (%s) in %s...",
            "sysctl" if entry.tunable.is_sysctl else "tunable",
            name,
            describe(current),
            describe(entry.original),
            where,
        )
        try:
            self.setter(entry.tunable).write(name, entry.original, entry.cookie)
        except (NetnsGone, SysctlMissing):
            self._close(entry, "gone")
            return 0
        except (OSError, PybpftuneError) as exc:
            # Stays journaled: the next start (or bpftune --restore) tries again.
            log.warning("could not restore %s in %s: %s", name, where, getattr(exc, "strerror", None) or exc)
            return 0
        self._close(entry, "restored")
        return 1

    def _left(self, entry: Entry, current: Value) -> None:
        if entry.key not in self._left_said:
            self._left_said.add(entry.key)
            log.info(
                "not restoring %s in %s: it is (%s), not the (%s) we wrote; someone else changed it, so it stays",
                entry.tunable.name,
                self.namespaces.describe(entry.cookie),
                describe(current),
                describe(entry.written) if entry.written is not None else "?",
            )
        self._close(entry, "left")

    def _close(self, entry: Entry, how: str) -> None:
        if self._entries.pop(entry.key, None) is not None and self.journal is not None:
            try:
                self.journal.done(entry, how)
            except OSError as exc:
                log.warning("cannot journal that %s is %s: %s", entry.tunable.name, how, exc)

    def _forget(self, entry: Entry) -> None:
        self._close(entry, "failed")

    # --- a dead daemon's journal -----------------------------------------------------------

    def load_journal(self, known: Mapping[str, Tunable]) -> list[Pending]:
        """What the state directory's journal says is pending, checked against
        the tunables ``known`` (name -> declaration); every problem is one
        warning, never an exception."""
        if self.state is None or self.journal is None:
            return []
        from .journal import replay

        def declared(kind: str, name: str) -> bool:
            t = known.get(name)
            return t is not None and _journal_kind(t) == kind

        rep = replay(self.state.read_journal(), self.journal.boot, declared)
        self.journal.seq = max(self.journal.seq, rep.last_seq + 1)
        if rep.corrupt:
            log.warning(
                "skipped %d corrupt line(s) in the journal %s (%s)",
                rep.corrupt,
                self.state.journal_path,
                "; ".join(rep.problems),
            )
        if rep.other_boot:
            log.info("%d journal record(s) from an earlier boot are void: sysctls reset at boot", rep.other_boot)
        if rep.undeclared:
            log.warning(
                "the journal names tunables no loaded tuner declares (%s): they are kept but not restored",
                ", ".join(sorted(rep.undeclared)[:5]),
            )
        self._foreign = rep.foreign
        self._journal_read = True
        return rep.pending

    def recover(self, pending: Iterable[Pending], declared: Callable[[str], Tunable | None], restore: bool) -> int:
        """Take over what a dead daemon journaled, in the order written.

        With ``restore`` (-R, --restore) each original whose value is still
        ours is written back; without, it is adopted: it stays the original
        until restored.  A value someone else changed since is left alone
        (said once); an original already back, or whose namespace is gone,
        is dropped.  The journal is then rewritten to say exactly what
        stays.  Returns how many values were written back."""
        restored = 0
        for p in pending:
            t = declared(p.tunable)
            if t is None:
                continue
            cookie = self.namespaces.global_cookie if p.global_ns else p.netns_cookie
            entry = Entry(t, cookie, p.global_ns, p.original, p.written[-1] if p.written else None, owner=p.tuner)
            if cookie in self._gone_logged or entry.key in self._entries:
                continue
            try:
                current = self.setter(t).read(t.name, cookie)
            except (NetnsGone, SysctlMissing):
                log.info("not restoring %s in %s: it no longer exists", t.name, p.where())
                continue
            except (OSError, PybpftuneError) as exc:
                log.warning("cannot read %s in %s: %s; it stays journaled", t.name, p.where(), exc)
                self._entries[entry.key] = entry
                continue
            if same(current, p.original):
                continue
            if not p.ours(current):
                self._entries[entry.key] = entry
                self._left(entry, current)
                continue
            entry.written = current
            self._entries[entry.key] = entry
            if restore:
                restored += self._restore(entry)
            else:
                log.info(
                    "%s in %s stays (%s); its original (%s), journaled by an earlier daemon, is kept for -R",
                    t.name,
                    p.where(),
                    describe(current),
                    describe(p.original),
                )
        self.compact()
        return restored

    def compact(self) -> None:
        """Rewrite the journal to hold exactly what is pending (none: remove it)."""
        if self.journal is not None and not self.advice and self._journal_read:
            self.journal.rewrite(self._entries.values(), self._foreign)

    def close(self) -> None:
        """The daemon ends: the journal keeps what was not restored."""
        if self.journal is not None and not self.advice:
            try:
                self.compact()
            except OSError as exc:
                log.warning("cannot rewrite the journal: %s; it stays as it was", exc)
        if self.state is not None:
            self.state.close()

    def pending(self) -> list[Pending]:
        return [e.pending() for e in self._entries.values()]

    # --- read-only views (metrics; safe to call from another thread) -------------------
    # Each view copies the containers it walks (a C-level copy under the GIL), so
    # a concurrent change on the event loop's thread cannot break the walk.

    def change_counts(self) -> list[tuple[str, str, int, bool, int]]:
        """(tuner, tunable, scenario id, global ns?, changes) for every scenario counted."""
        out = []
        for (tuner_name, tid), counts in list(self._counts.items()):
            t = self._declared.get((tuner_name, tid))
            if t is None:
                continue
            for (scenario, is_global), n in list(counts.items()):
                out.append((tuner_name, t.name, scenario, is_global, n))
        return out

    def namespace_values(self) -> list[tuple[str, Tunable, int, Values]]:
        """(tuner, tunable, netns cookie, values) this daemon last wrote, per namespace."""
        out: list[tuple[str, Tunable, int, Values]] = []
        for e in list(self._entries.values()):
            written = e.written
            if written is not None and not isinstance(written, str):
                out.extend((name, e.tunable, e.cookie, written) for name in sorted(e.tuners) or [e.owner])
        return out

    def tunables(self) -> list[tuple[str, Tunable]]:
        """(tuner, tunable) for every registered tunable."""
        return [(tuner_name, t) for (tuner_name, _tid), t in list(self._declared.items())]

    def netns_states(self) -> dict[tuple[str, int], str]:
        """(tuner, netns cookie) -> state, for namespaces not plainly active."""
        return dict(self._netns_state)

    def changed(self, tuner: Tuner) -> bool:
        return bool(self._entries_of(tuner))


def _changed_by(entry: Entry, tuner: Tuner) -> bool:
    """Is the change this tuner's: it wrote it, or an earlier daemon's same
    tuner did and nobody has written it since (adopted from the journal)?"""
    return tuner.name in entry.tuners or (not entry.tuners and entry.owner == tuner.name)


def _journal_kind(t: Tunable) -> str:
    return t.kind if t.kind in ("sysctl", "string") else "custom"


def _tuple(value: Value) -> tuple[int | str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)
