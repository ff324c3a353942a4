"""BPF objects: open -> configure -> load -> attach -> close.

A :class:`BpfObject` owns one libbpf ``bpf_object`` and everything derived
from it (links, mmaps of its global-data maps).  Configure it between open and
load (share a map's fd, switch programs off, set globals), then load and
attach.  ``close()`` is idempotent and tears down in reverse order: links,
mmaps, object.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from . import libbpf
from .errors import AttachError, BpfError, BpfLoadError, BpfObjectError, PybpftuneError

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


class Link:
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

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MapView(MutableMapping[bytes, bytes]):
    """A loaded map as a dict of raw bytes; sizes are checked."""

    def __init__(self, name: str, fd: int, key_size: int, value_size: int) -> None:
        self.name = name
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size

    def _key(self, key: bytes) -> bytes:
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key is {len(key)} bytes, expected {self.key_size}")
        return key

    def __getitem__(self, key: bytes) -> bytes:
        value = libbpf.map_lookup(self.fd, self._key(key), self.value_size)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: bytes, value: bytes) -> None:
        if len(value) != self.value_size:
            raise ValueError(f"map {self.name}: value is {len(value)} bytes, expected {self.value_size}")
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


class BpfObject:
    """One BPF object file through its whole life."""

    def __init__(self, data: bytes, name: str) -> None:
        check_object_bytes(data, name)
        self.name = name
        try:
            self._obj, self._keepalive = libbpf.object_open(data, kernel_object_name(name))
        except BpfError as exc:
            raise BpfObjectError(f"{name}: libbpf cannot parse it ({exc}); truncated or corrupt BPF object") from exc
        # libbpf copies what it needs while opening and forgets the buffer
        # (bpf_object__elf_finish): nothing must keep the ELF bytes alive after.
        self._keepalive = None
        self._progs = {libbpf.program_name(p): p for p in libbpf.object_programs(self._obj)}
        self._maps = {libbpf.map_name(m): m for m in libbpf.object_maps(self._obj)}
        self.programs = {
            name: ProgramInfo(name, sec, program_kind(sec))
            for name, prog in self._progs.items()
            for sec in [libbpf.program_section(prog)]
        }
        self.loaded = False
        self.links: list[Link] = []
        self._mmaps: dict[str, mmap.mmap] = {}
        self._closed = False
        # Loaded in a child (adopt()): the fds it handed over, by name.
        self._adopted: dict[str, int] | None = None
        self._adopted_progs: dict[str, int] = {}

    @classmethod
    def from_path(cls, path: Path, name: str | None = None) -> BpfObject:
        return cls(read_object_file(path), name or path.name.split(".", 1)[0])

    # --- configuration (before load) ---------------------------------------

    def _prog(self, name: str) -> libbpf.CData:
        try:
            return self._progs[name]
        except KeyError:
            raise PybpftuneError(f"{self.name} has no program {name!r}") from None

    def _map(self, name: str) -> libbpf.CData:
        try:
            return self._maps[name]
        except KeyError:
            raise PybpftuneError(f"{self.name} has no map {name!r}") from None

    def set_autoload(self, program: str, autoload: bool) -> None:
        self._require_open()
        libbpf.program_set_autoload(self._prog(program), autoload)

    def autoload(self, program: str) -> bool:
        return libbpf.program_autoload(self._prog(program))

    def has_map(self, name: str) -> bool:
        return name in self._maps

    @property
    def map_names(self) -> list[str]:
        """Names of the object's maps, as libbpf opened them."""
        return list(self._maps)

    def reuse_map(self, name: str, fd: int) -> None:
        """Make this object use an existing map (shared across objects)."""
        self._require_open()
        libbpf.map_reuse_fd(self._map(name), fd)

    def set_map_max_entries(self, name: str, n: int) -> None:
        self._require_open()
        libbpf.map_set_max_entries(self._map(name), n)

    def _require_open(self) -> None:
        if self._closed:
            raise PybpftuneError(f"BPF object {self.name} is closed")
        if self.loaded:
            raise PybpftuneError(f"BPF object {self.name} is already loaded")

    # --- globals ---------------------------------------------------------------

    def _global_location(self, name: str) -> tuple[libbpf.CData, str, int, int]:
        found = libbpf.find_global(self._obj, name)
        if found is None:
            raise PybpftuneError(f"{self.name} has no global variable {name!r}")
        section, offset, size = found
        for map_name, m in self._maps.items():
            if libbpf.map_is_internal(m) and map_name.endswith(section):
                return m, map_name, offset, size
        raise PybpftuneError(f"{self.name}: no data map for section {section}")

    def _global_buffer(self, m: libbpf.CData, map_name: str) -> memoryview:
        if not self.loaded:
            buf = libbpf.map_initial_value(m)
            if buf is None:
                raise PybpftuneError(f"{self.name}: map {map_name} has no initial value")
            return memoryview(buf)
        if map_name not in self._mmaps:
            writable = not map_name.endswith(".rodata")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self._mmaps[map_name] = mmap.mmap(self.map_fd(map_name), libbpf.map_value_size(m), mmap.MAP_SHARED, prot)
        return memoryview(self._mmaps[map_name])

    def has_global(self, name: str) -> bool:
        return libbpf.find_global(self._obj, name) is not None

    def set_global(self, name: str, value: int) -> None:
        """Set an integer global: initial value before load, live after."""
        m, map_name, offset, size = self._global_location(name)
        buf = self._global_buffer(m, map_name)
        signed = value < 0
        buf[offset : offset + size] = value.to_bytes(size, "little", signed=signed)

    def global_bytes(self, name: str) -> bytes:
        """A copy of a global's bytes (a struct: read it with libbpf.struct_view)."""
        m, map_name, offset, size = self._global_location(name)
        return bytes(self._global_buffer(m, map_name)[offset : offset + size])

    def get_global(self, name: str, signed: bool = False) -> int:
        m, map_name, offset, size = self._global_location(name)
        buf = self._global_buffer(m, map_name)
        return int.from_bytes(buf[offset : offset + size], "little", signed=signed)

    # --- load and attach ----------------------------------------------------------

    def load(self) -> None:
        """Load every autoloaded program; BpfLoadError names the culprit."""
        self._require_open()
        with libbpf.capture_log() as lines:
            err = libbpf.object_load(self._obj)
        if err < 0:
            raise BpfLoadError(self.name, err, lines[-40:], failed_program(lines))
        self._loaded()

    def _loaded(self) -> None:
        self.loaded = True
        # Map the writable globals now: Python's mmap dups the map's fd, and an
        # object should hold every fd it will ever hold from load on (a later,
        # lazy one would look like a load still going on from outside).
        for map_name, m in self._maps.items():
            if libbpf.map_is_internal(m) and map_name.endswith((".bss", ".data")):
                try:
                    self._global_buffer(m, map_name)
                except (OSError, ValueError):
                    pass  # not mmapable on this kernel: set_global reports it when used

    # --- loading in a child (isolate.py) ---------------------------------------

    def handover(self) -> tuple[list[tuple[str, str]], list[int]]:
        """In the child that loaded and attached this object: what to send the
        parent's :meth:`adopt` (which kind and name each fd is) and the fds."""
        if not self.loaded:
            raise PybpftuneError(f"{self.name}: hand-over before load")
        names: list[tuple[str, str]] = []
        fds: list[int] = []
        for name, prog in self._progs.items():
            fd = libbpf.program_fd(prog)
            if fd >= 0:
                names.append(("prog", name))
                fds.append(fd)
        for name, m in self._maps.items():
            fd = libbpf.map_fd(m)
            if fd >= 0:
                names.append(("map", name))
                fds.append(fd)
        for link in self.links:
            if link.attached:
                names.append(("link", link.program))
                fds.append(link.fd)
        return names, fds

    def adopt(self, names: list[tuple[str, str]], fds: list[int]) -> None:
        """Take over what a child loaded and attached from this same object
        (opened here, with the child's autoload settings): from now on the
        programs, maps and links are these fds, which this object closes
        (on an error here too)."""
        try:
            self._require_open()
            if len(names) != len(fds):
                raise PybpftuneError(f"{self.name}: {len(fds)} fds handed over for {len(names)} names")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self._adopted = {}
        for (kind, name), fd in zip(names, fds, strict=True):
            if kind == "link":
                self.links.append(Link(None, name, fd=fd))
            elif kind == "prog":
                self._adopted_progs[name] = fd
            else:
                self._adopted[name] = fd
        self._loaded()

    def map(self, name: str) -> MapView:
        if not self.loaded:
            raise PybpftuneError(f"{self.name}: maps are usable only after load")
        m = self._map(name)
        return MapView(name, self.map_fd(name), libbpf.map_key_size(m), libbpf.map_value_size(m))

    def map_fd(self, name: str) -> int:
        m = self._map(name)
        if self._adopted is not None:
            return self._adopted.get(name, -1)
        return libbpf.map_fd(m)

    def program_fd(self, name: str) -> int:
        prog = self._prog(name)
        if self._adopted is not None:
            return self._adopted_progs.get(name, -1)
        return libbpf.program_fd(prog)

    def attach(self, program: str, cgroup_fd: int | None = None) -> Link:
        """Attach one loaded program; cgroup kinds need ``cgroup_fd``."""
        if not self.loaded:
            raise PybpftuneError(f"{self.name}: attach before load")
        if self._adopted is not None:
            raise PybpftuneError(f"{self.name} was loaded in a child process: attach there")
        info = self.programs.get(program)
        prog = self._prog(program)
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

    def close(self) -> None:
        """Detach links, unmap globals, free the object.  Safe to repeat."""
        if self._closed:
            return
        self._closed = True
        for link in reversed(self.links):
            link.close()
        self.links.clear()
        for mm in self._mmaps.values():
            mm.close()
        self._mmaps.clear()
        for fd in [*(self._adopted or {}).values(), *self._adopted_progs.values()]:
            os.close(fd)
        self._adopted_progs.clear()
        if self._adopted is not None:
            self._adopted.clear()
        libbpf.object_close(self._obj)
        self._obj = None
        self._keepalive = None

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def failed_program(lines: list[str]) -> str | None:
    """Name of the program libbpf says failed to load, from its log."""
    for line in reversed(lines):
        marker = "prog '"
        start = line.find(marker)
        if start >= 0 and ("failed to load" in line or "load failed" in line or "failed to find" in line):
            end = line.find("'", start + len(marker))
            if end > start:
                return line[start + len(marker) : end]
    return None
