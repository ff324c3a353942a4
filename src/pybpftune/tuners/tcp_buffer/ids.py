"""tcp_buffer's tunable and scenario ids and connection flags by their
tuner-local names: aliases of the shared header's enums (pybpftune.bindings),
never copied."""

from __future__ import annotations

from ...bindings import TCP_BUFFER_NUM_TUNABLES, TcpBufferConnFlag, TcpBufferScenario, TcpBufferTunable

Values = tuple[int, ...]

TCP_WMEM = TcpBufferTunable.TCP_WMEM
TCP_RMEM = TcpBufferTunable.TCP_RMEM
TCP_MEM = TcpBufferTunable.TCP_MEM
TCP_MODERATE_RCVBUF = TcpBufferTunable.TCP_MODERATE_RCVBUF
TCP_NO_METRICS_SAVE = TcpBufferTunable.TCP_NO_METRICS_SAVE
TCP_NO_SSTHRESH_METRICS_SAVE = TcpBufferTunable.TCP_NO_SSTHRESH_METRICS_SAVE
HIGH_ORDER_ALLOC_DISABLE = TcpBufferTunable.HIGH_ORDER_ALLOC_DISABLE
TCP_SYNCOOKIES = TcpBufferTunable.TCP_SYNCOOKIES
TCP_MAX_SYN_BACKLOG = TcpBufferTunable.TCP_MAX_SYN_BACKLOG
TCP_MAX_ORPHANS = TcpBufferTunable.TCP_MAX_ORPHANS
NUM_TUNABLES = TCP_BUFFER_NUM_TUNABLES

BUFFER_INCREASE = TcpBufferScenario.INCREASE
BUFFER_DECREASE = TcpBufferScenario.DECREASE
BUFFER_DECREASE_LATENCY = TcpBufferScenario.DECREASE_LATENCY
MEM_PRESSURE = TcpBufferScenario.MEM_PRESSURE
MEM_EXHAUSTION = TcpBufferScenario.MEM_EXHAUSTION
MODERATE_RCVBUF = TcpBufferScenario.MODERATE_RCVBUF
LOW_MEM_ENTER = TcpBufferScenario.LOW_MEM_ENTER
LOW_MEM_LEAVE = TcpBufferScenario.LOW_MEM_LEAVE
SYN_BACKLOG_INCREASE = TcpBufferScenario.SYN_BACKLOG_INCREASE
SYN_BACKLOG_DECREASE = TcpBufferScenario.SYN_BACKLOG_DECREASE
SYNCOOKIES_ENABLE = TcpBufferScenario.SYNCOOKIES_ENABLE
SYNCOOKIES_DISABLE = TcpBufferScenario.SYNCOOKIES_DISABLE
MAX_ORPHANS_INCREASE = TcpBufferScenario.MAX_ORPHANS_INCREASE

# struct tcp_buffer_conn.flags
F_RCV = TcpBufferConnFlag.F_RCV
F_SND = TcpBufferConnFlag.F_SND
F_LIMIT = TcpBufferConnFlag.F_LIMIT
F_WSCALE = TcpBufferConnFlag.F_WSCALE

__all__ = [
    "Values",
    "TCP_WMEM",
    "TCP_RMEM",
    "TCP_MEM",
    "TCP_MODERATE_RCVBUF",
    "TCP_NO_METRICS_SAVE",
    "TCP_NO_SSTHRESH_METRICS_SAVE",
    "HIGH_ORDER_ALLOC_DISABLE",
    "TCP_SYNCOOKIES",
    "TCP_MAX_SYN_BACKLOG",
    "TCP_MAX_ORPHANS",
    "NUM_TUNABLES",
    "BUFFER_INCREASE",
    "BUFFER_DECREASE",
    "BUFFER_DECREASE_LATENCY",
    "MEM_PRESSURE",
    "MEM_EXHAUSTION",
    "MODERATE_RCVBUF",
    "LOW_MEM_ENTER",
    "LOW_MEM_LEAVE",
    "SYN_BACKLOG_INCREASE",
    "SYN_BACKLOG_DECREASE",
    "SYNCOOKIES_ENABLE",
    "SYNCOOKIES_DISABLE",
    "MAX_ORPHANS_INCREASE",
    "F_RCV",
    "F_SND",
    "F_LIMIT",
    "F_WSCALE",
]
