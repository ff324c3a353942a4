"""The query protocol: what a client may ask a running daemon, and the replies.

On the wire (Unix socket, or bpftune's loopback TCP port): the client sends
the request name, ended by NUL, newline or end of stream; the daemon sends
the reply text followed by one NUL and closes, as bpftune does.  Request
names and text layouts are bpftune's (``help``, ``tuners``, ``tunables``,
``jtunables``, ``status``, ``jstatus``, ``summary``, ``rollback``), so
scripts written for bpftune keep working; pybpftune adds ``changes`` and
``advice``, and a JSON form of every request: ``j`` + its name.  JSON
replies are built with :mod:`json`, so they are valid whatever the tunables
(bpftune's hand-made ``jstatus`` is not when the last tunable is not a
sysctl).  The schema of each JSON reply is in docs/querying.md.

Everything here is pure: it renders what a :class:`View` (the daemon) hands
it, so the request parser and the renderers are unit-tested and fuzzed
without a daemon.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .history import Advice, Change, History
from .server import MAX_REQUEST, REFUSED

REQUESTS: dict[str, str] = {
    "help": "list the requests this daemon answers",
    "tuners": "each tuner and its state",
    "tunables": "each tuner's tunables, their type and number of values",
    "status": "current values of the sysctls the tuners use, event counters, variant, signals",
    "summary": "the changes made so far, as in the exit summary",
    "rollback": "the commands that would restore every changed sysctl",
    "changes": "every change: time, tuner, scenario, namespace, old, new, reason",
    "advice": "current advice (advice mode): the latest value per tunable and namespace",
}
# The JSON form of every request is "j" + its name (bpftune has jtunables and jstatus).
JSON_PREFIX = "j"
SUMMARY_HEADER = "# Summary of changes made across all tuners:"
ROLLBACK_HEADER = "# Summary of rollback operations needed to restore the original sysctl values:"
UNKNOWN = "unknown request"


@dataclass(frozen=True)
class Request:
    name: str  # a key of REQUESTS, or the text received for an unknown request
    json: bool = False

    @property
    def known(self) -> bool:
        return self.name in REQUESTS


def parse_request(data: bytes) -> Request:
    """The request in the first line of ``data`` (up to NUL or newline).

    Hostile input is fine: at most MAX_REQUEST bytes are looked at, anything
    that is not a request name is an unknown request (its text shown safely)."""
    data = data[:MAX_REQUEST]
    for sep in (b"\0", b"\n"):
        data = data.split(sep, 1)[0]
    text = data.decode("ascii", errors="replace").strip()
    if text in REQUESTS:
        return Request(text)
    if text.startswith(JSON_PREFIX):
        # Known or not, a JSON request gets a JSON reply (an error object).
        return Request(text[1:] if text[1:] in REQUESTS else printable(text[1:]), json=True)
    return Request(printable(text))


def printable(text: str, limit: int = 80) -> str:
    out = "".join(c if c.isprintable() and c != "\ufffd" else "?" for c in text[:limit])
    return out + ("..." if len(text) > limit else "")


# --- what the daemon hands the renderers -------------------------------------------------


@dataclass(frozen=True)
class SignalState:
    """How one kernel signal of a tuner is observed here."""

    signal: str
    kind: str  # tracepoint, fentry, kprobe, cgroup, sockops, ... or none
    form: str | None = None  # the program form chosen (tp_btf, raw_tp, fentry, kprobe, ...)
    reason: str = ""  # why not (kind none), or why not the preferred forms


@dataclass(frozen=True)
class TunableInfo:
    name: str
    type: str  # "integer" or "string"
    num_values: int
    namespaced: bool
    sysctl: bool


@dataclass(frozen=True)
class TunerState:
    name: str
    state: str  # active, manual (an administrator took over the global namespace), inactive
    reason: str = ""  # why inactive
    signals: tuple[SignalState, ...] = ()
    tunables: tuple[TunableInfo, ...] = ()


@dataclass(frozen=True)
class TunableValue:
    tuner: str
    tunable: str
    values: tuple[int | str, ...]


@dataclass(frozen=True)
class SummaryCount:
    tuner: str
    tunable: str
    scenario: str
    global_ns: bool
    count: int


@dataclass(frozen=True)
class RollbackItem:
    tuner: str
    tunable: str
    netns_cookie: int
    global_ns: bool
    current: tuple[int | str, ...]
    original: tuple[int | str, ...]
    command: str | None  # None: no path to that namespace is known


@dataclass(frozen=True)
class DaemonInfo:
    version: str
    pid: int
    started: float  # epoch seconds
    level: str  # support level, as -S says it: full, legacy
    variant: str  # the variant loaded: full or legacy
    variant_reason: str  # the line -S prints after bpftune's
    netns_policy: bool
    advice: bool
    learning_rate: int
    config: str | None  # configuration file in use
    limits: str = ""  # the configured floors and caps, as the reload log line says them
    events_received: int = 0
    events_dropped: int = 0  # the BPF side could not reserve ring-buffer space
    events_malformed: int = 0
    events_unknown: int = 0  # for a tuner id nobody registered


class View(Protocol):
    """What the renderers read; the daemon implements it from its store."""

    @property
    def history(self) -> History: ...

    def info(self) -> DaemonInfo: ...
    def tuner_states(self) -> list[TunerState]: ...
    def tunable_values(self) -> list[TunableValue]: ...
    def summary(self) -> tuple[list[str], list[SummaryCount]]: ...
    def rollback_items(self) -> list[RollbackItem]: ...


# --- rendering ---------------------------------------------------------------------------------


def answer(view: View, request: Request) -> str:
    """The reply text for ``request`` (JSON text for a JSON request)."""
    if not request.known:
        return _unknown(request)
    text, js = RENDERERS[request.name]
    if request.json:
        return json.dumps(js(view), indent=1, sort_keys=False) + "\n"
    return text(view)


def _unknown(request: Request) -> str:
    name = (JSON_PREFIX if request.json else "") + request.name
    if request.json:
        return json.dumps({"error": f"{UNKNOWN} '{name}'", "requests": list(REQUESTS)}) + "\n"
    return f"{UNKNOWN} '{name}'; supported requests are:\n" + _help_text()


def _help_text(view: View | None = None) -> str:
    return "".join(f"{name:>20} {desc:>40}\n" for name, desc in REQUESTS.items())


def _help_json(view: View) -> dict[str, Any]:
    return {"requests": dict(REQUESTS), "json": "prefix any request with 'j' (jstatus) for its JSON form"}


def _tuners_text(view: View) -> str:
    return "".join(f"{t.name:>20} {t.state:>20}\n" for t in view.tuner_states())


def _tuners_json(view: View) -> dict[str, Any]:
    return {
        t.name: {
            "state": t.state,
            "reason": t.reason,
            "signals": {s.signal: {"kind": s.kind, "form": s.form, "reason": s.reason} for s in t.signals},
        }
        for t in view.tuner_states()
    }


def _tunables_text(view: View) -> str:
    return "".join(
        f"{t.name:>16} {u.name:>50} {u.type:>8} {u.num_values:>2}\n" for t in view.tuner_states() for u in t.tunables
    )


def _tunables_json(view: View) -> dict[str, Any]:
    # bpftune's shape ({tuner: {tunable: {type, num_values}}}), two keys more.
    return {
        t.name: {
            u.name: {"type": u.type, "num_values": u.num_values, "namespaced": u.namespaced, "sysctl": u.sysctl}
            for u in t.tunables
        }
        for t in view.tuner_states()
    }


def _value_text(values: Sequence[int | str]) -> str:
    return " ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in values)


def _status_text(view: View) -> str:
    lines = [f"{v.tuner:>16} {v.tunable:>50} {_value_text(v.values)}" for v in view.tunable_values()]
    info = view.info()
    lines.append(f"# pybpftune {info.version} (pid {info.pid}), {info.variant_reason}")
    lines.append(
        f"# events: {info.events_received} received, {info.events_dropped} dropped by the ring buffer, "
        f"{info.events_malformed} malformed, {info.events_unknown} for an unknown tuner"
    )
    mode = "advice mode (nothing is written)" if info.advice else "tuning"
    lines.append(f"# {mode}, learning rate {info.learning_rate}, configuration {info.config or 'none'}")
    lines.append(f"# limits: {info.limits or 'none'}")
    for t in view.tuner_states():
        signals = ", ".join(f"{s.signal} {s.kind}" for s in t.signals) or "none"
        why = f" ({t.reason})" if t.reason else ""
        lines.append(f"# tuner {t.name}: {t.state}{why}; signals: {signals}")
    return "".join(line + "\n" for line in lines)


def _status_json(view: View) -> dict[str, Any]:
    # bpftune's shape ({tuner: {sysctl: value | [values] | "text"}}), read by
    # its PCP agent: one value as a number, several as a list.  pybpftune's
    # own figures sit under "pybpftune", flat numbers and strings only, so the
    # same agent turns them into metrics instead of tripping over them.
    out: dict[str, dict[str, Any]] = {}
    for v in view.tunable_values():
        value: Any = v.values[0] if len(v.values) == 1 else list(v.values)
        out.setdefault(v.tuner, {})[v.tunable] = value
    info = view.info()
    own: dict[str, Any] = {
        "version": info.version,
        "pid": info.pid,
        "started": round(info.started),
        "support_level": info.level,
        "variant": info.variant,
        "variant_reason": info.variant_reason,
        "netns_policy": int(info.netns_policy),
        "advice": int(info.advice),
        "learning_rate": info.learning_rate,
        "config": info.config or "",
        "limits": info.limits,
        "events_received": info.events_received,
        "events_dropped": info.events_dropped,
        "events_malformed": info.events_malformed,
        "events_unknown": info.events_unknown,
    }
    for t in view.tuner_states():
        own[f"tuner.{t.name}.state"] = t.state
        own[f"tuner.{t.name}.signals"] = " ".join(f"{s.signal}={s.kind}" for s in t.signals)
    out["pybpftune"] = own
    return out


def _summary_text(view: View) -> str:
    lines, _counts = view.summary()
    return "".join(line + "\n" for line in [SUMMARY_HEADER, *lines])


def _summary_json(view: View) -> dict[str, Any]:
    lines, counts = view.summary()
    return {
        "scenarios": [
            {"tuner": c.tuner, "tunable": c.tunable, "scenario": c.scenario, "global_ns": c.global_ns, "count": c.count}
            for c in counts
        ],
        "lines": lines,
    }


def _where(global_ns: bool, cookie: int) -> str:
    return "global ns" if global_ns else f"non-global ns (cookie {cookie})"


def _rollback_text(view: View) -> str:
    lines = [ROLLBACK_HEADER]
    for r in view.rollback_items():
        lines.append(
            f"# sysctl '{r.tunable}' changed from ({_plain(r.original)}) -> ({_plain(r.current)}) "
            f"in {_where(r.global_ns, r.netns_cookie)} by {r.tuner}; to restore it:"
        )
        lines.append(r.command or "# (no command: no path to that namespace is known)")
    return "".join(line + "\n" for line in lines)


def _rollback_json(view: View) -> dict[str, Any]:
    return {
        "rollback": [
            {
                "tuner": r.tuner,
                "tunable": r.tunable,
                "netns_cookie": r.netns_cookie,
                "global_ns": r.global_ns,
                "current": list(r.current),
                "original": list(r.original),
                "command": r.command,
            }
            for r in view.rollback_items()
        ]
    }


def _plain(values: Sequence[int | str]) -> str:
    return " ".join(str(v) for v in values)


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def _change_json(c: Change) -> dict[str, Any]:
    return {
        "time": round(c.time, 3),
        "tuner": c.tuner,
        "tunable": c.tunable,
        "scenario": c.scenario,
        "netns_cookie": c.netns_cookie,
        "global_ns": c.global_ns,
        "old": list(c.old),
        "new": list(c.new),
        "reason": c.reason,
        "advice": c.advice,
        "command": c.command,
    }


def _changes_text(view: View) -> str:
    history = view.history
    lines = []
    if history.forgotten:
        lines.append(f"# {history.forgotten} older changes are no longer kept")
    for c in history.changes:
        verb = "would change" if c.advice else "changed"
        lines.append(
            f"{_stamp(c.time)} {c.tuner} '{c.scenario}' in {c.where}: {verb} {c.tunable} "
            f"({_plain(c.old)}) -> ({_plain(c.new)}) due to {c.reason}"
        )
    if not history.changes:
        lines.append("# no changes yet")
    return "".join(line + "\n" for line in lines)


def _changes_json(view: View) -> dict[str, Any]:
    return {"changes": [_change_json(c) for c in view.history.changes], "forgotten": view.history.forgotten}


def _advice_text(view: View) -> str:
    advice = view.history.advice()
    lines = []
    if not advice:
        mode = view.info().advice
        lines.append("# no advice yet" if mode else "# no advice: the daemon is not in advice mode (see --advise)")
    for a in advice:
        c = a.latest
        lines.append(
            f"# {c.tuner}: '{c.scenario}' for {c.tunable} in {c.where}, {a.count} time(s) since {_stamp(a.first)}, "
            f"last at {_stamp(c.time)}: ({_plain(c.old)}) -> ({_plain(c.new)}) due to {c.reason}"
        )
        lines.append(c.command or f"# (no command: {c.tuner} sets {c.tunable} itself, per connection or namespace)")
    return "".join(line + "\n" for line in lines)


def _advice_entry(a: Advice) -> dict[str, Any]:
    entry = _change_json(a.latest)
    del entry["advice"]
    entry["count"] = a.count
    entry["first"] = round(a.first, 3)
    return entry


def _advice_json(view: View) -> dict[str, Any]:
    return {"advice_mode": view.info().advice, "advice": [_advice_entry(a) for a in view.history.advice()]}


Renderer = tuple[Callable[[View], str], Callable[[View], Any]]
RENDERERS: dict[str, Renderer] = {
    "help": (_help_text, _help_json),
    "tuners": (_tuners_text, _tuners_json),
    "tunables": (_tunables_text, _tunables_json),
    "status": (_status_text, _status_json),
    "summary": (_summary_text, _summary_json),
    "rollback": (_rollback_text, _rollback_json),
    "changes": (_changes_text, _changes_json),
    "advice": (_advice_text, _advice_json),
}


@dataclass
class Reply:
    """A reply as the client sees it: text, and whether it is an error."""

    text: str
    error: bool = field(default=False)


def classify(text: str, json_request: bool) -> Reply:
    """Tell an error reply (unknown request, refused) from an answer."""
    if text.startswith((UNKNOWN, REFUSED)):
        return Reply(text, True)
    if json_request and text.startswith('{"error"'):
        return Reply(text, True)
    return Reply(text)
