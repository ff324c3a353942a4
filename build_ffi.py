"""cffi (API mode) build of pybpftune._libbpf against the system libbpf.

The cdef is assembled from src/pybpftune/_cdef/*.h and from the shared layout
header src/bpf/bpftune_shared.h, which the C preprocessor flattens first so
that the very same file clang compiles into the BPF objects also defines the
structs Python reads.  Run directly (from src/) for an in-place build, or via
setup.py's cffi_modules.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import cffi

ROOT = Path(__file__).resolve().parent
CDEF_DIR = ROOT / "src" / "pybpftune" / "_cdef"
SHARED_HEADER = ROOT / "src" / "bpf" / "bpftune_shared.h"
# Bump when the cdef or the shims change incompatibly; checked at import.
EXT_ABI = 2
MIN_LIBBPF = (1, 0)  # major, minor

INT_TYPEDEFS = """
typedef unsigned char __u8; typedef unsigned short __u16; typedef unsigned int __u32;
typedef unsigned long long __u64; typedef signed char __s8; typedef short __s16; typedef int __s32;
typedef long long __s64;
"""


def shared_header_cdef() -> str:
    """Flatten the shared header with cpp: macros become literal numbers."""
    out = subprocess.run(
        [os.environ.get("CC", "cc"), "-E", "-P", "-dD", "-DPYBPFTUNE_CDEF", "-x", "c", str(SHARED_HEADER)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    keep = []
    for line in out.splitlines():
        if line.startswith("#define "):
            parts = line.split(None, 2)
            # Only plain integer constants may go to the cdef.
            if len(parts) == 3 and parts[1].isidentifier() and parts[1].startswith("BPFTUNE_"):
                value = parts[2].rstrip("ULul") if parts[2][-1:] in "ULul" else parts[2]
                if value.lstrip("-").isdigit() or value.startswith("0x"):
                    keep.append(f"#define {parts[1]} {int(value, 0)}")
            continue
        if line.startswith("#"):
            continue
        keep.append(line)
    return "\n".join(keep)


def libbpf_build_args() -> dict[str, list[str]]:
    """Compiler and linker flags for the system libbpf, via pkg-config."""
    try:
        cflags = subprocess.run(["pkg-config", "--cflags", "libbpf"], check=True, capture_output=True, text=True)
        libs = subprocess.run(["pkg-config", "--libs", "libbpf"], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return {"libraries": ["bpf"], "include_dirs": [], "library_dirs": []}
    include_dirs = [f[2:] for f in cflags.stdout.split() if f.startswith("-I")]
    library_dirs = [f[2:] for f in libs.stdout.split() if f.startswith("-L")]
    libraries = [f[2:] for f in libs.stdout.split() if f.startswith("-l")]
    return {"libraries": libraries or ["bpf"], "include_dirs": include_dirs, "library_dirs": library_dirs}


SOURCE = (
    f"#define PYBPFTUNE_EXT_ABI {EXT_ABI}\n#define PYBPFTUNE_MIN_LIBBPF_MAJOR {MIN_LIBBPF[0]}\n"
    + (CDEF_DIR / "shim.c").read_text()
)


def build() -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(INT_TYPEDEFS)
    ffi.cdef(shared_header_cdef())
    ffi.cdef((CDEF_DIR / "libbpf.h").read_text())
    ffi.cdef((CDEF_DIR / "shim.h").read_text())
    args = libbpf_build_args()
    ffi.set_source(
        "pybpftune._libbpf",
        SOURCE,
        include_dirs=[str(SHARED_HEADER.parent), *args["include_dirs"]],
        library_dirs=args["library_dirs"],
        libraries=args["libraries"],
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
    )
    return ffi


# --- generated Python bindings of the shared header (src/pybpftune/bindings.py) --------

BINDINGS = ROOT / "src" / "pybpftune" / "bindings.py"
_INT_KINDS = ("primitive", "enum")


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _enum_members(enum_name: str, members: dict[str, int]) -> tuple[dict[str, str], dict[str, str]]:
    """(member -> C name, counts -> C name): members without the prefix the
    enum's name and all its members share ("tcp_conn_alg": TCP_CONN_ALG_BBR
    -> BBR; "tcp_buffer_conn_flag": TCP_BUFFER_F_RCV -> F_RCV); NUM_* counts
    apart."""
    words = enum_name.upper().split("_")
    names = sorted(members, key=lambda n: (members[n], n))
    counts = {c: c for c in names if "_NUM_" in f"_{c}"}
    ids = [c for c in names if c not in counts]
    base = ""
    for n in range(len(words), 0, -1):
        candidate = "_".join(words[:n]) + "_"
        if all(c.startswith(candidate) and c[len(candidate) :][:1].isalpha() for c in ids):
            base = candidate
            break
    return {c.removeprefix(base): c for c in ids}, counts


# How a field of each shape is declared, read from a cffi view ``v`` and
# written into it; {n}: the field, {c}: the binding class of a struct element.
# Writes leave zero/empty values alone (pack starts from zeroed bytes), so
# the members of a union (bpftune_event's update/str/raw_data) do not
# overwrite one another: only the one that is set is written.
_SHAPES = {
    "int": ("int = 0", "int(v.{n})", "if self.{n}:\n            v.{n} = self.{n}"),
    "struct": ("{c} = field(default_factory=lambda: {c}())", "{c}.from_view(v.{n})", "self.{n}.fill(v.{n})"),
    "char[]": ('str = ""', "libbpf.c_string(v.{n})", "if self.{n}:\n            libbpf.set_c_string(v.{n}, self.{n})"),
    "byte[]": ('builtins.bytes = b""', "libbpf.array_bytes(v.{n})", "libbpf.set_array(v.{n}, self.{n})"),
    "int[]": ("tuple[int, ...] = ()", "tuple(int(x) for x in v.{n})", "libbpf.set_array(v.{n}, self.{n})"),
    "int[][]": (
        "tuple[tuple[int, ...], ...] = ()",
        "tuple(tuple(int(x) for x in row) for row in v.{n})",
        "for row, values in zip(v.{n}, self.{n}, strict=False):\n            libbpf.set_array(row, values)",
    ),
    "struct[]": (
        "tuple[{c}, ...] = ()",
        "tuple({c}.from_view(x) for x in v.{n})",
        "for view, value in zip(v.{n}, self.{n}, strict=False):\n            value.fill(view)",
    ),
}


def _shape(ctype: Any) -> tuple[str, str]:
    """(shape, C name of the struct involved or "") of a field's C type."""
    if ctype.kind in _INT_KINDS:
        return "int", ""
    if ctype.kind == "struct":
        return "struct", ctype.cname
    item = ctype.item if ctype.kind == "array" else None
    if item is not None and item.kind == "primitive" and item.cname in ("char", "unsigned char"):
        return ("char[]" if item.cname == "char" else "byte[]"), ""
    if item is not None and item.kind in _INT_KINDS:
        return "int[]", ""
    if item is not None and item.kind == "array" and item.item.kind in _INT_KINDS:
        return "int[][]", ""
    if item is not None and item.kind == "struct":
        return "struct[]", item.cname
    raise ValueError(f"no binding for {ctype.cname}")


def _field_code(name: str, ctype: Any, classes: dict[str, str]) -> tuple[str, str, str]:
    """(annotation and default, read from view ``v``, write into view ``v``)."""
    shape, struct = _shape(ctype)
    decl, read, write = _SHAPES[shape]
    fmt = {"n": name, "c": classes.get(struct, "")}
    return f"{name}: {decl.format(**fmt)}", read.format(**fmt), write.format(**fmt)


def render_bindings() -> str:
    """Python bindings of every enum, struct and integer #define of the
    shared header: IntEnums and frozen dataclasses whose values and layouts
    come from the compiled cffi module at import time."""
    import re

    text = shared_header_cdef()
    ffi = cffi.FFI()
    ffi.cdef(INT_TYPEDEFS)
    ffi.cdef(text)
    out = [
        '"""Bindings of src/bpf/bpftune_shared.h: GENERATED by build_ffi.py at build time (`make`), do not edit.',
        "",
        "One IntEnum per enum of the header (members without the prefix they share; NUM_* counts",
        "are module constants) and one frozen dataclass per struct (pack/unpack/SIZE, and",
        "from_view/fill over cffi views).  Values and layouts are read from the compiled cffi",
        "module, so they cannot disagree with the BPF objects; tests/unit/test_bindings.py checks",
        "that this file is current.  (builtins.bytes: a field may be named bytes.)",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "import builtins",
        "import enum",
        "from dataclasses import dataclass, field, fields",
        "from typing import Any, ClassVar, Self",
        "",
        "from . import libbpf",
        "",
        "_c = libbpf.header_constant",
        "",
    ]
    defines = [m.group(1) for m in re.finditer(r"^#define (BPFTUNE_\w+) ", text, re.M)]
    out += [f'{name.removeprefix("BPFTUNE_")} = _c("{name}")' for name in defines]
    enums = [m.group(1) for m in re.finditer(r"^enum (\w+)", text, re.M)]
    parsed = {name: _enum_members(name, dict(ffi.typeof(f"enum {name}").relements)) for name in enums}
    for _members, counts in parsed.values():
        out += [f'{cname} = _c("{cname}")' for cname in counts.values()]
    for enum_name, (members, _counts) in parsed.items():
        base = "enum.IntFlag" if enum_name.endswith("_flag") else "enum.IntEnum"
        out += ["", "", f"class {_camel(enum_name)}({base}):", f'    """enum {enum_name}."""', ""]
        out += [f'    {short} = _c("{cname}")' for short, cname in members.items()]
    classes: dict[str, str] = {}
    for m in re.finditer(r"^struct (\w+) \{", text, re.M):
        sname = m.group(1)
        cls = _camel(sname)
        classes[f"struct {sname}"] = cls
        ctype = ffi.typeof(f"struct {sname}")
        codes = [(f, *_field_code(f, ft.type, classes)) for f, ft in ctype.fields]
        out += ["", "", "@dataclass(frozen=True)", f"class {cls}:", f'    """struct {sname}."""', ""]
        out += [f'    C_TYPE: ClassVar[str] = "struct {sname}"', "    SIZE: ClassVar[int] = libbpf.struct_size(C_TYPE)"]
        out += [f"    {decl}" for _f, decl, _r, _w in codes]
        out += ["", "    @classmethod", "    def from_view(cls, v: Any) -> Self:", "        return cls("]
        out += [f"            {f}={read}," for f, _d, read, _w in codes]
        out += ["        )", "", "    def fill(self, v: Any) -> None:"]
        out += [f"        {write}" for _f, _d, _r, write in codes]
        out += [
            "",
            "    @classmethod",
            "    def unpack(cls, data: builtins.bytes) -> Self:",
            '        """From a record\'s bytes (at least SIZE of them)."""',
            "        return cls.from_view(libbpf.struct_view(cls.C_TYPE, libbpf.fit(data, cls.SIZE)))",
            "",
            "    def pack(self) -> builtins.bytes:",
            "        buf = bytearray(self.SIZE)",
            "        self.fill(libbpf.struct_view(self.C_TYPE, buf))",
            "        return bytes(buf)",
        ]
    out += [
        "",
        "",
        "def field_names(cls: type[Any]) -> tuple[str, ...]:",
        '    """The fields of a binding, in layout order."""',
        "    return tuple(f.name for f in fields(cls))",
        "",
    ]
    return "\n".join(out)


ffibuilder = build()

if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--bindings"]:
        BINDINGS.write_text(render_bindings())
    else:
        ffibuilder.compile(verbose=False)
