"""python -m pybpftune: same as the `bpftune` command."""

from .cli import main

main()
