"""The optional configuration file (TOML): what an operator may steer.

Zero configuration stays the default: without /etc/pybpftune/config.toml the
daemon behaves exactly as with no file at all.  The file may set::

    advice = true                       # --advise
    learning_rate = 3                   # -r
    log = "stderr"                      # "syslog"/"journald" (default: the system log) or "stderr" (-s)
    rollback = true                     # -R
    socket = "/run/pybpftune/bpftune.sock"
    port = 5959                         # -p: also serve on loopback TCP

    [tuners.tcp_conn]
    enabled = false

    [tunables."net.ipv4.tcp_rmem"]
    cap = [4096, 131072, 16777216]      # or one integer for every value
    netns = { cap = 4194304 }           # only in non-global namespaces
    global = { floor = [4096, 131072, 6291456] }  # only in the initial namespace

Command-line flags override the file.  Every mistake (an unknown key, a
wrong type, a value out of range, a cap below a floor) is one
:class:`ConfigError` naming the file, the key and the reason; the file is
hostile input until it has passed all of this, so the size is bounded and a
pathological nesting or a non-UTF-8 byte is an error like any other.

Floors and caps bound the tuners' moves, they never move a value themselves:
growth stops at the cap (a value an administrator set above the cap is not
lowered), and shrinking stops at the floor.

:class:`DaemonConfig` is what the daemon runs with: the command line
(:class:`Overrides`) over the file.  It lives here, not in daemon.py, so that
``launch.daemon_config`` can build and check it before the daemon's imports
(and before the support probe starts).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError
from .state import DEFAULT_STATE_DIR, QUERY_SOCKET

if TYPE_CHECKING:
    from .declarations import NamedDeclaration, Tunable

DEFAULT_CONFIG = Path("/etc/pybpftune/config.toml")
# Far beyond any real configuration; bounds what a hostile file can cost.
MAX_CONFIG_BYTES = 256 * 1024
# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
# "syslog" and "journald" both mean the system log: journald where its socket
# exists (the syslog socket otherwise), as without -s.
LOG_TARGETS = ("syslog", "journald", "stderr")
LIMIT_KEYS = ("floor", "cap")
NS_KINDS = ("global", "netns")
INT64_MAX = 2**63 - 1


class ConfigError(UsageError):
    """The configuration file is unusable; the message is one line."""


def show(text: object, limit: int = 60) -> str:
    """A key or value from the file, safe to print on one line."""
    s = str(text)
    s = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in s[: limit + 1])
    return s if len(s) <= limit else s[:limit] + "..."


Bound = int | tuple[int, ...]


def normalize(name: str) -> str:
    """'tcp_buffer_tuner.so' and 'tcp_buffer' name the same tuner."""
    name = os.path.basename(name)
    for suffix in (".so", ".py"):
        name = name.removesuffix(suffix)
    return name.removesuffix("_tuner")


@dataclass(frozen=True)
class Limits:
    """Floor and cap of one tunable (one per value, or one for every value)."""

    floor: Bound | None = None
    cap: Bound | None = None

    @staticmethod
    def _at(bound: Bound | None, i: int) -> int | None:
        if bound is None:
            return None
        return bound if isinstance(bound, int) else bound[i]

    def floor_at(self, i: int) -> int | None:
        return self._at(self.floor, i)

    def cap_at(self, i: int) -> int | None:
        return self._at(self.cap, i)

    def over(self, base: Limits) -> Limits:
        """These limits, falling back to ``base`` for what they leave unset."""
        floor = self.floor if self.floor is not None else base.floor
        return Limits(floor, self.cap if self.cap is not None else base.cap)

    def describe(self) -> str:
        def fmt(b: Bound | None) -> str:
            return "-" if b is None else str(b) if isinstance(b, int) else " ".join(map(str, b))

        return f"floor {fmt(self.floor)}, cap {fmt(self.cap)}"


@dataclass(frozen=True)
class TunableLimits:
    """Limits of one tunable: everywhere, and per kind of namespace."""

    everywhere: Limits = Limits()
    global_: Limits = Limits()
    netns: Limits = Limits()

    def for_namespace(self, is_global: bool) -> Limits:
        return (self.global_ if is_global else self.netns).over(self.everywhere)


@dataclass(frozen=True)
class Config:
    """What the file said; None: the file did not set it."""

    path: Path | None = None
    advice: bool | None = None
    learning_rate: int | None = None
    log: str | None = None
    rollback: bool | None = None
    socket: Path | None = None
    port: int | None = None
    tuners: Mapping[str, bool] = field(default_factory=dict)  # tuner -> enabled
    limits: Mapping[str, TunableLimits] = field(default_factory=dict)  # tunable name -> limits

    def enabled(self, tuner: str) -> bool:
        return self.tuners.get(tuner, True)


# --- the daemon's settings ----------------------------------------------------------------


@dataclass(frozen=True)
class Overrides:
    """What the command line set; it wins over the configuration file, on
    start and on every reload.  Flags can only switch things on."""

    learning_rate: int | None = None
    advice: bool = False
    to_stderr: bool = False
    rollback: bool = False
    port: int | None = None


@dataclass
class DaemonConfig:
    allow: Iterable[str] = ()
    cgroup: Path | None = None
    debug: bool = False
    daemonize: bool = False
    libdirs: Iterable[str] = ()
    legacy: bool = False
    port: int | None = None
    learning_rate: int = 4
    rollback: bool = False
    to_stderr: bool = False
    advice: bool = False
    state_dir: Path = DEFAULT_STATE_DIR
    # --metrics ADDR:PORT (None: no endpoint).
    metrics: str | None = None
    # Keep only caps.RUNTIME_CAPS once started.
    drop_capabilities: bool = True
    # Facts about this boot (the support probe) are cached here, whatever
    # --state-dir says: they belong to the machine, not to one daemon's
    # journal.  None: no per-boot cache.
    cache_dir: Path | None = DEFAULT_STATE_DIR
    # Query socket; None: bpftune.sock in the state directory.
    socket: Path | None = None
    # Operator floors and caps per tunable (the configuration file).
    limits: Mapping[str, TunableLimits] = field(default_factory=dict)
    # Tuners the configuration file switches off (-a naming one wins).
    switched_off: frozenset[str] = frozenset()
    # The configuration file in use (re-read on SIGHUP), and whether it was
    # named with --config (then it must exist on reload too).
    config_path: Path | None = None
    config_explicit: bool = False
    flags: Overrides = field(default_factory=Overrides)

    @property
    def socket_path(self) -> Path:
        return self.socket if self.socket is not None else self.state_dir / QUERY_SOCKET

    def with_file(self, file: Config) -> DaemonConfig:
        """These settings with the file's, under the command line's."""
        f = self.flags
        rate = f.learning_rate if f.learning_rate is not None else file.learning_rate
        return replace(
            self,
            learning_rate=rate if rate is not None else 4,
            advice=f.advice or bool(file.advice),
            to_stderr=f.to_stderr or file.log == "stderr",
            rollback=f.rollback or bool(file.rollback),
            port=f.port if f.port is not None else file.port,
            socket=file.socket,
            limits=dict(file.limits),
            switched_off=frozenset(name for name, on in file.tuners.items() if not on),
            config_path=file.path,
        )


# --- loading ----------------------------------------------------------------------------


def read_config(
    path: Path | None,
    known: Iterable[NamedDeclaration] | Callable[[], Iterable[NamedDeclaration]] | None = None,
    trusted: bool = False,
) -> Config:
    """Load and validate the file at ``path`` (None: the default, if it exists).

    ``known``: the tuner classes that exist, to check tuner and tunable names
    and limits against (None: skip those checks, as the query client does),
    or a function returning them, called only when there is a file (finding
    them imports every tuner).
    ``trusted``: refuse a file that anyone but root could have written."""
    required = path is not None
    path = path if path is not None else DEFAULT_CONFIG
    where = show(path, 200)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{where}: no such file") from None
        return Config()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{where}: not a regular file")
        if trusted:
            _check_trusted(path, st)
        data = os.read(fd, MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_CONFIG_BYTES // 1024} KiB; not a configuration file")
    return parse_config(data, path, known() if callable(known) else known)


def _check_trusted(path: Path, st: os.stat_result) -> None:
    """A root daemon takes orders only from a file only root can change."""
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{show(path, 200)}: refusing it: it must be owned by root and not writable by group or others"
        )


def parse_config(data: bytes, path: Path, known: Iterable[NamedDeclaration] | None = None) -> Config:
    """Validate the bytes of a configuration file (see the module docstring)."""
    import tomllib

    where = show(path, 200)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {show(exc, 160)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid TOML: nested too deeply") from None
    except ValueError as exc:  # an integer of thousands of digits
        raise ConfigError(f"{where}: not valid TOML: {show(exc, 120)}") from None
    return _Validator(where, path, known).config(raw)


class _Validator:
    def __init__(self, where: str, path: Path, known: Iterable[NamedDeclaration] | None) -> None:
        self.where = where
        self.path = path
        self.tuners: dict[str, NamedDeclaration] | None = None
        self.tunables: dict[str, list[Tunable]] | None = None
        if known is not None:
            self.tuners = {cls.name: cls for cls in known}
            self.tunables = {}
            for cls in self.tuners.values():
                for t in cls.tunables:
                    self.tunables.setdefault(t.name, []).append(t)

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.where}: {key}: {reason}")

    # --- typed getters ------------------------------------------------------------

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {_kind(value)}")
        return value

    def integer(self, key: str, value: Any, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {_kind(value)}")
        if not lo <= value <= hi:
            raise self.fail(key, f"{show(value)} is out of range {lo}..{hi}")
        return value

    def table(self, key: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a table, got {_kind(value)}")
        return value

    def unknown(self, key: str, allowed: Iterable[str]) -> ConfigError:
        return self.fail(key, f"unknown key; expected one of: {', '.join(allowed)}")

    # --- the file -----------------------------------------------------------------

    def config(self, raw: dict[str, Any]) -> Config:
        values: dict[str, Any] = {"path": self.path}
        top = ("advice", "learning_rate", "log", "rollback", "socket", "port", "tuners", "tunables")
        for key, value in raw.items():
            if key in ("advice", "rollback"):
                values[key] = self.boolean(key, value)
            elif key == "learning_rate":
                values[key] = self.integer(key, value, 0, 4)
            elif key == "port":
                values[key] = self.integer(key, value, 1, 65535)
            elif key == "log":
                if value not in LOG_TARGETS:
                    raise self.fail(key, f"expected one of {', '.join(map(repr, LOG_TARGETS))}, got {_kind(value)}")
                values[key] = value
            elif key == "socket":
                values[key] = self.socket(key, value)
            elif key == "tuners":
                values[key] = self.tuner_switches(self.table(key, value))
            elif key == "tunables":
                values["limits"] = self.all_limits(self.table(key, value))
            else:
                raise self.unknown(show(key), top)
        return Config(**values)

    def socket(self, key: str, value: Any) -> Path:
        if not isinstance(value, str):
            raise self.fail(key, f"expected a path, got {_kind(value)}")
        if not value.startswith("/"):
            raise self.fail(key, f"{show(value)} is not an absolute path")
        if "\0" in value or len(os.fsencode(value)) > MAX_SOCKET_PATH:
            raise self.fail(key, f"a Unix socket path holds at most {MAX_SOCKET_PATH} bytes")
        return Path(value)

    def tuner_switches(self, raw: dict[str, Any]) -> dict[str, bool]:
        out: dict[str, bool] = {}
        for name, body in raw.items():
            key = f"tuners.{show(name)}"
            tuner = normalize(name)
            if self.tuners is not None and tuner not in self.tuners:
                raise self.fail(key, f"unknown tuner; known tuners: {', '.join(self.tuners)}")
            for k, v in self.table(key, body).items():
                if k != "enabled":
                    raise self.unknown(f"{key}.{show(k)}", ("enabled",))
                out[tuner] = self.boolean(f"{key}.{k}", v)
        return out

    def all_limits(self, raw: dict[str, Any]) -> dict[str, TunableLimits]:
        return {name: self.limits(name, self.table(f"tunables.{_quoted(name)}", body)) for name, body in raw.items()}

    def limits(self, name: str, body: dict[str, Any]) -> TunableLimits:
        key = f"tunables.{_quoted(name)}"
        decls: list[Tunable] | None = None
        if self.tunables is not None:
            decls = self.tunables.get(name)
            if decls is None:
                raise self.fail(key, "unknown tunable (`bpftune -q tunables` lists them)")
            if any(t.kind == "string" for t in decls):
                raise self.fail(key, "holds text: floors and caps apply to numeric tunables only")
        parts: dict[str, Limits] = {}
        for k, v in body.items():
            if k in LIMIT_KEYS:
                parts.setdefault("", Limits())
                parts[""] = _with(parts[""], k, self.bound(f"{key}.{k}", v, decls))
            elif k in NS_KINDS:
                sub = self.table(f"{key}.{k}", v)
                if k == "netns" and decls is not None and not all(t.namespaced for t in decls):
                    raise self.fail(
                        f"{key}.netns", "this tunable is not per-namespace (it is set once for the whole system)"
                    )
                lim = Limits()
                for kk, vv in sub.items():
                    if kk not in LIMIT_KEYS:
                        raise self.unknown(f"{key}.{k}.{show(kk)}", LIMIT_KEYS)
                    lim = _with(lim, kk, self.bound(f"{key}.{k}.{kk}", vv, decls))
                parts[k] = lim
            else:
                raise self.unknown(f"{key}.{show(k)}", (*LIMIT_KEYS, *NS_KINDS))
        out = TunableLimits(parts.get("", Limits()), parts.get("global", Limits()), parts.get("netns", Limits()))
        for kind, is_global in (("global", True), ("netns", False)):
            lim = out.for_namespace(is_global)
            self.check_order(key if kind not in parts else f"{key}.{kind}", lim, decls)
        return out

    def bound(self, key: str, value: Any, decls: list[Tunable] | None) -> Bound:
        n = None if decls is None else decls[0].num_values
        lo = 0
        hi = INT64_MAX
        if decls is not None:
            uppers = [t.upper for t in decls if t.upper is not None]
            hi = min(uppers) if uppers else INT64_MAX
        if isinstance(value, list):
            if not value or (n is not None and len(value) != n):
                want = f"{n} integers" if n is not None else "integers"
                raise self.fail(key, f"expected one integer or a list of {want}, got a list of {len(value)}")
            return tuple(self.integer(f"{key}[{i}]", v, lo, hi) for i, v in enumerate(value))
        return self.integer(key, value, lo, hi)

    def check_order(self, key: str, lim: Limits, decls: list[Tunable] | None) -> None:
        width = _width(lim)
        for i in range(width):
            floor, cap = lim.floor_at(i), lim.cap_at(i)
            at = f"[{i}]" if width > 1 else ""
            if floor is not None and cap is not None and cap < floor:
                raise self.fail(key, f"cap{at} {cap} is below floor{at} {floor}")
            for t in decls or ():
                if cap is not None and t.lower is not None and cap < t.lower:
                    raise self.fail(key, f"cap{at} {cap} is below {t.name}'s hard minimum {t.lower}")


def _width(lim: Limits) -> int:
    widths = [len(b) for b in (lim.floor, lim.cap) if isinstance(b, tuple)]
    return max(widths, default=1)


def _with(lim: Limits, key: str, bound: Bound) -> Limits:
    return Limits(bound, lim.cap) if key == "floor" else Limits(lim.floor, bound)


def _quoted(name: str) -> str:
    return f'"{show(name)}"' if "." in name else show(name)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {show(repr(value), 40)}"
    if isinstance(value, (int, float)):
        return f"{type(value).__name__} {show(value, 40)}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return str(type(value).__name__)
