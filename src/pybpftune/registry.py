"""Which tuners exist: built-ins, installed entry points, and -l extras.

Built-in tuners live in ``pybpftune.tuners.<name>`` and expose ``TUNER``.
Third-party packages register classes under the entry-point group
``pybpftune.tuners``.  ``-l DIR`` loads ``*_tuner.py`` plugin files from a
directory only root can write; ``-l some.module`` imports a module and takes
its ``TUNER``.

Plugin files are checked as bpftune checks its plugins (see :class:`Trust`)
and run from their source text only: they are compiled in memory, so no
bytecode cache is read or written (nor by what a plugin imports while it
loads).  A ``.pyc`` next to a plugin, whoever wrote it, is never executed.
A plugin that fails to import, or whose TUNER is no tuner declaration (a
name that is not a string, tunables that are not Tunables, ...), costs one
log line and is skipped.  Entry points and ``-l module`` names are imported the
ordinary way: they belong to the Python installation the daemon itself runs
from, and are trusted as it is.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import logging
import os
import stat
import sys
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from .config import normalize
from .errors import PybpftuneError, UsageError
from .tuner import Scenario, Tunable, Tuner

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
PLUGIN_SUFFIX = "_tuner.py"
# Plugin modules live in sys.modules under this prefix while they run.
PLUGIN_MODULE_PREFIX = "pybpftune_plugin."
# Extended attributes that carry POSIX ACLs; bpftune refuses plugins with either.
ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")


class PluginRefused(UsageError):
    """A plugin path someone other than root could have written."""

    def __init__(self, path: Path, why: str) -> None:
        self.path = path
        super().__init__(f"refusing untrusted plugin '{path}': {why}")


class PluginError(PybpftuneError):
    """A trusted plugin file that cannot be loaded (syntax error, raised at import, no TUNER)."""


@dataclass(frozen=True)
class Plugin:
    """A tuner class and, for a directory plugin, the file it came from and
    that file's identity when it was read (see :func:`file_stamp`)."""

    cls: type[Tuner]
    path: Path | None = None
    stamp: tuple[int, ...] | None = None


def _stamp_of(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_stamp(path: Path) -> tuple[int, ...] | None:
    """Identity and version of a file: equal stamps mean the same content was seen."""
    try:
        return _stamp_of(os.lstat(path))
    except OSError:
        return None


def is_plugin_file(path: Path) -> bool:
    """Names the daemon loads from a plugin directory: ``<name>_tuner.py``."""
    return path.name.endswith(PLUGIN_SUFFIX) and not path.name.startswith(".")


def _tuner_of(module: ModuleType, origin: str) -> type[Tuner]:
    cls = getattr(module, "TUNER", None)
    if not (isinstance(cls, type) and issubclass(cls, Tuner)):
        raise PluginError(f"{origin} defines no TUNER class derived from pybpftune.tuner.Tuner")
    # What the daemon reads before any of the tuner's code runs: a wrong
    # type there would otherwise surface far from the plugin, as a traceback.
    wrong = _declaration_error(cls)
    if wrong:
        raise PluginError(f"{origin}: TUNER {cls.__name__}: {wrong}")
    return cls


def _declaration_error(cls: type[Tuner]) -> str:
    if not isinstance(cls.name, str) or not cls.name:
        return f"its name must be a non-empty string, not {cls.name!r}"
    for attr, kind in (("tunables", Tunable), ("scenarios", Scenario)):
        value = getattr(cls, attr)
        if not isinstance(value, tuple) or not all(isinstance(v, kind) for v in value):
            return f"{attr} must be a tuple of {kind.__name__}, not {value!r}"[:200]
    if cls.bpf_name is not None and not isinstance(cls.bpf_name, str):
        return f"bpf_name must be a string or None, not {cls.bpf_name!r}"
    return ""


def builtin_tuners() -> list[type[Tuner]]:
    found = []
    for name in BUILTIN:
        spec = importlib.util.find_spec(f"pybpftune.tuners.{name}")
        if spec is None:
            continue
        found.append(_tuner_of(importlib.import_module(f"pybpftune.tuners.{name}"), name))
    return found


def _group_declared(paths: Iterable[str] | None = None) -> bool:
    """Does any installed distribution declare the entry-point group?

    A quick look at the ``entry_points.txt`` files on ``sys.path``, so a run
    with no third-party tuners never imports importlib.metadata (a few
    megabytes and, in an emulated guest, a noticeable part of start-up).
    False negatives cannot happen: a declaration is in such a file."""
    marker = f"[{ENTRY_POINT_GROUP}]"
    for entry in sys.path if paths is None else paths:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if not name.endswith((".dist-info", ".egg-info")):
                continue
            try:
                with open(os.path.join(entry or ".", name, "entry_points.txt"), encoding="utf-8") as fh:
                    if marker in fh.read():
                        return True
            except (OSError, UnicodeDecodeError):
                continue
    return False


def entry_point_tuners() -> list[type[Tuner]]:
    if not _group_declared():
        return []
    from importlib.metadata import entry_points

    found = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken third-party package must not stop the daemon
            log.warning("cannot load tuner entry point %s: %s", ep.name, _one_line(exc))
            continue
        if isinstance(cls, type) and issubclass(cls, Tuner):
            found.append(cls)
        else:
            log.warning("entry point %s is not a Tuner class", ep.name)
    return found


# --- trust ------------------------------------------------------------------------


def _has_acl(target: Path | int) -> bool:
    for name in ACL_XATTRS:
        try:
            if isinstance(target, int):
                os.getxattr(target, name)
            else:
                os.getxattr(target, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
                continue
            raise
        return True
    return False


@dataclass(frozen=True)
class Trust:
    """Who may have written a plugin, checked as bpftune checks its plugins.

    The file and every directory above it, up to ``top``, must be owned by
    ``uid`` (root), be neither group- nor other-writable, carry no POSIX
    ACL, and not be a symbolic link.  A sticky directory such as /tmp fails
    like any other world-writable one: anyone can create entries there, so a
    root-owned directory below it may have been made by someone else first.
    Tests pass their own uid and a ``top`` below their temporary directory.
    """

    uid: int = 0
    top: Path = Path("/")

    def _refuse_unless(self, path: Path, where: Path, st: os.stat_result, kind: str, target: Path | int) -> None:
        if stat.S_ISLNK(st.st_mode):
            raise PluginRefused(path, f"{where} is a symbolic link")
        is_kind = stat.S_ISDIR(st.st_mode) if kind == "directory" else stat.S_ISREG(st.st_mode)
        if not is_kind:
            raise PluginRefused(path, f"{where} is not a {kind}")
        if st.st_uid != self.uid:
            raise PluginRefused(path, f"{where} is owned by uid {st.st_uid}, not {self.uid}")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise PluginRefused(path, f"{where} is group- or other-writable (mode {stat.S_IMODE(st.st_mode):04o})")
        try:
            acl = _has_acl(target)
        except OSError as exc:
            raise PluginRefused(path, f"cannot read the ACL of {where}: {exc.strerror}") from None
        if acl:
            raise PluginRefused(path, f"{where} has a POSIX ACL")

    def check_directory(self, path: Path, directory: Path | None = None) -> None:
        """``directory`` (default ``path``) and each directory above it, up to ``top``."""
        directory = path if directory is None else directory
        for p in [directory, *directory.parents]:
            try:
                st = os.lstat(p)
            except OSError as exc:
                raise PluginRefused(path, f"{p}: {exc.strerror}") from None
            self._refuse_unless(path, p, st, "directory", p)
            if p == self.top:
                break

    def check_file(self, path: Path, st: os.stat_result, target: Path | int, where: Path | None = None) -> None:
        """A file (``where``, default ``path``) from its stat; ``target``:
        its open descriptor, or its path when it is not open."""
        self._refuse_unless(path, path if where is None else where, st, "regular file", target)


def plugin_path(entry: str | Path) -> Path:
    """An absolute plugin path.  Normalising '..' by name is sound here: every
    component is then checked to be a real directory, not a symbolic link."""
    return Path(os.path.abspath(entry))


def read_trusted(path: Path, trust: Trust) -> tuple[bytes, tuple[int, ...]]:
    """The bytes and stamp of a trusted file; the checks apply to the open
    descriptor, so the file cannot be swapped between the check and the read."""
    trust.check_directory(path, path.parent)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PluginRefused(path, f"{path} is a symbolic link") from None
        raise PluginError(f"cannot open plugin '{path}': {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        trust.check_file(path, st, fd)
        chunks = []
        try:
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        except OSError as exc:
            raise PluginError(f"cannot read plugin '{path}': {exc.strerror}") from None
        return b"".join(chunks), _stamp_of(st)
    finally:
        os.close(fd)


# --- loading ------------------------------------------------------------------------


def _one_line(exc: BaseException, source: Path | None = None) -> str:
    """``Type: message``, with the plugin's line number where it raised."""
    text = " ".join(str(exc).split()) or "(no message)"
    where = ""
    if source is not None and not isinstance(exc, SyntaxError):
        lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(source)]
        if lines:
            where = f" (line {lines[-1]})"
    return f"{type(exc).__name__}: {text}{where}"


def _module_name(path: Path) -> str:
    stem = path.name.removesuffix(".py")
    name, n = f"{PLUGIN_MODULE_PREFIX}{stem}", 1
    while name in sys.modules and getattr(sys.modules[name], "__file__", None) != str(path):
        n += 1
        name = f"{PLUGIN_MODULE_PREFIX}{stem}_{n}"
    return name


def load_plugin(entry: str | Path, trust: Trust | None = None) -> Plugin:
    """Check, compile and run one plugin file from its source; its tuner class.

    Raises PluginRefused (untrusted) or PluginError (anything else); never
    runs bytecode and never writes a cache."""
    trust = trust or Trust()
    path = plugin_path(entry)
    source, stamp = read_trusted(path, trust)
    name = _module_name(path)
    spec = importlib.util.spec_from_loader(name, loader=None, origin=str(path))
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path)
    sys.modules[name] = module  # dataclasses and typing look the module up while it runs
    # Whatever the plugin imports while it loads writes no bytecode either.
    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        code = compile(source, str(path), "exec", dont_inherit=True)
        exec(code, module.__dict__)
        cls = _tuner_of(module, str(path))
        if cls.bpf_name is not None and cls.bpf_dir is not None:
            _check_objects(path, cls, trust)
    except (PluginRefused, PluginError):
        sys.modules.pop(name, None)
        raise
    except (Exception, SystemExit) as exc:  # whatever the plugin's own code raised
        sys.modules.pop(name, None)
        raise PluginError(f"cannot load plugin '{path}': {_one_line(exc, path)}") from None
    finally:
        sys.dont_write_bytecode = dont_write
    return Plugin(cls, path, stamp)


def _check_objects(path: Path, cls: type[Tuner], trust: Trust) -> None:
    """A directory plugin's BPF objects must be as trusted as its source."""
    assert cls.bpf_dir is not None and cls.bpf_name is not None
    directory = plugin_path(cls.bpf_dir)
    trust.check_directory(path, directory)
    for suffix in (".bpf.o", ".bpf.legacy.o"):
        obj = directory / f"{cls.bpf_name}{suffix}"
        try:
            st = os.lstat(obj)
        except FileNotFoundError:
            continue  # the daemon says which variant is missing when it loads
        except OSError as exc:
            raise PluginRefused(path, f"{obj}: {exc.strerror}") from None
        trust.check_file(path, st, obj, obj)


def unload_plugin(plugin: Plugin) -> None:
    """Forget a removed plugin's module (its tuner has been stopped)."""
    name = plugin.cls.__module__
    if name.startswith(PLUGIN_MODULE_PREFIX):
        sys.modules.pop(name, None)


def plugin_directories(libdirs: Iterable[str]) -> list[Path]:
    """The -l entries that are directories: the ones the daemon watches."""
    return [plugin_path(e) for e in libdirs if os.sep in e or Path(e).is_dir()]


def directory_plugins(directory: Path, trust: Trust, quiet: bool = False) -> list[Plugin]:
    """Every loadable plugin file in a trusted directory; the others are one
    line each (``quiet``: debug lines, for a look the daemon repeats)."""
    found: list[Plugin] = []
    say = log.debug if quiet else log.warning
    for f in sorted(directory.glob(f"*{PLUGIN_SUFFIX}")):
        if not is_plugin_file(f):
            continue
        try:
            found.append(load_plugin(f, trust))
        except PluginError as exc:
            say("%s; skipping it", exc)
        except PluginRefused as exc:
            say("%s", exc)
    return found


def extra_tuners(libdirs: Iterable[str], trust: Trust | None = None, quiet: bool = False) -> list[Plugin]:
    """Tuners named by -l: an untrusted or missing directory, or a module
    name that does not exist, is an operator mistake (UsageError); a plugin
    inside that fails is one warning and skipped (``quiet``: a debug line,
    when the daemon looks again and says it)."""
    trust = trust or Trust()
    found: list[Plugin] = []
    say = log.debug if quiet else log.warning
    for entry in libdirs:
        if os.sep in entry or Path(entry).is_dir():
            path = plugin_path(entry)
            if not path.is_dir():
                raise UsageError(f"tuner directory {entry} does not exist")
            trust.check_directory(path)
            found.extend(directory_plugins(path, trust, quiet))
            continue
        try:
            module = importlib.import_module(entry)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (entry == exc.name or entry.startswith(exc.name + ".")):
                raise UsageError(f"cannot import tuner module {entry}: {exc}") from exc
            say("cannot load tuner module %s: %s; skipping it", entry, _one_line(exc))
            continue
        except (Exception, SystemExit) as exc:
            say("cannot load tuner module %s: %s; skipping it", entry, _one_line(exc))
            continue
        try:
            found.append(Plugin(_tuner_of(module, entry)))
        except PluginError as exc:
            say("%s; skipping it", exc)
    return found


def select(
    allow: Iterable[str],
    libdirs: Iterable[str] = (),
    trust: Trust | None = None,
    known: list[type[Tuner]] | None = None,
) -> list[Plugin]:
    """Tuners to load, filtered by -a; an unknown name is an error.  Every
    tuner found, allowed or not, is appended to ``known`` (the journal may
    name what any of them changed)."""
    plugins: dict[str, Plugin] = {}
    candidates = [
        *(Plugin(c) for c in builtin_tuners()),
        *(Plugin(c) for c in entry_point_tuners()),
        *extra_tuners(libdirs, trust),
    ]
    for plugin in candidates:
        if plugin.cls.name in plugins:
            log.warning(
                "tuner %s from %s ignored: a tuner of that name is already known",
                plugin.cls.name,
                plugin.path or plugin.cls.__module__,
            )
            unload_plugin(plugin)
            continue
        plugins[plugin.cls.name] = plugin
    if known is not None:
        known.extend(p.cls for p in plugins.values())
    allow = list(allow)
    wanted = [normalize(a) for a in allow]
    unknown = [a for a, w in zip(allow, wanted, strict=True) if w not in plugins]
    if unknown:
        raise UsageError(f"unknown tuner '{unknown[0]}'; known tuners: {', '.join(plugins)}")
    if not wanted:
        return list(plugins.values())
    for name, p in plugins.items():
        if name not in wanted:
            unload_plugin(p)
    return [p for name, p in plugins.items() if name in wanted]
