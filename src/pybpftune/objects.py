"""BPF objects in two states: an :class:`OpenObject` is configured, a
:class:`LoadedObject` is attached and read.

``OpenObject(data, name)`` parses an object: switch programs off, share a
map's fd, size a map, set globals' initial values.  Its :meth:`~OpenObject.load`
(or :meth:`~OpenObject.adopt`, for what a loading child made of it) consumes
it and returns the :class:`LoadedObject`, which owns the libbpf ``bpf_object``
from then on with everything derived from it: links, maps (raw or typed
through the shared header), live globals, the loader's per-signal choices.
Both are context managers; ``close()`` is idempotent and tears down in
reverse order: links, mmaps, handed-over fds, object.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol, Self, TypeVar, overload

from . import libbpf
from .errors import AttachError, BpfError, BpfObjectError, LayoutError, PybpftuneError
from .resource import Resource

ELF_MAGIC = b"\x7fELF"
EM_BPF = 247
# Every program and map of ours is named "bpftune_..." (the kernel keeps 15
# characters; bpftool shows a program's full name from its BTF), so that an
# operator can tell them apart from everyone else's.  Objects are opened
# under "bpftune_<name>" too: libbpf names their data maps after the object's
# first 8 characters ("bpftune_.bss").
NAME_PREFIX = libbpf.NAME_PREFIX

# Section prefix -> program kind, the unit the support probe reasons about.
_KIND_BY_PREFIX = (
    ("tp_btf/", "tp_btf"),
    ("raw_tp/", "raw_tp"),
    ("raw_tracepoint/", "raw_tp"),
    ("fentry/", "fentry"),
    ("fexit/", "fexit"),
    ("kprobe/", "kprobe"),
    ("kretprobe/", "kretprobe"),
    ("tracepoint/", "tracepoint"),
    ("tp/", "tracepoint"),
    ("iter/", "iter"),
    ("cgroup/sysctl", "cgroup_sysctl"),
    ("sockops", "sockops"),
    ("xdp", "xdp"),
)
# Kinds that must be attached to a cgroup rather than by section name.
CGROUP_KINDS = frozenset({"cgroup_sysctl", "sockops"})
# A signal's programs that belong together (entry and exit hooks).
FAMILY_OF_KIND = {"fexit": "fentry", "kretprobe": "kprobe"}


def program_kind(section: str) -> str:
    for prefix, kind in _KIND_BY_PREFIX:
        if section.startswith(prefix):
            return kind
    return "other"


@dataclass(frozen=True)
class ProgramInfo:
    """What the loader needs to know about a program, read at open time."""

    name: str
    section: str
    kind: str

    @property
    def signal(self) -> str | None:
        """The kernel signal this program is one form of: the name between
        the "bpftune_" prefix and "__" ("bpftune_rcv_space__tp_btf" is the
        tp_btf form of rcv_space); None for a single-form program."""
        name = self.name.removeprefix(NAME_PREFIX)
        return name.split("__", 1)[0] if "__" in name else None

    @property
    def family(self) -> str:
        return FAMILY_OF_KIND.get(self.kind, self.kind)

    @property
    def target(self) -> str:
        """Function or tracepoint the section names (empty for cgroup kinds)."""
        return self.section.split("/", 1)[1] if "/" in self.section else ""


class Link(Resource):
    """An attached program; ``close()`` detaches it.  Either libbpf's handle
    (attached here) or the fd a loading child handed over (see isolate.py)."""

    def __init__(self, handle: libbpf.CData | None, program: str, fd: int | None = None) -> None:
        self._handle: libbpf.CData | None = handle
        self._fd = fd
        self.program = program

    @property
    def attached(self) -> bool:
        return self._handle is not None or self._fd is not None

    @property
    def fd(self) -> int:
        if self._fd is not None:
            return self._fd
        if self._handle is None:
            raise PybpftuneError(f"link of {self.program} is closed")
        return libbpf.link_fd(self._handle)

    def close(self) -> None:
        handle, self._handle = self._handle, None
        fd, self._fd = self._fd, None
        if handle is not None:
            libbpf.link_destroy(handle)
        if fd is not None:
            os.close(fd)


@dataclass
class SignalChoice:
    """How one signal is observed here: the chosen form and why not others
    (the loader's plan, carried by the :class:`LoadedObject`)."""

    signal: str
    forms: list[str]
    chosen: str | None = None
    rejected: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        if self.chosen is None:
            why = "; ".join(f"{f}: {r}" for f, r in self.rejected.items())
            return f"{self.signal}: unavailable ({why})"
        others = "".join(f", {f} unavailable: {r}" for f, r in self.rejected.items())
        return f"{self.signal}: {self.chosen}{others}"


class MapView(MutableMapping[bytes, bytes]):
    """A loaded map as a dict of raw bytes; sizes are checked (LayoutError,
    a ValueError)."""

    def __init__(self, name: str, fd: int, key_size: int, value_size: int) -> None:
        self.name = name
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size

    def _key(self, key: bytes) -> bytes:
        if len(key) != self.key_size:
            raise LayoutError(f"map {self.name}: key is {len(key)} bytes, expected {self.key_size}")
        return key

    def __getitem__(self, key: bytes) -> bytes:
        value = libbpf.map_lookup(self.fd, self._key(key), self.value_size)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: bytes, value: bytes) -> None:
        if len(value) != self.value_size:
            raise LayoutError(f"map {self.name}: value is {len(value)} bytes, expected {self.value_size}")
        libbpf.map_update(self.fd, self._key(key), value)

    def __delitem__(self, key: bytes) -> None:
        if not libbpf.map_delete(self.fd, self._key(key)):
            raise KeyError(key)

    def __iter__(self) -> Iterator[bytes]:
        key = libbpf.map_next_key(self.fd, None, self.key_size)
        while key is not None:
            yield key
            key = libbpf.map_next_key(self.fd, key, self.key_size)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Layout(Protocol):
    """A generated binding of a shared-header struct (pybpftune.bindings)."""

    C_TYPE: ClassVar[str]
    SIZE: ClassVar[int]

    def pack(self) -> bytes: ...

    @classmethod
    def unpack(cls, data: bytes) -> Self: ...


K = TypeVar("K", bound=Layout)
V = TypeVar("V", bound=Layout)


class TypedMap(MutableMapping[K, V]):
    """A loaded map whose keys and values are bindings of the shared header
    (frozen dataclasses: hashable keys), packed and read through them.  Built
    by ``loaded.map(name, bindings.CorrKey, bindings.Corr)``, which checks
    both sizes against the map's."""

    def __init__(self, raw: MapView, key: type[K], value: type[V]) -> None:
        for what, layout, size in (("key", key, raw.key_size), ("value", value, raw.value_size)):
            if size != layout.SIZE:
                raise LayoutError(f"map {raw.name}: {what} is {size} bytes, {layout.__name__} is {layout.SIZE}")
        self.raw = raw
        self.key_type = key
        self.value_type = value

    def __getitem__(self, key: K) -> V:
        return self.value_type.unpack(self.raw[key.pack()])

    def __setitem__(self, key: K, value: V) -> None:
        self.raw[key.pack()] = value.pack()

    def __delitem__(self, key: K) -> None:
        del self.raw[key.pack()]

    def __iter__(self) -> Iterator[K]:
        for key in self.raw:
            yield self.key_type.unpack(key)

    def __len__(self) -> int:
        return len(self.raw)


class BpfObject(Protocol):
    """What tuners and the daemon use of a loaded object: a
    :class:`LoadedObject` in the daemon, ``pybpftune.testing.SyntheticObject``
    in unit tests.  Tuners read and write its globals and maps and look at
    ``choices``; the rest (programs, autoload, unavailable, close) is the
    daemon's status and lifecycle."""

    @property
    def name(self) -> str: ...

    @property
    def choices(self) -> Mapping[str, SignalChoice]: ...

    @property
    def programs(self) -> Mapping[str, ProgramInfo]: ...

    @property
    def closed(self) -> bool: ...

    def has_global(self, name: str) -> bool: ...

    def get_global(self, name: str, signed: bool = False) -> int: ...

    def set_global(self, name: str, value: int) -> None: ...

    def global_struct(self, name: str, layout: type[V]) -> V: ...

    @overload
    def map(self, name: str) -> MutableMapping[bytes, bytes]: ...

    @overload
    def map(self, name: str, key: type[K], value: type[V]) -> MutableMapping[K, V]: ...

    def autoload(self, program: str) -> bool: ...

    def unavailable(self) -> list[SignalChoice]: ...

    def close(self) -> None: ...


def map_view(raw: MapView, key: type[K] | None, value: type[V] | None) -> MapView | TypedMap[K, V]:
    """``raw`` itself, or typed by both ``key`` and ``value`` bindings."""
    if key is None and value is None:
        return raw
    if key is None or value is None:
        raise LayoutError(f"map {raw.name}: a typed view needs both a key and a value type")
    return TypedMap(raw, key, value)


def read_object_file(path: Path) -> bytes:
    """Bytes of a BPF ELF object, or a clear BpfObjectError."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BpfObjectError(f"cannot read BPF object {path}: {exc.strerror}") from exc
    check_object_bytes(data, str(path))
    return data


def kernel_object_name(name: str) -> str:
    """The name libbpf opens an object under: "bpftune_<name>"."""
    return name if name.startswith(NAME_PREFIX) else NAME_PREFIX + name


def check_object_bytes(data: bytes, name: str) -> None:
    if len(data) < 64 or data[:4] != ELF_MAGIC:
        raise BpfObjectError(f"{name} is not an ELF file (truncated or corrupt BPF object)")
    if int.from_bytes(data[18:20], "little") != EM_BPF:
        raise BpfObjectError(f"{name} is an ELF file but not a BPF object")


class _Opened:
    """The libbpf ``bpf_object`` and what was read of it at open time; an
    OpenObject holds it until load, the LoadedObject from then on."""

    def __init__(self, data: bytes, name: str) -> None:
        check_object_bytes(data, name)
        self.name = name
        try:
            self.handle, _keepalive = libbpf.object_open(data, kernel_object_name(name))
        except BpfError as exc:
            raise BpfObjectError(f"{name}: libbpf cannot parse it ({exc}); truncated or corrupt BPF object") from exc
        # libbpf copies what it needs while opening and forgets the buffer
        # (bpf_object__elf_finish): nothing must keep the ELF bytes alive after.
        del _keepalive
        self.progs = {libbpf.program_name(p): p for p in libbpf.object_programs(self.handle)}
        self.maps = {libbpf.map_name(m): m for m in libbpf.object_maps(self.handle)}
        self.programs = {
            name: ProgramInfo(name, sec, program_kind(sec))
            for name, prog in self.progs.items()
            for sec in [libbpf.program_section(prog)]
        }

    def prog(self, name: str) -> libbpf.CData:
        try:
            return self.progs[name]
        except KeyError:
            raise PybpftuneError(f"{self.name} has no program {name!r}") from None

    def map(self, name: str) -> libbpf.CData:
        try:
            return self.maps[name]
        except KeyError:
            raise PybpftuneError(f"{self.name} has no map {name!r}") from None

    def has_global(self, name: str) -> bool:
        return libbpf.find_global(self.handle, name) is not None

    def global_location(self, name: str) -> tuple[libbpf.CData, str, int, int]:
        """(data map, its name, offset, size) of a global, from the BTF."""
        found = libbpf.find_global(self.handle, name)
        if found is None:
            raise PybpftuneError(f"{self.name} has no global variable {name!r}")
        section, offset, size = found
        for map_name, m in self.maps.items():
            if libbpf.map_is_internal(m) and map_name.endswith(section):
                return m, map_name, offset, size
        raise PybpftuneError(f"{self.name}: no data map for section {section}")

    def close(self) -> None:
        if self.handle is not None:
            libbpf.object_close(self.handle)
            self.handle = None


class _ObjectState:
    """What both states share: the :class:`_Opened` object while this state
    holds it (``_state`` says why not), its programs and maps, and integer and
    struct globals over a buffer source (initial images before load, the
    mmapped data maps after)."""

    name: str
    programs: dict[str, ProgramInfo]
    _handle: _Opened | None
    _state: str

    def _opened(self) -> _Opened:
        if self._handle is None:
            raise PybpftuneError(f"BPF object {self.name} is {self._state}")
        return self._handle

    @property
    def closed(self) -> bool:
        return self._handle is None

    def autoload(self, program: str) -> bool:
        """Whether ``program`` loads (loaded: was loaded; the loader switches other forms off)."""
        return libbpf.program_autoload(self._opened().prog(program))

    def has_map(self, name: str) -> bool:
        return name in self._opened().maps

    def _global_buffer(self, m: libbpf.CData, map_name: str) -> memoryview:
        raise NotImplementedError

    def has_global(self, name: str) -> bool:
        return self._opened().has_global(name)

    def set_global(self, name: str, value: int) -> None:
        """Set an integer global (the initial value before load, live after)."""
        m, map_name, offset, size = self._opened().global_location(name)
        buf = self._global_buffer(m, map_name)
        buf[offset : offset + size] = value.to_bytes(size, "little", signed=value < 0)

    def get_global(self, name: str, signed: bool = False) -> int:
        m, map_name, offset, size = self._opened().global_location(name)
        buf = self._global_buffer(m, map_name)
        return int.from_bytes(buf[offset : offset + size], "little", signed=signed)

    def global_bytes(self, name: str) -> bytes:
        """A copy of a global's bytes (a struct: see :meth:`global_struct`)."""
        m, map_name, offset, size = self._opened().global_location(name)
        return bytes(self._global_buffer(m, map_name)[offset : offset + size])

    def global_struct(self, name: str, layout: type[V]) -> V:
        """A struct-typed global read through its binding, e.g.
        ``global_struct("rcv_space_sample", bindings.BpftuneSample)`` (a copy);
        LayoutError if the global's size is not the struct's."""
        data = self.global_bytes(name)
        if len(data) != layout.SIZE:
            raise LayoutError(f"global {name} is {len(data)} bytes, {layout.__name__} is {layout.SIZE}")
        return layout.unpack(data)


class OpenObject(_ObjectState, Resource):
    """A BPF object opened and not loaded yet: configure it, then
    :meth:`load` it (which consumes it and returns the :class:`LoadedObject`)."""

    def __init__(self, data: bytes, name: str) -> None:
        self.name = name
        self._handle = _Opened(data, name)
        # Kept when load() takes the handle: a failed load's program names the form to drop.
        self.programs = self._handle.programs
        self._state = "open"

    @classmethod
    def from_path(cls, path: Path, name: str | None = None) -> OpenObject:
        return cls(read_object_file(path), name or path.name.split(".", 1)[0])

    def _global_buffer(self, m: libbpf.CData, map_name: str) -> memoryview:
        buf = libbpf.map_initial_value(m)
        if buf is None:
            raise PybpftuneError(f"{self.name}: map {map_name} has no initial value")
        return memoryview(buf)

    # --- configuration ----------------------------------------------------------

    def set_autoload(self, program: str, autoload: bool) -> None:
        opened = self._opened()
        libbpf.program_set_autoload(opened.prog(program), autoload)

    @property
    def map_names(self) -> list[str]:
        """Names of the object's maps, as libbpf opened them."""
        return list(self._opened().maps)

    def reuse_map(self, name: str, fd: int) -> None:
        """Make this object use an existing map (shared across objects)."""
        opened = self._opened()
        libbpf.map_reuse_fd(opened.map(name), fd)

    def set_map_max_entries(self, name: str, n: int) -> None:
        opened = self._opened()
        libbpf.map_set_max_entries(opened.map(name), n)

    # --- to the loaded state ----------------------------------------------------

    def _take(self) -> _Opened:
        opened = self._opened()
        self._handle, self._state = None, "loaded (use what load() returned)"
        return opened

    def load(self) -> LoadedObject:
        """Load every autoloaded program; BpfLoadError names the culprit.
        This object is spent either way: on success the returned object owns
        everything, on failure the libbpf object is freed."""
        opened = self._take()
        try:
            libbpf.object_load(opened.handle, self.name)
            return LoadedObject(opened)
        except BaseException:
            opened.close()
            self._state = "closed (its load failed)"
            raise

    def adopt(self, names: list[tuple[str, str]], fds: list[int]) -> LoadedObject:
        """Take over what a child loaded and attached from this same object
        (opened here with the child's autoload settings, see isolate.py): the
        returned object's programs, maps and links are these fds, which it
        closes (they are closed here on an error too)."""
        try:
            if len(names) != len(fds):
                raise PybpftuneError(f"{self.name}: {len(fds)} fds handed over for {len(names)} names")
            opened = self._take()
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        maps: dict[str, int] = {}
        progs: dict[str, int] = {}
        links: list[Link] = []
        for (kind, name), fd in zip(names, fds, strict=True):
            if kind == "link":
                links.append(Link(None, name, fd=fd))
            elif kind == "prog":
                progs[name] = fd
            else:
                maps[name] = fd
        try:
            return LoadedObject(opened, adopted=(maps, progs, links))
        except BaseException:
            for fd in fds:
                os.close(fd)
            opened.close()
            raise

    def close(self) -> None:
        """Free the libbpf object (not after load: the loaded object owns it).
        Safe to repeat."""
        if self._handle is not None:
            self._handle.close()
            self._handle, self._state = None, "closed"


class LoadedObject(_ObjectState, Resource):
    """A loaded BPF object: attach its programs, use its maps and globals,
    hand it over to a parent process.  Loaded here (:meth:`OpenObject.load`)
    or in a loading child and adopted (:meth:`OpenObject.adopt`): then its
    fds are the child's, and it attaches nothing more.  ``choices`` is the
    loader's plan (which form observes each signal, why not the others)."""

    def __init__(
        self,
        opened: _Opened,
        *,
        adopted: tuple[dict[str, int], dict[str, int], list[Link]] | None = None,
        choices: dict[str, SignalChoice] | None = None,
    ) -> None:
        self._handle = opened
        self._state = "closed"
        self.name = opened.name
        self.programs = opened.programs
        self.choices: dict[str, SignalChoice] = choices or {}
        self.links: list[Link] = []
        self._mmaps: dict[str, mmap.mmap] = {}
        # Loaded in a child: the fds it handed over, by name.
        self._adopted_maps: dict[str, int] | None = None
        self._adopted_progs: dict[str, int] = {}
        if adopted is not None:
            self._adopted_maps, self._adopted_progs, self.links = adopted
        # Map the writable globals now: Python's mmap dups the map's fd, and an
        # object should hold every fd it will ever hold from load on (a later,
        # lazy one would look like a load still going on from outside).
        for map_name, m in opened.maps.items():
            if libbpf.map_is_internal(m) and map_name.endswith((".bss", ".data")):
                try:
                    self._global_buffer(m, map_name)
                except (OSError, ValueError):
                    pass  # not mmapable on this kernel: set_global reports it when used

    def _global_buffer(self, m: libbpf.CData, map_name: str) -> memoryview:
        if map_name not in self._mmaps:
            writable = not map_name.endswith(".rodata")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self._mmaps[map_name] = mmap.mmap(self.map_fd(map_name), libbpf.map_value_size(m), mmap.MAP_SHARED, prot)
        return memoryview(self._mmaps[map_name])

    def unavailable(self) -> list[SignalChoice]:
        """The signals no form of which works here (optional ones only)."""
        return [c for c in self.choices.values() if c.chosen is None]

    # --- maps and programs ---------------------------------------------------------

    @overload
    def map(self, name: str) -> MapView: ...

    @overload
    def map(self, name: str, key: type[K], value: type[V]) -> TypedMap[K, V]: ...

    def map(self, name: str, key: type[K] | None = None, value: type[V] | None = None) -> MapView | TypedMap[K, V]:
        """The map as raw bytes (:class:`MapView`), or with ``key`` and
        ``value`` bindings of the shared header, as a :class:`TypedMap`:
        ``loaded.map("bpftune_corr", bindings.CorrKey, bindings.Corr)``."""
        m = self._opened().map(name)
        return map_view(MapView(name, self.map_fd(name), libbpf.map_key_size(m), libbpf.map_value_size(m)), key, value)

    def map_fd(self, name: str) -> int:
        m = self._opened().map(name)
        if self._adopted_maps is not None:
            return self._adopted_maps.get(name, -1)
        return libbpf.map_fd(m)

    def program_fd(self, name: str) -> int:
        prog = self._opened().prog(name)
        if self._adopted_maps is not None:
            return self._adopted_progs.get(name, -1)
        return libbpf.program_fd(prog)

    def attach(self, program: str, cgroup_fd: int | None = None) -> Link:
        """Attach one loaded program; cgroup kinds need ``cgroup_fd``."""
        opened = self._opened()
        if self._adopted_maps is not None:
            raise PybpftuneError(f"{self.name} was loaded in a child process: attach there")
        info = self.programs.get(program)
        prog = opened.prog(program)
        with libbpf.capture_log() as lines:
            try:
                if info is not None and info.kind in CGROUP_KINDS:
                    if cgroup_fd is None:
                        raise PybpftuneError(f"{program} is a cgroup program: a cgroup is needed to attach it")
                    handle = libbpf.program_attach_cgroup(prog, cgroup_fd)
                else:
                    handle = libbpf.program_attach(prog)
            except BpfError as exc:
                detail = " | ".join(line for line in lines[-2:] if line.strip())
                raise AttachError(
                    f"attaching {self.name}:{program}" + (f" ({detail})" if detail else ""), exc.errno
                ) from exc
        link = Link(handle, program)
        self.links.append(link)
        return link

    # --- loading in a child (isolate.py) ---------------------------------------

    def handover(self) -> tuple[list[tuple[str, str]], list[int]]:
        """In the child that loaded and attached this object: what to send the
        parent's :meth:`OpenObject.adopt` (which kind and name each fd is) and
        the fds."""
        opened = self._opened()
        names: list[tuple[str, str]] = []
        fds: list[int] = []
        for name, prog in opened.progs.items():
            fd = libbpf.program_fd(prog)
            if fd >= 0:
                names.append(("prog", name))
                fds.append(fd)
        for name, m in opened.maps.items():
            fd = libbpf.map_fd(m)
            if fd >= 0:
                names.append(("map", name))
                fds.append(fd)
        for link in self.links:
            if link.attached:
                names.append(("link", link.program))
                fds.append(link.fd)
        return names, fds

    # --- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Detach links, unmap globals, close handed-over fds, free the
        object.  Safe to repeat."""
        opened, self._handle = self._handle, None
        if opened is None:
            return
        for link in reversed(self.links):
            link.close()
        self.links.clear()
        for mm in self._mmaps.values():
            mm.close()
        self._mmaps.clear()
        for fd in [*(self._adopted_maps or {}).values(), *self._adopted_progs.values()]:
            os.close(fd)
        self._adopted_progs.clear()
        if self._adopted_maps is not None:
            self._adopted_maps.clear()
        opened.close()
