"""Package-data home of the compiled BPF objects (built by `make bpf`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import BpfObjectError

# The objects are plain files next to this module (wheels and editable installs
# alike); importlib.resources would cost the daemon's start-up a megabyte of imports.
HERE = Path(__file__).resolve().parent


def object_path(name: str, legacy: bool = False, directory: Path | None = None) -> Path:
    """Path of ``<name>.bpf.o`` or ``<name>.bpf.legacy.o``: a packaged
    object, or one in ``directory`` (an outside tuner's own objects)."""
    filename = f"{name}.bpf.legacy.o" if legacy else f"{name}.bpf.o"
    if directory is not None:
        path = directory / filename
        if not path.is_file():
            raise BpfObjectError(f"BPF object {path} is missing (build the tuner's objects first)")
        return path
    path = HERE / filename
    if not path.is_file():
        raise BpfObjectError(f"BPF object {filename} is missing from the installation (run `make` in a checkout)")
    return path


def available() -> list[str]:
    """Names of the packaged objects (full variant)."""
    return sorted(p.name.removesuffix(".bpf.o") for p in HERE.iterdir() if p.name.endswith(".bpf.o"))
