"""Where the daemon's words go: journald, else syslog, or stderr with -s.

Change lines are logged at INFO under the "pybpftune" logger (bpftune logs
them at NOTICE); debug adds libbpf's own messages.  A record may carry
structured fields in ``extra={"bpftune": {...}}`` (the store's change lines
carry tuner, scenario, tunable, netns_cookie, old, new, reason).

* Under journald (its native socket exists) every record is one journal
  entry: MESSAGE is the bpftune-compatible text, SYSLOG_IDENTIFIER is
  ``bpftune``, and each structured field becomes ``BPFTUNE_<NAME>``
  (``BPFTUNE_TUNER=tcp_buffer``, ``BPFTUNE_OLD=4096 131072 6291456``), so
  ``journalctl BPFTUNE_TUNER=tcp_buffer -o json`` finds one tuner's changes.
  The wire protocol is the ``logging_journald`` library's, imported only then.
* Elsewhere, syslog (``/dev/log``, facility daemon, ident ``bpftune[PID]``
  with the pid of the process that logs: correct after ``-D`` forks).
* ``-s`` (or neither socket): stderr, each line prefixed ``bpftune: ``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging.handlers

ROOT_LOGGER = "pybpftune"
IDENT = "bpftune"
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
SYSLOG_SOCKET = Path("/dev/log")
_handler: logging.Handler | None = None

# logging level -> syslog priority (journald's PRIORITY field).
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_FIELD_NAME = re.compile(r"[^A-Z0-9_]")


class _Prefix(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"bpftune: {record.getMessage()}"


def field_value(value: Any) -> str:
    """A structured field as journal text: sequences space-separated (as
    bpftune prints values), booleans 0/1."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (tuple, list)):
        return " ".join(field_value(v) for v in value)
    return str(value)


def journal_fields(record: logging.LogRecord, message: str) -> Iterator[tuple[str, str]]:
    """The journal entry of one record: standard fields, then BPFTUNE_*."""
    yield "MESSAGE", message
    yield "PRIORITY", str(PRIORITY.get(record.levelno, 6))
    yield "SYSLOG_IDENTIFIER", IDENT
    yield "SYSLOG_FACILITY", "3"  # daemon, as bpftune's openlog()
    yield "SYSLOG_PID", str(os.getpid())
    yield "LOGGER", record.name
    fields = getattr(record, "bpftune", None)
    if isinstance(fields, Mapping):
        for key, value in fields.items():
            name = _FIELD_NAME.sub("_", str(key).upper())
            if value is not None and name:
                yield f"BPFTUNE_{name}", field_value(value)


class JournalHandler(logging.Handler):
    """Native-protocol journald handler with our field names."""

    def __init__(self, socket_path: Path = JOURNAL_SOCKET) -> None:
        super().__init__()
        from logging_journald import JournaldTransport

        self.transport = JournaldTransport(socket_path=socket_path)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.transport.send(list(journal_fields(record, self.format(record))))
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        try:
            self.transport.socket.close()
        finally:
            super().close()


def _syslog_handler_class() -> type[logging.handlers.SysLogHandler]:
    """SyslogHandler, defined on first use: logging.handlers (and the pickle,
    queue and struct it imports) costs half a megabyte of a daemon that logs
    to stderr or journald."""
    global _syslog_class
    if _syslog_class is None:
        import logging.handlers

        class SyslogHandler(logging.handlers.SysLogHandler):
            """/dev/log with ``bpftune[PID]: `` taken when the record is sent (after -D's fork)."""

            @property
            def ident(self) -> str:
                return f"{IDENT}[{os.getpid()}]: "

            @ident.setter
            def ident(self, value: str) -> None:
                pass

        _syslog_class = SyslogHandler
    return _syslog_class


_syslog_class: type[logging.handlers.SysLogHandler] | None = None


def __getattr__(name: str) -> Any:
    if name == "SyslogHandler":
        return _syslog_handler_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _sink(to_stderr: bool) -> logging.Handler:
    if not to_stderr and JOURNAL_SOCKET.exists():
        try:
            return JournalHandler()
        except OSError:
            pass  # journald not listening: try syslog
    if not to_stderr and SYSLOG_SOCKET.exists():
        try:
            cls = _syslog_handler_class()
            handler = cls(address=str(SYSLOG_SOCKET), facility=cls.LOG_DAEMON)
            handler.setFormatter(logging.Formatter("%(message)s"))
            return handler
        except OSError:
            pass
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(_Prefix())
    return stream


def sink_name() -> str:
    """Where the logs go now: "journald", "syslog" or "stderr"."""
    if isinstance(_handler, JournalHandler):
        return "journald"
    if _syslog_class is not None and isinstance(_handler, _syslog_class):
        return "syslog"
    return "stderr"


def setup_logging(to_stderr: bool, debug: bool) -> logging.Logger:
    """Install (or replace) the one handler of the pybpftune logger tree."""
    global _handler
    logger = logging.getLogger(ROOT_LOGGER)
    if _handler is not None:
        logger.removeHandler(_handler)
        _handler.close()
    handler = _sink(to_stderr)
    _handler = handler
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
    return logger
