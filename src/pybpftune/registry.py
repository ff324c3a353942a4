"""Which tuners exist: built-ins, installed entry points, and -l extras.

Built-in tuners live in ``pybpftune.tuners.<name>`` and expose ``TUNER``.
Third-party packages register classes under the entry-point group
``pybpftune.tuners``.  ``-l DIR`` loads ``*.py`` tuner modules from a
directory that only root can write (as bpftune refuses untrusted plugins);
``-l some.module`` imports a module and takes its ``TUNER``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import stat
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from .errors import UsageError
from .tuner import Tuner

log = logging.getLogger("pybpftune.registry")

# Load order: the sysctl tuner first, so administrator writes are seen from
# the start; the rest as bpftune lists them.
BUILTIN = (
    "sysctl",
    "netns",
    "tcp_buffer",
    "tcp_conn",
    "net_buffer",
    "neigh_table",
    "route_table",
    "ip_frag",
    "udp_buffer",
)
ENTRY_POINT_GROUP = "pybpftune.tuners"


def normalize(name: str) -> str:
    """'tcp_buffer_tuner.so' and 'tcp_buffer' name the same tuner."""
    name = os.path.basename(name)
    for suffix in (".so", ".py"):
        name = name.removesuffix(suffix)
    return name.removesuffix("_tuner")


def _tuner_of(module: ModuleType, origin: str) -> type[Tuner]:
    cls = getattr(module, "TUNER", None)
    if not (isinstance(cls, type) and issubclass(cls, Tuner)):
        raise UsageError(f"{origin} defines no TUNER class derived from pybpftune.tuner.Tuner")
    return cls


def builtin_tuners() -> list[type[Tuner]]:
    found = []
    for name in BUILTIN:
        spec = importlib.util.find_spec(f"pybpftune.tuners.{name}")
        if spec is None:
            continue
        found.append(_tuner_of(importlib.import_module(f"pybpftune.tuners.{name}"), name))
    return found


def entry_point_tuners() -> list[type[Tuner]]:
    found = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken third-party package must not stop the daemon
            log.warning("cannot load tuner entry point %s: %s", ep.name, exc)
            continue
        if isinstance(cls, type) and issubclass(cls, Tuner):
            found.append(cls)
        else:
            log.warning("entry point %s is not a Tuner class", ep.name)
    return found


def _check_trusted(path: Path) -> None:
    """Refuse plugin paths anyone but root could have written.

    Every component must be a root-owned non-symlink that only root can
    write; a sticky ancestor such as /tmp is accepted, since others may add
    entries there but cannot replace the root-owned ones below it."""
    path = path.absolute()
    for p in [path, *path.parents]:
        st = os.lstat(p)
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        sticky_ancestor = p != path and st.st_mode & stat.S_ISVTX
        if stat.S_ISLNK(st.st_mode) or st.st_uid != 0 or (writable and not sticky_ancestor):
            raise UsageError(f"refusing untrusted plugin '{path}': {p} must be root-owned and not group/other-writable")


def extra_tuners(libdirs: Iterable[str]) -> list[type[Tuner]]:
    found: list[type[Tuner]] = []
    for entry in libdirs:
        path = Path(entry)
        if path.is_dir():
            _check_trusted(path)
            for f in sorted(path.glob("*_tuner.py")):
                _check_trusted(f)
                spec = importlib.util.spec_from_file_location(f"pybpftune_extra.{f.stem}", f)
                if spec is None or spec.loader is None:
                    continue
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                found.append(_tuner_of(module, str(f)))
        elif os.sep in entry:
            raise UsageError(f"tuner directory {entry} does not exist")
        else:
            try:
                module = importlib.import_module(entry)
            except ImportError as exc:
                raise UsageError(f"cannot import tuner module {entry}: {exc}") from exc
            found.append(_tuner_of(module, entry))
    return found


def select(allow: Iterable[str], libdirs: Iterable[str] = ()) -> list[type[Tuner]]:
    """Tuner classes to load, filtered by -a; an unknown name is an error."""
    classes: dict[str, type[Tuner]] = {}
    for cls in [*builtin_tuners(), *entry_point_tuners(), *extra_tuners(libdirs)]:
        classes.setdefault(cls.name, cls)
    allow = list(allow)
    wanted = [normalize(a) for a in allow]
    unknown = [a for a, w in zip(allow, wanted, strict=True) if w not in classes]
    if unknown:
        raise UsageError(f"unknown tuner '{unknown[0]}'; known tuners: {', '.join(classes)}")
    if not wanted:
        return list(classes.values())
    return [cls for name, cls in classes.items() if name in wanted]
