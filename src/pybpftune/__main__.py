"""python -m pybpftune: same as the `bpftune` command."""

from .console import entry

entry()
