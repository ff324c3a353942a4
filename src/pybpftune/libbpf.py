"""The only module that calls into the cffi binding of libbpf.

Every function here is a thin, typed wrapper that turns libbpf's error
conventions (negative errno, NULL plus errno) into typed exceptions, and every
line libbpf prints goes to the ``pybpftune.libbpf`` logger and into a short
history that load errors carry.  Higher layers (objects, ringbuf, support)
hold the returned handles but never touch ``lib`` themselves.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import BpfError, BpfLoadError, LayoutError, PybpftuneError

try:
    from ._libbpf import ffi, lib
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise PybpftuneError(
        f"the pybpftune C extension is not built or cannot load ({exc}); run `make` in the checkout"
    ) from exc

EXT_ABI = 2
if lib.PYBPFTUNE_EXT_ABI != EXT_ABI:  # pragma: no cover
    raise PybpftuneError(
        f"stale pybpftune extension (ABI {lib.PYBPFTUNE_EXT_ABI}, need {EXT_ABI}); rebuild with `make`"
    )

CData = Any  # cffi pointers; kept opaque outside this module

log = logging.getLogger("pybpftune.libbpf")

LEVEL_WARN = int(lib.LIBBPF_WARN)
LEVEL_INFO = int(lib.LIBBPF_INFO)
LEVEL_DEBUG = int(lib.LIBBPF_DEBUG)

PROG_TYPE_KPROBE = int(lib.BPF_PROG_TYPE_KPROBE)
PROG_TYPE_TRACEPOINT = int(lib.BPF_PROG_TYPE_TRACEPOINT)
PROG_TYPE_RAW_TRACEPOINT = int(lib.BPF_PROG_TYPE_RAW_TRACEPOINT)
PROG_TYPE_TRACING = int(lib.BPF_PROG_TYPE_TRACING)
PROG_TYPE_CGROUP_SYSCTL = int(lib.BPF_PROG_TYPE_CGROUP_SYSCTL)
PROG_TYPE_SOCK_OPS = int(lib.BPF_PROG_TYPE_SOCK_OPS)
PROG_TYPE_XDP = int(lib.BPF_PROG_TYPE_XDP)
MAP_TYPE_RINGBUF = int(lib.BPF_MAP_TYPE_RINGBUF)
MAP_TYPE_HASH = int(lib.BPF_MAP_TYPE_HASH)
ATTACH_CGROUP_SYSCTL = int(lib.BPF_CGROUP_SYSCTL)
ATTACH_CGROUP_SOCK_OPS = int(lib.BPF_CGROUP_SOCK_OPS)
ATTACH_TRACE_FENTRY = int(lib.BPF_TRACE_FENTRY)
ATTACH_TRACE_FEXIT = int(lib.BPF_TRACE_FEXIT)
ATTACH_TRACE_RAW_TP = int(lib.BPF_TRACE_RAW_TP)
ATTACH_TRACE_ITER = int(lib.BPF_TRACE_ITER)
UPDATE_ANY = int(lib.BPF_ANY)
UPDATE_NOEXIST = int(lib.BPF_NOEXIST)
UPDATE_EXIST = int(lib.BPF_EXIST)
MAX_TUNERS = int(lib.BPFTUNE_MAX_TUNERS)
MAX_VALUES = int(lib.BPFTUNE_MAX_VALUES)
MAX_UPDATES = int(lib.BPFTUNE_MAX_UPDATES)
MAX_STR = int(lib.BPFTUNE_MAX_STR)
NETNS_UNKNOWN = int(lib.BPFTUNE_NETNS_UNKNOWN)
EVENT_SIZE = int(ffi.sizeof("struct bpftune_event"))
# What every program and map of ours is named (see objects.NAME_PREFIX).
NAME_PREFIX = "bpftune_"

# --- libbpf's print callback -------------------------------------------------

_HISTORY: collections.deque[str] = collections.deque(maxlen=400)
_capture = threading.local()
# In a child that loads for the daemon (isolate.py): every line, to send back.
_child_lines: collections.deque[str] | None = None


@ffi.def_extern()  # type: ignore[untyped-decorator]
def pybpftune_libbpf_log(level: int, line: CData) -> None:
    text = ffi.string(line).decode(errors="replace").rstrip("\n")
    _HISTORY.append(text)
    lines = getattr(_capture, "lines", None)
    if lines is not None:
        lines.append(text)
    if _child_lines is not None:
        _child_lines.append(text)
    log.debug("%s", text)


lib.pybpftune_install_print()


@contextmanager
def capture_log() -> Iterator[list[str]]:
    """Collect what libbpf prints in this thread during the block."""
    previous = getattr(_capture, "lines", None)
    lines: list[str] = []
    _capture.lines = lines
    try:
        yield lines
    finally:
        _capture.lines = previous


def keep_log_in_child() -> collections.deque[str]:
    """In a forked loading child: keep what libbpf prints (the last lines)
    for the parent, which logs them with :func:`replay_log`."""
    global _child_lines
    _child_lines = collections.deque(maxlen=_HISTORY.maxlen)
    return _child_lines


def replay_log(lines: list[str]) -> None:
    """What libbpf printed in a loading child, as if printed here."""
    for text in lines:
        _HISTORY.append(text)
        log.debug("%s", text)


def version() -> str:
    return f"{lib.libbpf_major_version()}.{lib.libbpf_minor_version()}"


# --- helpers -----------------------------------------------------------------


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise BpfError(what, ret)
    return ret


def _check_ptr(ptr: CData, what: str) -> CData:
    if ptr == ffi.NULL:
        raise BpfError(what, ffi.errno or 22)
    return ptr


def _str(ptr: CData) -> str:
    return "" if ptr == ffi.NULL else ffi.string(ptr).decode()


# --- objects -----------------------------------------------------------------


def object_open(data: bytes, name: str) -> tuple[CData, CData]:
    """Open an object from memory.  Returns (object, keepalive buffer)."""
    opts = ffi.new("struct bpf_object_open_opts *")
    opts.sz = ffi.sizeof("struct bpf_object_open_opts")
    cname = ffi.new("char[]", name.encode())
    opts.object_name = cname
    buf = ffi.from_buffer(data)
    obj = _check_ptr(lib.bpf_object__open_mem(buf, len(data), opts), f"opening BPF object {name}")
    return obj, (buf, cname, data)


def object_load(obj: CData, name: str) -> None:
    """Load every autoloaded program and create the maps.  BpfLoadError
    carries the last lines libbpf printed (the verifier's log of the program
    that failed, which it names)."""
    with capture_log() as lines:
        err = int(lib.bpf_object__load(obj))
    if err < 0:
        raise BpfLoadError(name, err, lines[-40:], failed_program(lines))


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


def object_close(obj: CData) -> None:
    lib.bpf_object__close(obj)


def object_programs(obj: CData) -> list[CData]:
    progs = []
    prog = lib.bpf_object__next_program(obj, ffi.NULL)
    while prog != ffi.NULL:
        progs.append(prog)
        prog = lib.bpf_object__next_program(obj, prog)
    return progs


def object_maps(obj: CData) -> list[CData]:
    maps = []
    m = lib.bpf_object__next_map(obj, ffi.NULL)
    while m != ffi.NULL:
        maps.append(m)
        m = lib.bpf_object__next_map(obj, m)
    return maps


def find_global(obj: CData, name: str) -> tuple[str, int, int] | None:
    """(data section, offset, size) of a global variable, from the object's BTF."""
    section = ffi.new("char[64]")
    offset = ffi.new("unsigned int *")
    size = ffi.new("unsigned int *")
    if lib.pybpftune_find_global(obj, name.encode(), section, 64, offset, size) < 0:
        return None
    return ffi.string(section).decode(), int(offset[0]), int(size[0])


# --- programs ----------------------------------------------------------------


def program_name(prog: CData) -> str:
    return _str(lib.bpf_program__name(prog))


def program_section(prog: CData) -> str:
    return _str(lib.bpf_program__section_name(prog))


def program_type(prog: CData) -> int:
    return int(lib.bpf_program__type(prog))


def program_attach_type(prog: CData) -> int:
    return int(lib.bpf_program__expected_attach_type(prog))


def program_autoload(prog: CData) -> bool:
    return bool(lib.bpf_program__autoload(prog))


def program_set_autoload(prog: CData, autoload: bool) -> None:
    _check(lib.bpf_program__set_autoload(prog, autoload), "setting autoload")


def program_fd(prog: CData) -> int:
    return int(lib.bpf_program__fd(prog))


def program_attach(prog: CData) -> CData:
    """Attach by section name (tracing, tracepoints, kprobes, iterators)."""
    return _check_ptr(lib.bpf_program__attach(prog), f"attaching {program_name(prog)}")


def program_attach_cgroup(prog: CData, cgroup_fd: int) -> CData:
    return _check_ptr(lib.bpf_program__attach_cgroup(prog, cgroup_fd), f"attaching {program_name(prog)} to cgroup")


def link_fd(link: CData) -> int:
    """The fd that keeps an attachment alive (a BPF link, or the perf event
    of an ioctl-attached kprobe or tracepoint): closing it detaches."""
    return int(lib.bpf_link__fd(link))


def link_destroy(link: CData) -> None:
    lib.bpf_link__destroy(link)


def prog_test_run(prog_fd: int, data: bytes, repeat: int) -> int:
    """BPF_PROG_TEST_RUN; returns the program's return value."""
    opts = ffi.new("struct bpf_test_run_opts *")
    opts.sz = ffi.sizeof("struct bpf_test_run_opts")
    buf = ffi.from_buffer(data)
    opts.data_in = buf
    opts.data_size_in = len(data)
    opts.repeat = repeat
    _check(lib.bpf_prog_test_run_opts(prog_fd, opts), "BPF_PROG_TEST_RUN")
    return int(opts.retval)


# --- maps --------------------------------------------------------------------


def map_name(m: CData) -> str:
    return _str(lib.bpf_map__name(m))


def map_type(m: CData) -> int:
    return int(lib.bpf_map__type(m))


def map_key_size(m: CData) -> int:
    return int(lib.bpf_map__key_size(m))


def map_value_size(m: CData) -> int:
    return int(lib.bpf_map__value_size(m))


def map_max_entries(m: CData) -> int:
    return int(lib.bpf_map__max_entries(m))


def map_set_max_entries(m: CData, n: int) -> None:
    _check(lib.bpf_map__set_max_entries(m, n), f"sizing map {map_name(m)}")


def map_fd(m: CData) -> int:
    return int(lib.bpf_map__fd(m))


def map_reuse_fd(m: CData, fd: int) -> None:
    _check(lib.bpf_map__reuse_fd(m, fd), f"sharing map {map_name(m)}")


def map_is_internal(m: CData) -> bool:
    return bool(lib.bpf_map__is_internal(m))


def map_initial_value(m: CData) -> CData | None:
    """Writable view of an internal map's initial contents (before load)."""
    size = ffi.new("size_t *")
    ptr = lib.bpf_map__initial_value(m, size)
    if ptr == ffi.NULL:
        return None
    return ffi.buffer(ffi.cast("char *", ptr), size[0])


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """Value for key, or None when the key is absent."""
    value = ffi.new("char[]", value_size)
    if lib.bpf_map_lookup_elem(fd, ffi.from_buffer(key), value) < 0:
        err = ffi.errno
        if err == 2:  # ENOENT
            return None
        raise BpfError("map lookup", err)
    return bytes(ffi.buffer(value, value_size))


def map_update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    _check(lib.bpf_map_update_elem(fd, ffi.from_buffer(key), ffi.from_buffer(value), flags), "map update")


def map_delete(fd: int, key: bytes) -> bool:
    """Delete key; False when it was absent."""
    if lib.bpf_map_delete_elem(fd, ffi.from_buffer(key)) < 0:
        err = ffi.errno
        if err == 2:
            return False
        raise BpfError("map delete", err)
    return True


def map_next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    nxt = ffi.new("char[]", key_size)
    cur = ffi.NULL if key is None else ffi.from_buffer(key)
    if lib.bpf_map_get_next_key(fd, cur, nxt) < 0:
        err = ffi.errno
        if err == 2:
            return None
        raise BpfError("map iteration", err)
    return bytes(ffi.buffer(nxt, key_size))


def probe_map_type(map_type_id: int) -> bool:
    """Can this kernel create maps of the type (e.g. the BPF ring buffer)?"""
    return int(lib.libbpf_probe_bpf_map_type(map_type_id, ffi.NULL)) == 1


# --- kernel-wide program inventory --------------------------------------------


def program_full_name(prog_fd: int) -> str:
    """A loaded program's full name: its BTF function name, as bpftool shows
    it ("bpftune_sysctl_write__cgroup_sysctl"), else the kernel's name, which
    the kernel cuts at 15 characters ("bpftune_sysctl_")."""
    buf = ffi.new("char[256]")
    _check(lib.pybpftune_prog_full_name(prog_fd, buf, 256), "reading program info")
    return str(ffi.string(buf).decode(errors="replace"))


def loaded_programs(full_names: bool = False) -> Iterator[tuple[int, str, int]]:
    """(id, name, type) of every BPF program loaded in the kernel; with
    ``full_names``, the full name of each program whose kernel name starts
    with "bpftune_" (reading BTF costs, so only for those)."""
    next_id = ffi.new("__u32 *")
    cur = 0
    info = ffi.new("struct bpf_prog_info *")
    info_len = ffi.new("__u32 *")
    while lib.bpf_prog_get_next_id(cur, next_id) == 0:
        cur = int(next_id[0])
        fd = lib.bpf_prog_get_fd_by_id(cur)
        if fd < 0:
            continue
        try:
            ffi.memmove(info, b"\0" * ffi.sizeof(info[0]), ffi.sizeof(info[0]))
            info_len[0] = ffi.sizeof(info[0])
            if lib.bpf_obj_get_info_by_fd(fd, info, info_len) == 0:
                name = ffi.string(info.name).decode(errors="replace")
                if full_names and name.startswith(NAME_PREFIX):
                    name = program_full_name(fd)
                yield cur, name, int(info.type)
        finally:
            os.close(fd)


def cgroup_programs(cgroup_fd: int, attach_type: int) -> list[int]:
    """Ids of programs attached to a cgroup for one attach type."""
    ids = ffi.new("__u32[]", 64)
    count = ffi.new("__u32 *", 64)
    flags = ffi.new("__u32 *")
    _check(lib.bpf_prog_query(cgroup_fd, attach_type, 0, flags, ids, count), "querying cgroup programs")
    return [int(ids[i]) for i in range(count[0])]


def prog_fd_by_id(prog_id: int) -> int:
    return _check(lib.bpf_prog_get_fd_by_id(prog_id), f"opening program id {prog_id}")


def prog_detach(prog_fd: int, cgroup_fd: int, attach_type: int) -> None:
    _check(lib.bpf_prog_detach2(prog_fd, cgroup_fd, attach_type), "detaching program from cgroup")


# --- events and ring buffers ---------------------------------------------------


def event_view(data: bytes) -> CData:
    """Typed read-only view of one copied ring-buffer record."""
    return ffi.from_buffer("struct bpftune_event *", data)


def struct_view(type_name: str, data: bytes | bytearray) -> CData:
    """Typed view of bytes as a struct from the shared header."""
    return ffi.from_buffer(f"{type_name} *", data)


def struct_bytes(view: CData, size: int) -> bytes:
    """Copy of the bytes behind a struct view."""
    return bytes(ffi.buffer(view, size))


def union_offset() -> int:
    """Offset of the payload union in struct bpftune_event."""
    return int(ffi.offsetof("struct bpftune_event", "update"))


def c_string(chars: CData) -> str:
    """A NUL-terminated char array field of a struct view, as text."""
    return str(ffi.string(chars).decode(errors="replace"))


# --- layouts from the shared header ---------------------------------------------
#
# src/bpf/bpftune_shared.h is compiled into the BPF objects and flattened into
# the cffi cdef, so these read every size, field and enum value from the same
# text the BPF side uses: Python code names a type and never repeats a layout.
# Values are read and written through pybpftune.bindings (generated from it).


def _ctype(type_name: str) -> CData:
    try:
        return ffi.typeof(type_name)
    except (ffi.error, KeyError, TypeError) as exc:
        raise LayoutError(f"{type_name!r} is not a type of the shared header ({exc})") from None


def struct_size(type_name: str) -> int:
    """sizeof(type_name) as clang laid it out for the BPF side, e.g.
    ``struct_size("struct tcp_buffer_hold")``."""
    ctype = _ctype(type_name)
    try:
        return int(ffi.sizeof(ctype))
    except ffi.error as exc:
        raise LayoutError(f"{type_name!r} has no size ({exc})") from None


def struct_field_names(type_name: str) -> list[str]:
    """The fields of a struct or union, in declaration order (to check a
    dataclass that mirrors one, or to build one from it)."""
    ctype = _ctype(type_name)
    if ctype.kind not in ("struct", "union"):
        raise LayoutError(f"{type_name!r} is a {ctype.kind}, not a struct or union")
    return [name for name, _field in ctype.fields]


def enum_members(c_enum: str) -> dict[str, int]:
    """Name -> value of an enum of the shared header ("enum tcp_buffer_tunable"),
    in value order (pybpftune.bindings has an IntEnum of each)."""
    ctype = _ctype(c_enum)
    if ctype.kind != "enum":
        raise LayoutError(f"{c_enum!r} is a {ctype.kind}, not an enum")
    return {str(name): int(value) for name, value in sorted(ctype.relements.items(), key=lambda kv: kv[1])}


def header_constant(name: str) -> int:
    """An enum member or integer #define of the shared header, by C name."""
    return int(getattr(lib, name))


def fit(data: bytes | bytearray, size: int) -> bytes | bytearray:
    """``data`` padded with zeros to at least ``size`` bytes (a short record
    reads as zeros, never past its end)."""
    return data if len(data) >= size else bytes(data) + bytes(size - len(data))


def array_bytes(array: CData) -> bytes:
    """The bytes of an array field of a struct view."""
    return bytes(ffi.buffer(array))


def set_array(array: CData, values: bytes | tuple[int, ...]) -> None:
    """Fill an array field from its start (at most its length); the rest stays."""
    n = min(len(array), len(values))
    for i in range(n):
        array[i] = values[i]


def set_c_string(array: CData, text: str) -> None:
    """A char array field: ``text``, truncated to leave its NUL."""
    raw = text.encode()[: len(array) - 1]
    ffi.memmove(array, raw + b"\0", len(raw) + 1)


RingCallback = Callable[[bytes], int]
# A callback's negative return stops libbpf's drain after the current record
# (which counts as consumed); ring_buffer__poll then returns that value.
STOP_DRAIN = -11  # -EAGAIN
_interrupted = threading.local()


@ffi.def_extern()  # type: ignore[untyped-decorator]
def pybpftune_ringbuf_event(ctx: CData, data: CData, size: int) -> int:
    # cffi would print and swallow anything raised here (even KeyboardInterrupt
    # from a signal); keep it and re-raise once libbpf has returned.
    try:
        callback: RingCallback = ffi.from_handle(ctx)
        return callback(ffi.buffer(data, size)[:])
    except BaseException as exc:
        _interrupted.exc = exc
        return STOP_DRAIN


def _reraise_interrupt() -> None:
    exc = getattr(_interrupted, "exc", None)
    if exc is not None:
        _interrupted.exc = None
        raise exc


def ring_buffer_new(map_fd: int, callback: RingCallback) -> tuple[CData, CData]:
    """A libbpf ring_buffer consumer; returns (ring, keepalive handle)."""
    handle = ffi.new_handle(callback)
    rb = _check_ptr(lib.ring_buffer__new(map_fd, lib.pybpftune_ringbuf_event, handle, ffi.NULL), "creating ring buffer")
    return rb, handle


def ring_buffer_poll(rb: CData, timeout_ms: int) -> int:
    """Events consumed, or negative errno (EINTR is reported, not raised)."""
    n = int(lib.ring_buffer__poll(rb, timeout_ms))
    _reraise_interrupt()
    return n


def ring_buffer_consume(rb: CData) -> int:
    n = int(lib.ring_buffer__consume(rb))
    _reraise_interrupt()
    return n


def ring_buffer_epoll_fd(rb: CData) -> int:
    return int(lib.ring_buffer__epoll_fd(rb))


def ring_buffer_free(rb: CData) -> None:
    lib.ring_buffer__free(rb)
