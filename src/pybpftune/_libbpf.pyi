# Typed stub of the cffi extension built by build_ffi.py.  Only
# pybpftune.libbpf imports it; everything else uses that module's typed API.
from typing import Any

import cffi

ffi: cffi.FFI
lib: Any
