"""Protocol counters from /proc/net/{snmp,snmp6,netstat,sockstat}, in any namespace.

The kernel prints /proc/net/snmp and /proc/net/netstat as pairs of lines
("Ip: Forwarding DefaultTTL ..." then "Ip: 1 64 ...") and /proc/net/snmp6 as
one "Ip6ReasmReqds 12" pair per line.  Both become one flat dict:
``{"Ip.ReasmReqds": 12, "Ip6ReasmReqds": 3, ...}``; /proc/net/sockstat's
"TCP: inuse 3 ... mem 191" lines give ``{"TCP.inuse": 3, "TCP.mem": 191}``.  Reads go through
/proc/thread-self so they see the namespace the calling thread entered
(netns.Namespaces.counters enters it).  Every /proc/net text format pybpftune
reads is parsed here.
"""

from __future__ import annotations

from pathlib import Path

PROC_NET = Path("/proc/thread-self/net")
Counters = dict[str, int]


def parse_counters(text: str) -> Counters:
    """Flatten either layout; non-numeric fields are skipped."""
    out: Counters = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        parts = lines[i].split()
        if parts and parts[0].endswith(":") and i + 1 < len(lines):
            values = lines[i + 1].split()
            if values and values[0] == parts[0]:
                for name, value in zip(parts[1:], values[1:], strict=False):
                    try:
                        out[f"{parts[0][:-1]}.{name}"] = int(value)
                    except ValueError:
                        pass
                i += 2
                continue
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                pass
        i += 1
    return out


def parse_sockstat(text: str) -> Counters:
    """/proc/net/sockstat: "PROTO: name value name value ..." per line;
    only unsigned decimal values are kept (the kernel prints no others)."""
    out: Counters = {}
    for line in text.splitlines():
        words = line.split()
        if not words or not words[0].endswith(":"):
            continue
        for name, value in zip(words[1::2], words[2::2], strict=False):
            if value.isascii() and value.isdigit():
                out.setdefault(f"{words[0][:-1]}.{name}", int(value))
    return out


def read_counters(files: tuple[str, ...] = ("snmp", "snmp6")) -> Counters:
    """Counters of the calling thread's namespace; missing files are skipped
    (snmp6 does not exist with IPv6 disabled)."""
    out: Counters = {}
    for name in files:
        try:
            text = (PROC_NET / name).read_text()
        except OSError:
            continue
        out.update(parse_sockstat(text) if name.startswith("sockstat") else parse_counters(text))
    return out


def ratio(part: int, whole: int) -> float:
    """part/whole, 0 when there was nothing to divide (bpftune divides by
    zero here when a namespace has seen no traffic)."""
    return part / whole if whole > 0 else 0.0
