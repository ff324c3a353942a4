# Typed stub of the cffi extension built by build_ffi.py.  Only
# pybpftune.libbpf imports it and wraps every call in typed functions, so the
# handles stay opaque (Any) here and typed everywhere else.
from typing import Any

ffi: Any
lib: Any
