"""tcp_buffer tuner: TCP buffer limits, TCP memory, the SYN backlog.

What it does (bpftune's tcp_buffer, docs/tuners/tcp_buffer.md):

* grows ``tcp_rmem[2]`` when a connection's receive buffer presses against it
  (or its window is capped by the window scale fixed at its handshake), and
  ``tcp_wmem[2]`` when a sender is limited by its send buffer at
  ``tcp_wmem[2]``, and turns ``tcp_moderate_rcvbuf`` on with the first
  ``tcp_rmem`` change;
* raises ``tcp_mem`` when TCP nears memory pressure or exhaustion, never
  beyond fractions of the free buffer pages F (1/16, 1/8, 1/4; F estimated
  from MemTotal when /proc/zoneinfo gives none, see hostmem); a
  ``tcp_mem[2]`` above F/4, which no memory can back, is brought down to it
  the first time the tuner acts on tcp_mem; when ``tcp_mem[2]`` cannot grow
  any more it shrinks the buffer maxima instead;
  near exhaustion it turns on the low-memory switches
  (``tcp_no_metrics_save``, ``tcp_no_ssthresh_metrics_save``,
  ``high_order_alloc_disable``, a smaller ``tcp_max_syn_backlog``) in the
  host's namespace and the one that hit the limit, and undoes them once
  TCP's allocated memory has stayed clear of the pressure threshold;
* on SYN floods grows ``tcp_max_syn_backlog`` (never beyond what 1/256 of
  memory holds in request sockets) while floods correlate with
  connections being established, shrinks it when they do not (an attack),
  and switches ``tcp_syncookies`` on under memory pressure or off when
  cookies only ever fail;
* backs a buffer maximum off when its growth correlates with latency.

Beyond bpftune, buffer maxima grow toward what the pressing connection
needs, not by fixed 25 % steps: its goodput times its smallest RTT (the
bandwidth-delay product), converted to buffer bytes with the connection's own
buffer-per-window ratio.  While a connection is window-limited and its RTT
shows no queue, the path has room: the window it needs is taken as the
largest step the learning rate allows beyond the one it has (x4 at rate 4;
each new connection probes further, as slow start does within one).  Once a queue forms, the need is twice
the BDP (enough to stay full through a halving of the window), so growth
stops near what connections use.  The learning rate bounds every step (at
most 1 + 12 reference steps: x4 at the default rate); a need within one
reference step of the current maximum changes nothing.
The package: conn.py (a pressing connection and its need), rates.py (goodput
and smallest RTT across samples), holds.py (the BPF hold-off protocol),
buffers.py (the buffer rules), memory.py and lowmem.py (tcp_mem and the
low-memory state), synflood.py (the SYN backlog and syncookies), base.py (what
the rules read) and tuner.py (the declaration and its hooks); ids and flags
are the shared header's (pybpftune.bindings.TcpBufferTunable,
TcpBufferScenario, TcpBufferConnFlag).  The rules are plain functions on
plain values, unit-tested with synthetic events.
"""

from .buffers import buffer_cap, grow_max, latency_backoff
from .conn import Conn, explore_factor, max_step_factor
from .holds import HOLD_MAX_S, HOLD_MIN_S, Hold, HoldOffs, hold_metric, hold_seconds
from .lowmem import LOW_MEMORY_CHECK_S, RECOVERY_S, SOCKSTAT_TCP_PAGES, SYN_BACKLOG_MIN, LowMemory, memory_recovered
from .memory import MEM_COOLDOWN_S, exhaustion_shrink, tcp_mem_cap, tcp_mem_exhaustion, tcp_mem_pressure
from .synflood import SYN_COOLDOWN_S, syn_backlog_cap, syn_backlog_rule, syncookies_rule
from .tuner import TcpBufferTuner

TUNER = TcpBufferTuner

__all__ = [
    "HOLD_MAX_S",
    "HOLD_MIN_S",
    "LOW_MEMORY_CHECK_S",
    "MEM_COOLDOWN_S",
    "RECOVERY_S",
    "SOCKSTAT_TCP_PAGES",
    "SYN_BACKLOG_MIN",
    "SYN_COOLDOWN_S",
    "TUNER",
    "Conn",
    "Hold",
    "HoldOffs",
    "LowMemory",
    "TcpBufferTuner",
    "buffer_cap",
    "exhaustion_shrink",
    "explore_factor",
    "grow_max",
    "hold_metric",
    "hold_seconds",
    "latency_backoff",
    "max_step_factor",
    "memory_recovered",
    "syn_backlog_cap",
    "syn_backlog_rule",
    "syncookies_rule",
    "tcp_mem_cap",
    "tcp_mem_exhaustion",
    "tcp_mem_pressure",
]
