"""The tunable store: every change any tuner makes goes through ``apply``.

It knows, for each (tuner, tunable, namespace): the original value (journaled
durably before the first write), the bounds, whether the tuner is still
allowed to act there (an administrator's write turns it off for that
namespace only), and why the change is made.  It logs bpftune's "what" and
"why" lines, counts every scenario for the summary, and in advice mode
proposes without writing.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import Limits, TunableLimits
from .errors import TunerError
from .history import Change, History, now
from .netns import Namespaces, NetnsGone
from .state import JournalEntry, StateDir
from .sysctl import SysctlBackend, SysctlMissing, format_values

if TYPE_CHECKING:
    from .tuner import Proposal, Tunable, Tuner

log = logging.getLogger("pybpftune")

ACTIVE, MANUAL, GONE = "active", "manual", "gone"
REPLICATE = "# To replicate this change on another system, run the following as a privileged user in a terminal:"
Values = tuple[int, ...]


@dataclass
class TunableRecord:
    """Everything known about one tunable of one tuner."""

    tunable: Tunable
    initial: Values | None = None  # global namespace, read at registration
    initial_text: str | None = None  # the same for a string sysctl
    originals: dict[int, Values] = field(default_factory=dict)  # per namespace cookie
    written: dict[int, Values] = field(default_factory=dict)  # last value we wrote, per cookie
    counts: Counter[tuple[int, bool]] = field(default_factory=Counter)  # (scenario, global?) -> n
    original_texts: dict[int, str] = field(default_factory=dict)  # string sysctls, per cookie
    written_texts: dict[int, str] = field(default_factory=dict)


def bounded(tunable: Tunable, old: Values, new: Values, limits: Limits | None = None) -> Values:
    """``new`` within the tunable's hard bounds and the operator's limits.

    The hard bounds always hold.  A configured cap stops growth and a floor
    stops shrinking, but neither moves a value on its own: a value already
    beyond one (an administrator's choice) is left where it is rather than
    pulled back by a change the tuner never proposed."""
    out = []
    for i, v in enumerate(new):
        if tunable.lower is not None:
            v = max(v, tunable.lower)
        if tunable.upper is not None:
            v = min(v, tunable.upper)
        o = old[i] if i < len(old) else v
        if limits is not None:
            cap, floor = limits.cap_at(i), limits.floor_at(i)
            if cap is not None and v > o and v > cap:
                v = max(o, cap)
            if floor is not None and v < o and v < floor:
                v = min(o, floor)
        out.append(v)
    return tuple(out)


@dataclass(frozen=True)
class _TextProposal:
    """What _log_change needs of a string sysctl change."""

    tunable: int
    scenario: int
    netns_cookie: int
    reason: str


def _plain(values: tuple[int | str, ...]) -> str:
    return " ".join(str(v) for v in values)


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
        self.advice = advice
        self._limits: Mapping[str, TunableLimits] = dict(limits or {})
        self._held_said: set[tuple[str, str, int]] = set()
        self.history = History()
        self._records: dict[tuple[str, int], TunableRecord] = {}
        self._netns_state: dict[tuple[str, int], str] = {}
        self._gone_logged: set[int] = set()

    # --- registration and reads ----------------------------------------------------

    def register(self, tuner: Tuner) -> None:
        """Read every sysctl tunable's initial (global) value.  A tuner started
        again (disabled and re-enabled by a reload) keeps its records, so the
        originals it journaled stay the ones restored."""
        for t in tuner.tunables:
            if (tuner.name, t.id) in self._records:
                continue
            rec = TunableRecord(t)
            if t.kind == "string":
                try:
                    rec.initial_text = self.backend.read_text(t.name)
                except SysctlMissing:
                    if not t.optional:
                        raise TunerError(f"tuner {tuner.name}: sysctl {t.name} does not exist") from None
            elif t.kind == "sysctl":
                try:
                    rec.initial = self.backend.read(t.name)
                except SysctlMissing:
                    if not t.optional:
                        raise TunerError(f"tuner {tuner.name}: sysctl {t.name} does not exist") from None
                if rec.initial is not None and len(rec.initial) != t.num_values:
                    raise TunerError(
                        f"tuner {tuner.name}: {t.name} has {len(rec.initial)} values, expected {t.num_values}"
                    )
            old = self._records.get((tuner.name, t.id))
            if old is not None and old.tunable.name == t.name:
                # The same tuner started again (a plugin file replaced or added
                # back): what it changed before keeps its true original.
                rec.initial, rec.initial_text = old.initial, old.initial_text
                rec.originals, rec.written = old.originals, old.written
                rec.original_texts, rec.written_texts = old.original_texts, old.written_texts
            self._records[(tuner.name, t.id)] = rec

    def record(self, tuner: Tuner, tunable_id: int) -> TunableRecord:
        try:
            return self._records[(tuner.name, tunable_id)]
        except KeyError:
            raise TunerError(f"tuner {tuner.name} has no registered tunable {tunable_id}") from None

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
        """``new`` within the hard bounds and configured limits (for tuners
        that write by other means, e.g. netlink, before they do)."""
        t = tuner.tunable(tunable_id)
        return self._bounded(tuner, t, self._cookie(t, netns_cookie), old, new)

    def _bounded(self, tuner: Tuner, t: Tunable, cookie: int, old: Values, new: Values) -> Values:
        limits = self.limits_for(t, cookie)
        out = bounded(t, old, new, limits)
        if limits is not None and out != bounded(t, old, new):
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
        return self.backend.read(t.name, self._cookie(t, netns_cookie))

    def written(self, tuner: Tuner, tunable_id: int, netns_cookie: int | None) -> Values | None:
        """The value last written for this tunable in that namespace, if any."""
        t = tuner.tunable(tunable_id)
        return self.record(tuner, tunable_id).written.get(self._cookie(t, netns_cookie))

    def current_text(self, tuner: Tuner, tunable_id: int, netns_cookie: int | None = None) -> str:
        t = tuner.tunable(tunable_id)
        return self.backend.read_text(t.name, self._cookie(t, netns_cookie))

    # --- views for queries ---------------------------------------------------------------

    def counts(self, tuner: Tuner) -> list[tuple[str, str, bool, int]]:
        """(tunable, scenario, global namespace?, times) for every scenario seen."""
        out = []
        for t in tuner.tunables:
            rec = self._records.get((tuner.name, t.id))
            if rec is None:
                continue
            for (scenario_id, is_global), n in sorted(rec.counts.items()):
                out.append((t.name, tuner.scenario(scenario_id).name, is_global, n))
        return out

    def changed_values(self, tuner: Tuner) -> list[tuple[Tunable, int, tuple[int | str, ...], tuple[int | str, ...]]]:
        """(tunable, namespace cookie, original, last written) of every sysctl
        this tuner changed, in namespaces that still exist."""
        out: list[tuple[Tunable, int, tuple[int | str, ...], tuple[int | str, ...]]] = []
        for t in tuner.tunables:
            rec = self._records.get((tuner.name, t.id))
            if rec is None:
                continue
            for cookie, original in rec.originals.items():
                if cookie in rec.written and self.netns_state(tuner, cookie) != GONE:
                    out.append((t, cookie, original, rec.written[cookie]))
            for cookie, text in rec.original_texts.items():
                if cookie in rec.written_texts and self.netns_state(tuner, cookie) != GONE:
                    out.append((t, cookie, (text,), (rec.written_texts[cookie],)))
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

    def mark_gone(self, netns_cookie: int, why: str) -> None:
        """A namespace vanished: forget it for every tuner, say so once."""
        for (tuner_name, cookie), _state in list(self._netns_state.items()):
            if cookie == netns_cookie:
                self._netns_state[(tuner_name, cookie)] = GONE
        self.namespaces.mark_gone(netns_cookie)
        for rec in self._records.values():
            rec.originals.pop(netns_cookie, None)
            rec.written.pop(netns_cookie, None)
            rec.original_texts.pop(netns_cookie, None)
            rec.written_texts.pop(netns_cookie, None)
        self.history.forget_namespace(netns_cookie)
        if netns_cookie not in self._gone_logged:
            self._gone_logged.add(netns_cookie)
            log.info("network namespace (cookie %d) is gone: %s", netns_cookie, why)

    # --- the write path --------------------------------------------------------------

    def apply(self, tuner: Tuner, proposal: Proposal) -> bool:
        """Carry out one proposal; True if the tunable changed."""
        t = tuner.tunable(proposal.tunable)
        rec = self.record(tuner, proposal.tunable)
        cookie = self._cookie(t, proposal.netns_cookie)
        if self.netns_state(tuner, cookie) != ACTIVE:
            log.debug("Skipping update of %s: '%s' is disabled in netns cookie %d", t.name, tuner.name, cookie)
            return False
        if not t.is_sysctl:
            raise TunerError(f"{t.name} is not a sysctl; use TunableStore.note for it")
        if len(proposal.new) != t.num_values:
            raise TunerError(f"proposal for {t.name} has {len(proposal.new)} values, expected {t.num_values}")
        try:
            old = self.backend.read(t.name, cookie)
        except NetnsGone as exc:
            self.mark_gone(cookie, str(exc))
            return False
        except SysctlMissing:
            return False
        new = self._bounded(tuner, t, cookie, old, proposal.new)
        if new == old:
            return False
        if cookie not in rec.originals:
            rec.originals[cookie] = old
            if self.state is not None and not self.advice:
                self.state.record_original(
                    JournalEntry(os.getpid(), tuner.name, t.name, cookie, self.namespaces.is_global(cookie), old)
                )
        if self.advice:
            self._log_change(tuner, t, proposal, cookie, old, new, advice=True)
            rec.counts[(proposal.scenario, self.namespaces.is_global(cookie))] += 1
            return False
        try:
            self.backend.write(t.name, new, cookie)
        except NetnsGone as exc:
            self.mark_gone(cookie, str(exc))
            return False
        except OSError as exc:
            log.warning("could not set %s to (%s): %s", t.name, format_values(new), exc.strerror or exc)
            return False
        rec.written[cookie] = new
        rec.counts[(proposal.scenario, self.namespaces.is_global(cookie))] += 1
        self._log_change(tuner, t, proposal, cookie, old, new)
        return True

    def apply_text(
        self, tuner: Tuner, tunable_id: int, scenario: int, netns_cookie: int | None, text: str, reason: str
    ) -> bool:
        """Set a string sysctl (e.g. a list of congestion controls); True if it changed."""
        t = tuner.tunable(tunable_id)
        if t.kind != "string":
            raise TunerError(f"{t.name} is not a string sysctl")
        rec = self.record(tuner, tunable_id)
        cookie = self._cookie(t, netns_cookie)
        if self.netns_state(tuner, cookie) != ACTIVE:
            log.debug("Skipping update of %s: '%s' is disabled in netns cookie %d", t.name, tuner.name, cookie)
            return False
        try:
            old = self.backend.read_text(t.name, cookie)
        except NetnsGone as exc:
            self.mark_gone(cookie, str(exc))
            return False
        except SysctlMissing:
            return False
        new = " ".join(text.split())
        if new == " ".join(old.split()):
            return False
        if cookie not in rec.original_texts:
            rec.original_texts[cookie] = old
            if self.state is not None and not self.advice:
                self.state.record_original(
                    JournalEntry(
                        os.getpid(), tuner.name, t.name, cookie, self.namespaces.is_global(cookie), original_text=old
                    )
                )
        proposal = _TextProposal(tunable_id, scenario, cookie, reason)
        if self.advice:
            self._log_change(tuner, t, proposal, cookie, (old,), (new,), advice=True)  # type: ignore[arg-type]
            rec.counts[(scenario, self.namespaces.is_global(cookie))] += 1
            return False
        try:
            self.backend.write_text(t.name, new, cookie)
        except NetnsGone as exc:
            self.mark_gone(cookie, str(exc))
            return False
        except OSError as exc:
            log.warning("could not set %s to (%s): %s", t.name, new, exc.strerror or exc)
            return False
        rec.written_texts[cookie] = new
        rec.counts[(scenario, self.namespaces.is_global(cookie))] += 1
        self._log_change(tuner, t, proposal, cookie, (old,), (new,))  # type: ignore[arg-type]
        return True

    def note(self, tuner: Tuner, proposal: Proposal, old: Values) -> None:
        """Log and count a change made by other means (netlink, per socket)."""
        t = tuner.tunable(proposal.tunable)
        rec = self.record(tuner, proposal.tunable)
        cookie = self._cookie(t, proposal.netns_cookie)
        rec.counts[(proposal.scenario, self.namespaces.is_global(cookie))] += 1
        self._log_change(tuner, t, proposal, cookie, old, proposal.new, advice=self.advice)

    def note_text(
        self, tuner: Tuner, tunable_id: int, scenario: int, netns_cookie: int, old: str, new: str, reason: str
    ) -> None:
        """Log and count a textual change made by other means (a connection's
        congestion control, set by BPF)."""
        t = tuner.tunable(tunable_id)
        rec = self.record(tuner, tunable_id)
        cookie = self._cookie(t, netns_cookie)
        rec.counts[(scenario, self.namespaces.is_global(cookie))] += 1
        proposal = _TextProposal(tunable_id, scenario, cookie, reason)
        self._log_change(tuner, t, proposal, cookie, (old,), (new,), advice=self.advice)  # type: ignore[arg-type]

    def _log_change(
        self,
        tuner: Tuner,
        t: Tunable,
        p: Proposal,
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

    # --- summary and rollback ------------------------------------------------------------

    def summary(self, tuner: Tuner) -> list[str]:
        lines: list[str] = []
        for t in tuner.tunables:
            rec = self._records.get((tuner.name, t.id))
            if rec is None:
                continue
            for (scenario_id, is_global), n in sorted(rec.counts.items()):
                s = tuner.scenario(scenario_id)
                where = "global ns" if is_global else "non-global ns"
                head = f"# Summary: scenario '{s.name}' occurred {n} times for tunable '{t.name}'"
                lines.append(f"{head} in {where}. {s.description}")
            glob = self.namespaces.global_cookie
            if t.kind == "string" and glob in rec.original_texts and glob in rec.written_texts:
                lines.append(
                    f"# sysctl '{t.name}' changed from ({rec.original_texts[glob]}) -> ({rec.written_texts[glob]})"
                )
            if t.is_sysctl and glob in rec.originals and glob in rec.written:
                current = rec.written[glob]
                before = format_values(rec.originals[glob])
                lines.append(f"# sysctl '{t.name}' changed from ({before}) -> ({format_values(current)})")
                lines.append(REPLICATE)
                lines.append(f'sysctl -w {t.name}="{format_values(current)}"')
        return lines

    def rollback(self, tuner: Tuner) -> int:
        """Restore every original this tuner changed, where it still exists."""
        restored = 0
        for t in tuner.tunables:
            rec = self._records.get((tuner.name, t.id))
            if rec is None or not t.is_sysctl:
                continue
            text = t.kind == "string"
            originals: dict[int, Values | str] = dict(rec.original_texts if text else rec.originals)
            written = rec.written_texts if text else rec.written
            for cookie, original in originals.items():
                if cookie not in written or self.netns_state(tuner, cookie) == GONE:
                    continue
                try:
                    restored += self._restore(t.name, original, cookie)
                except (NetnsGone, SysctlMissing, OSError) as exc:
                    log.info("could not roll back %s in netns cookie %d: %s", t.name, cookie, exc)
        return restored

    def _restore(self, name: str, original: Values | str, cookie: int) -> bool:
        """Write ``original`` back unless it is already there (tcp_conn, for
        one, puts its list back on every exit); True if it wrote."""
        if isinstance(original, str):
            current_text = self.backend.read_text(name, cookie)
            if current_text.split() == original.split():
                return False
            shown = (current_text, original)
        else:
            current = self.backend.read(name, cookie)
            if tuple(current) == tuple(original):
                return False
            shown = (format_values(current), format_values(original))
        log.info(
            "Rolling back sysctl values for '%s' from (%s) to original values (%s) in %s...",
            name,
            *shown,
            self.namespaces.describe(cookie),
        )
        if isinstance(original, str):
            self.backend.write_text(name, original, cookie)
        else:
            self.backend.write(name, original, cookie)
        return True

    # --- read-only views (metrics; safe to call from another thread) -------------------
    # Each view copies the containers it walks (a C-level copy under the GIL), so
    # a concurrent change on the event loop's thread cannot break the walk.

    def change_counts(self) -> list[tuple[str, str, int, bool, int]]:
        """(tuner, tunable, scenario id, global ns?, changes) for every scenario counted."""
        out = []
        for (tuner_name, _tid), rec in list(self._records.items()):
            for (scenario, is_global), n in list(rec.counts.items()):
                out.append((tuner_name, rec.tunable.name, scenario, is_global, n))
        return out

    def namespace_values(self) -> list[tuple[str, Tunable, int, Values]]:
        """(tuner, tunable, netns cookie, values) this daemon last wrote, per namespace."""
        out = []
        for (tuner_name, _tid), rec in list(self._records.items()):
            for cookie, values in list(rec.written.items()):
                out.append((tuner_name, rec.tunable, cookie, values))
        return out

    def tunables(self) -> list[tuple[str, Tunable]]:
        """(tuner, tunable) for every registered tunable."""
        return [(tuner_name, rec.tunable) for (tuner_name, _tid), rec in list(self._records.items())]

    def netns_states(self) -> dict[tuple[str, int], str]:
        """(tuner, netns cookie) -> state, for namespaces not plainly active."""
        return dict(self._netns_state)

    def changed(self, tuner: Tuner) -> bool:
        return any(rec.written or rec.written_texts for (name, _), rec in self._records.items() if name == tuner.name)
