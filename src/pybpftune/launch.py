"""A daemon command line without click, and the one way a daemon starts.

Starting the daemon is the common case, and click's imports would stay in the
daemon's memory for its whole life (about 1.5 MB, a sixth of the budget the
peak-RSS goal leaves Python) and cost a tenth of a second of start-up in an
emulated guest.  :func:`parse_daemon_args` reads the daemon's own options
for the console entry (:mod:`pybpftune.console`); anything else (help, -V,
-S, -P, -q, --json, an unknown option, a bad value, ``--``, a positional
argument) goes to the click command in cli.py, which owns every message and
every check.  ``SHORT`` and ``LONG`` must name exactly the click command's
daemon options: a unit test compares them.  This module never imports cli.py
(cli.py imports it).

Both paths end in :func:`start_daemon`, and the daemon's settings are built
in one place, :func:`daemon_config` (the command line over the configuration
file, which is read and checked before anything starts).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from .config import DaemonConfig
    from .registry import Plugin
    from .tuner import Tuner

# option -> (DaemonConfig field, kind); kind: "flag", "value" or "multi" (repeatable)
SHORT: dict[str, tuple[str, str]] = {
    "a": ("allow", "multi"),
    "c": ("cgroup", "value"),
    "d": ("debug", "flag"),
    "D": ("daemonize", "flag"),
    "l": ("libdirs", "multi"),
    "L": ("legacy", "flag"),
    "p": ("port", "value"),
    "r": ("learning_rate", "value"),
    "R": ("rollback", "flag"),
    "s": ("to_stderr", "flag"),
}
LONG: dict[str, tuple[str, str]] = {
    "allow": ("allow", "multi"),
    "cgroup": ("cgroup", "value"),
    "debug": ("debug", "flag"),
    "daemon": ("daemonize", "flag"),
    "libdir": ("libdirs", "multi"),
    "legacy": ("legacy", "flag"),
    "port": ("port", "value"),
    "learning-rate": ("learning_rate", "value"),
    "rollback": ("rollback", "flag"),
    "stderr": ("to_stderr", "flag"),
    "state-dir": ("state_dir", "value"),
    "metrics": ("metrics", "value"),
    "advise": ("advise", "flag"),
    "config": ("config_path", "value"),
}
# Path options: (must not be a file, must not be a directory), as click.Path checks them.
PATHS = {"cgroup": (False, False), "state_dir": (True, False), "config_path": (False, True)}


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and a non-zero exit: how every operator mistake ends."""
    print(f"bpftune: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Operator mistakes (exit 2), refusals (exit 1) and missing privileges
    end the command in one line, never a traceback."""
    from .errors import PybpftuneError, UsageError

    try:
        yield
    except UsageError as exc:
        fail(str(exc), 2)
    except PybpftuneError as exc:
        fail(str(exc))
    except PermissionError as exc:
        fail(f"permission denied ({exc.filename or exc}); pybpftune needs root (CAP_SYS_ADMIN, CAP_BPF, CAP_NET_ADMIN)")


def parse_daemon_args(argv: Sequence[str]) -> dict[str, object] | None:
    """DaemonConfig keyword arguments for a plain daemon command line, or
    None when click must handle it (anything unusual, including every error)."""
    found: dict[str, list[str]] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg.startswith("--") and len(arg) > 2:
            name, eq, inline = arg[2:].partition("=")
            spec = LONG.get(name)
            if spec is None:
                return None
            if spec[1] == "flag":
                if eq:
                    return None
                found.setdefault(spec[0], []).append("")
                continue
            if not eq:
                if i >= len(args):
                    return None
                inline = args[i]
                i += 1
            found.setdefault(spec[0], []).append(inline)
        elif arg.startswith("-") and len(arg) > 1 and not arg.startswith("--"):
            chars = arg[1:]
            for pos, ch in enumerate(chars):
                spec = SHORT.get(ch)
                if spec is None:
                    return None
                if spec[1] == "flag":
                    found.setdefault(spec[0], []).append("")
                    continue
                value = chars[pos + 1 :]
                if not value:
                    if i >= len(args):
                        return None
                    value = args[i]
                    i += 1
                found.setdefault(spec[0], []).append(value)
                break
        else:
            return None  # "--", "-" or a positional argument: click says what is wrong
    return _config_kwargs(found)


def _config_kwargs(found: dict[str, list[str]]) -> dict[str, object] | None:
    kinds = dict([*SHORT.values(), *LONG.values()])
    out: dict[str, object] = {}
    for dest, values in found.items():
        kind = kinds[dest]
        if kind == "flag":
            out[dest] = True
        elif kind == "multi":
            out[dest] = tuple(values)
        elif len(values) > 1:
            return None  # click takes the last one; let it, rather than guess here
        else:
            out[dest] = values[0]
    rate = out.get("learning_rate")
    if rate is not None:
        if rate not in ("0", "1", "2", "3", "4"):
            return None  # click reports the range
        out["learning_rate"] = int(str(rate))
    port = out.get("port")
    if port is not None:
        text = str(port)
        # Plain digits only ("+1", " 1" or "1_0" are click's to judge), in range.
        if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
            return None
        out["port"] = int(text)
    for dest, (no_file, no_dir) in PATHS.items():
        value = out.get(dest)
        if value is None:
            continue
        text = str(value)
        # click.Path refuses unreadable paths, an existing file for --state-dir
        # and a directory for --config; let it.
        if not text:
            return None
        if os.path.exists(text) and (
            not os.access(text, os.R_OK) or (no_file and not os.path.isdir(text)) or (no_dir and os.path.isdir(text))
        ):
            return None
        out[dest] = Path(text)
    return out


def daemon_config(
    *,
    allow: Iterable[str] = (),
    cgroup: Path | None = None,
    debug: bool = False,
    daemonize: bool = False,
    libdirs: Iterable[str] = (),
    legacy: bool = False,
    port: int | None = None,
    learning_rate: int | None = None,
    rollback: bool = False,
    to_stderr: bool = False,
    state_dir: Path | None = None,
    metrics: str | None = None,
    advise: bool = False,
    config_path: Path | None = None,
) -> DaemonConfig:
    """The daemon's settings from its command-line options (named as the
    click command names them): the flags over the configuration file.

    The file (``--config``, else /etc/pybpftune/config.toml if it exists) is
    read and checked against every tuner there is, -l plugins included, so a
    mistake is one :class:`~pybpftune.config.ConfigError` (exit 2) before
    anything starts.  The tuners are imported only when there is a file; the
    -l plugins imported to learn their names are unloaded again (the daemon
    loads them itself once it watches their directories)."""
    from .config import DaemonConfig, Overrides, read_config
    from .state import DEFAULT_STATE_DIR

    libdirs = tuple(libdirs)
    plugins: list[Plugin] = []

    def known() -> list[type[Tuner]]:
        from .registry import Trust, builtin_tuners, entry_point_tuners, extra_tuners

        found = extra_tuners(libdirs, Trust(), quiet=True)  # the daemon says what fails
        plugins.extend(found)
        return [*builtin_tuners(), *entry_point_tuners(), *(p.cls for p in found)]

    try:
        file = read_config(config_path, known, trusted=os.geteuid() == 0)
    finally:
        if plugins:
            from .registry import unload_plugin

            for plugin in plugins:
                unload_plugin(plugin)
    return DaemonConfig(
        allow=tuple(allow),
        cgroup=cgroup,
        debug=debug,
        daemonize=daemonize,
        libdirs=libdirs,
        legacy=legacy,
        state_dir=state_dir if state_dir is not None else DEFAULT_STATE_DIR,
        metrics=metrics,
        config_explicit=config_path is not None,
        flags=Overrides(learning_rate, advise, to_stderr, rollback, port),
    ).with_file(file)


def start_daemon(kwargs: dict[str, object], early_probe: bool = False) -> NoReturn:
    """Run the daemon with these command-line options (:func:`daemon_config`'s
    keywords); exits with its code.
    Mistakes and refusals end in one line (2 for usage, 1 otherwise).
    ``early_probe``: start the support probe before importing the daemon
    (not across -D's fork, and only as root: the daemon refuses otherwise)."""
    with one_line_errors():
        # The configuration file before anything else: a mistake in it is one
        # line and exit 2, with nothing probed, loaded or written.
        config = daemon_config(**kwargs)  # type: ignore[arg-type]
        early = None
        if early_probe and os.geteuid() == 0 and not config.daemonize:
            from .startup import begin_probe

            early = begin_probe(config.cache_dir)
        from .serve import run_daemon

        try:
            sys.exit(run_daemon(config, early))
        finally:
            if early is not None:
                early.loader.close()  # a refused start: let a probe under way finish first
