"""Build hooks only; metadata lives in pyproject.toml.

build_py runs `make bpf` so a wheel built from a clean checkout carries the
compiled BPF objects (full and legacy variants) and generates the shared
header's Python bindings (src/pybpftune/bindings.py); cffi_modules builds the
libbpf binding against the system libbpf.
"""

import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithBpf(build_py):
    def run(self) -> None:
        subprocess.run(["make", "bpf"], check=True)
        # This interpreter has cffi (a build requirement); the system one may not.
        root = Path(__file__).resolve().parent
        subprocess.run([sys.executable, str(root / "build_ffi.py"), "--bindings"], check=True, cwd=root / "src")
        super().run()


setup(cmdclass={"build_py": BuildPyWithBpf}, cffi_modules=["build_ffi.py:ffibuilder"])
