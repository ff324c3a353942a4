"""The journal of original values: what it records, and how it is read back.

One journal per state directory (``journal.jsonl``), written only while the
directory's lock is held (state.py), one JSON object a line, each line
fsync'ed before the write it announces:

``{"v": 2, "seq": 7, "op": "original", "boot": B, "kind": K, "tunable": T,``
``"netns": C, "global_ns": G, "tuner": N, "value": V}``
    the value of tunable T in namespace C before our first write there;
``{... "op": "wrote", ... "value": V}``
    the value we are about to write (or, after a failed write, the value
    that stayed);
``{... "op": "done", ..., "how": H}``
    the entry is closed: restored, left to an administrator who changed it,
    or its namespace is gone.

V is a list of integers for a numeric tunable and a string for a string
sysctl.  K is the tunable's kind ("sysctl", "string" or "custom": changed by
the tuner's own setter, e.g. neighbour-table thresholds over netlink).  B is
the kernel's boot id: sysctls reset at boot and namespace cookies are per
boot, so entries of an earlier boot are void.

Everything read back is hostile until checked: a line that is not valid UTF-8
and JSON, has the wrong shape, names a tunable no tuner declares, or carries a
value out of range is skipped, counted and reported in one warning; nothing in
the file can raise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

VERSION = 2
OPS = ("original", "wrote", "done")
KINDS = ("sysctl", "string", "custom")
DONE_HOW = ("restored", "left", "gone", "failed")
# Bounds on what one entry may carry.
MAX_LINE = 8192
MAX_VALUES = 16
MAX_TEXT = 4096
MAX_NAME = 256
# Intents kept per entry: the last write, and the one before in case the last
# never reached the kernel (killed between journal and write).
KEEP_WRITTEN = 2
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*")

Value = tuple[int, ...] | str
Key = tuple[str, int]  # (tunable name, netns cookie)


def boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()[:64]
    except OSError:
        return "unknown"


def valid_name(name: str) -> bool:
    """A sysctl-like dotted name: nothing that could leave /proc/sys."""
    return len(name) <= MAX_NAME and NAME_RE.fullmatch(name) is not None


@dataclass
class Pending:
    """An original not yet restored, as the journal tells it."""

    kind: str
    tunable: str
    netns_cookie: int
    global_ns: bool
    tuner: str
    original: Value
    written: list[Value] = field(default_factory=list)  # oldest first, at most KEEP_WRITTEN

    @property
    def key(self) -> Key:
        return (self.tunable, self.netns_cookie)

    def ours(self, current: Value) -> bool:
        """Is ``current`` a value we wrote (so restoring takes nothing from anyone)?"""
        return any(same(current, w) for w in self.written)

    def where(self) -> str:
        return "global ns" if self.global_ns else f"non-global ns (cookie {self.netns_cookie})"


def same(a: Value, b: Value) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a.split() == b.split()
    return tuple(a) == tuple(b)


def describe(value: Value) -> str:
    return value if isinstance(value, str) else " ".join(map(str, value))


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number here")


def _int(raw: object, lo: int, hi: int) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or not lo <= raw <= hi:
        raise ValueError("an integer out of range")
    return raw


def _value(kind: str, raw: object) -> Value:
    if kind == "string":
        if not isinstance(raw, str) or len(raw) > MAX_TEXT or not raw.isprintable():
            raise ValueError("a string value that is not printable text")
        return raw
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_VALUES:
        raise ValueError("a value that is not a list of integers")
    return tuple(_int(v, -(2**63), 2**64 - 1) for v in raw)


@dataclass(frozen=True)
class Record:
    """One checked journal line."""

    seq: int
    op: str
    boot: str
    kind: str
    tunable: str
    netns_cookie: int
    global_ns: bool
    tuner: str = ""
    value: Value | None = None
    how: str = ""

    def to_json(self) -> str:
        raw: dict[str, object] = {
            "v": VERSION,
            "seq": self.seq,
            "op": self.op,
            "boot": self.boot,
            "kind": self.kind,
            "tunable": self.tunable,
            "netns": self.netns_cookie,
            "global_ns": self.global_ns,
        }
        if self.tuner:
            raw["tuner"] = self.tuner
        if self.value is not None:
            raw["value"] = self.value if isinstance(self.value, str) else list(self.value)
        if self.how:
            raw["how"] = self.how
        return json.dumps(raw, allow_nan=False)

    @classmethod
    def parse(cls, line: bytes) -> Record:
        """One line; ValueError (with why) for anything but a well-formed entry."""
        if len(line) > MAX_LINE:
            raise ValueError("an over-long line")
        try:
            raw = json.loads(line.decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, RecursionError) as exc:
            raise ValueError(str(exc)) from None
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        if raw.get("v") != VERSION:
            raise ValueError(f"format version {raw.get('v')!r}, not {VERSION}")
        op, kind, tunable, boot = raw.get("op"), raw.get("kind"), raw.get("tunable"), raw.get("boot")
        if op not in OPS or kind not in KINDS:
            raise ValueError("an unknown operation or kind")
        if not isinstance(tunable, str) or not valid_name(tunable):
            raise ValueError("a tunable name that is not a sysctl-like name")
        if not isinstance(boot, str) or len(boot) > 64:
            raise ValueError("no boot id")
        global_ns = raw.get("global_ns")
        if not isinstance(global_ns, bool):
            raise ValueError("no global_ns flag")
        tuner = raw.get("tuner", "")
        if not isinstance(tuner, str) or len(tuner) > MAX_NAME:
            raise ValueError("a tuner name that is not a string")
        value: Value | None = None
        how = ""
        if op == "done":
            how = raw.get("how", "")
            if how not in DONE_HOW:
                raise ValueError("a closing record without a known outcome")
        else:
            value = _value(str(kind), raw.get("value"))
        return cls(
            _int(raw.get("seq"), 0, 2**63 - 1),
            str(op),
            boot,
            str(kind),
            tunable,
            _int(raw.get("netns"), 0, 2**64 - 1),
            global_ns,
            tuner,
            value,
            str(how),
        )


@dataclass
class Replay:
    """What a journal file says is still pending, and what was wrong with it."""

    pending: list[Pending] = field(default_factory=list)  # in the order their originals were journaled
    foreign: list[Pending] = field(default_factory=list)  # well-formed, but no tuner we know declares them
    corrupt: int = 0
    other_boot: int = 0
    undeclared: set[str] = field(default_factory=set)
    last_seq: int = 0
    problems: list[str] = field(default_factory=list)  # one example reason per kind of problem


def replay(data: bytes, boot: str, declared: Callable[[str, str], bool]) -> Replay:
    """Fold a journal's lines, in the order written, into the pending entries.

    ``declared(kind, tunable)`` says whether some tuner we know declares that
    tunable with that kind.  Entries for others (a plugin not loaded this
    time, or a forged line) are never written anywhere; they are returned in
    ``foreign`` so that a rewrite of the journal keeps them."""
    out = Replay()
    pending: dict[Key, Pending] = {}
    order: dict[Key, int] = {}
    records: list[tuple[int, Record]] = []
    for n, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        try:
            records.append((n, Record.parse(line)))
        except (ValueError, TypeError) as exc:
            out.corrupt += 1
            if len(out.problems) < 3:
                out.problems.append(f"line {n + 1}: {exc}")
    # Replayed in the order written: by sequence number, ties by position.
    records.sort(key=lambda r: (r[1].seq, r[0]))
    for _n, rec in records:
        out.last_seq = max(out.last_seq, rec.seq)
        if rec.boot != boot:
            out.other_boot += 1
            continue
        key = (rec.tunable, rec.netns_cookie)
        if rec.op == "original":
            if key not in pending:
                assert rec.value is not None
                pending[key] = Pending(rec.kind, rec.tunable, rec.netns_cookie, rec.global_ns, rec.tuner, rec.value)
                order[key] = rec.seq
            continue
        entry = pending.get(key)
        if entry is None or entry.kind != rec.kind:
            continue  # a write or close without its original: nothing to restore from it
        if rec.op == "wrote":
            assert rec.value is not None
            entry.written = [*entry.written, rec.value][-KEEP_WRITTEN:]
        else:
            del pending[key]
    for p in sorted(pending.values(), key=lambda p: order[p.key]):
        if declared(p.kind, p.tunable):
            out.pending.append(p)
        else:
            out.undeclared.add(p.tunable)
            out.foreign.append(p)
    return out


def compacted(pending: Iterable[Pending], boot: str, first_seq: int = 1) -> list[Record]:
    """The records that say exactly ``pending`` (an original and its last writes each)."""
    out: list[Record] = []
    seq = first_seq
    for p in pending:
        common = (boot, p.kind, p.tunable, p.netns_cookie, p.global_ns, p.tuner)
        out.append(Record(seq, "original", *common, value=p.original))
        seq += 1
        for w in p.written:
            out.append(Record(seq, "wrote", *common, value=w))
            seq += 1
    return out
