"""The console entry (`bpftune`, `pybpftune`, `python -m pybpftune`).

A plain daemon command line goes straight to :func:`launch.start_daemon`
without importing click (see :mod:`pybpftune.launch` for why); anything else
goes to the click command in cli.py, imported only then.  Kept apart from
launch.py so that launch never imports cli (which imports launch).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .launch import parse_daemon_args, start_daemon


def entry(argv: Sequence[str] | None = None) -> None:
    """Console-script entry (`bpftune`, `pybpftune`, `python -m pybpftune`)."""
    args = sys.argv[1:] if argv is None else list(argv)
    kwargs = parse_daemon_args(args)
    if kwargs is not None:
        start_daemon(kwargs, early_probe=True)
    from .cli import main

    main(args=args, prog_name="bpftune")
