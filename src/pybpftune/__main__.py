"""python -m pybpftune: same as the `bpftune` command."""

from .launch import entry

entry()
