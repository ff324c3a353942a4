"""Where the daemon's words go: syslog/journald by default, stderr with -s.

Change lines are logged at INFO under the "pybpftune" logger (bpftune logs
them at NOTICE); debug adds libbpf's own messages.  Each record may carry
structured fields (tuner, tunable, scenario, netns, old, new) in ``extra`` so
a journald or JSON sink can index them without parsing the text.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

ROOT_LOGGER = "pybpftune"
_handler: logging.Handler | None = None


class _Prefix(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"bpftune: {record.getMessage()}"


def setup_logging(to_stderr: bool, debug: bool) -> logging.Logger:
    """Install (or replace) the one handler of the pybpftune logger tree."""
    global _handler
    logger = logging.getLogger(ROOT_LOGGER)
    if _handler is not None:
        logger.removeHandler(_handler)
        _handler.close()
    handler: logging.Handler
    if to_stderr or not Path("/dev/log").exists():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Prefix())
    else:
        handler = logging.handlers.SysLogHandler(address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.ident = f"bpftune[{__import__('os').getpid()}]: "
        handler.setFormatter(logging.Formatter("%(message)s"))
    _handler = handler
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
    return logger
