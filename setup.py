"""Build hooks only; metadata lives in pyproject.toml.

build_py runs `make bpf` so a wheel built from a clean checkout carries the
compiled BPF objects (full and legacy variants); cffi_modules builds the
libbpf binding against the system libbpf.
"""

import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithBpf(build_py):
    def run(self) -> None:
        subprocess.run(["make", "bpf"], check=True)
        super().run()


setup(cmdclass={"build_py": BuildPyWithBpf}, cffi_modules=["build_ffi.py:ffibuilder"])
