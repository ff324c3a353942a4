"""Package-data home of the compiled BPF objects (built by `make bpf`)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import BpfObjectError


def object_path(name: str, legacy: bool = False) -> Path:
    """Path of a packaged object: ``<name>.bpf.o`` or ``<name>.bpf.legacy.o``."""
    filename = f"{name}.bpf.legacy.o" if legacy else f"{name}.bpf.o"
    path = Path(str(resources.files(__name__).joinpath(filename)))
    if not path.is_file():
        raise BpfObjectError(f"BPF object {filename} is missing from the installation (run `make` in a checkout)")
    return path


def available() -> list[str]:
    """Names of the packaged objects (full variant)."""
    return sorted(
        p.name.removesuffix(".bpf.o")
        for p in Path(str(resources.files(__name__))).iterdir()
        if p.name.endswith(".bpf.o")
    )
