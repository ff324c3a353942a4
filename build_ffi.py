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


ffibuilder = build()

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
