"""Where an outside tuner finds what it needs to compile its BPF objects.

``python -m pybpftune.build --include-dir`` prints the directory the package
installed ``pybpftune.bpf.h`` (shared maps, globals, event, sampling and
rate-limit helpers), ``bpftune_shared.h`` (the layouts shared with user
space), ``vmlinux.h`` and ``pybpftune.mk`` (the Makefile fragment that
compiles the full and legacy variants as pybpftune compiles its own) into.
``--cflags`` prints the matching ``-I`` flag, ``--makefile`` the fragment's
path.  See docs/writing-a-tuner.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

INCLUDE_FILES = ("pybpftune.bpf.h", "bpftune_shared.h", "vmlinux.h", "pybpftune.mk")


def include_dir() -> Path:
    """The installed include directory; FileNotFoundError naming what is missing."""
    directory = Path(__file__).resolve().parent / "include"
    missing = [f for f in INCLUDE_FILES if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing from {directory} (in a checkout, run `make` first)")
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pybpftune.build",
        description="Print where the headers and the Makefile fragment for building a tuner's BPF objects are.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--include-dir", action="store_true", help="the directory holding the headers and fragment")
    what.add_argument("--cflags", action="store_true", help="the -I flag for clang")
    what.add_argument("--makefile", action="store_true", help="the path of pybpftune.mk")
    args = parser.parse_args(argv)
    try:
        directory = include_dir()
    except FileNotFoundError as exc:
        print(f"pybpftune.build: {exc}", file=sys.stderr)
        return 1
    if args.include_dir:
        print(directory)
    elif args.cflags:
        print(f"-I{directory}")
    else:
        print(directory / "pybpftune.mk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
