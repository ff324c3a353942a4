"""Lost events are said and counted: with the daemon stopped (SIGSTOP), a
burst of sysctl writes fills the shared ring buffer, the BPF side counts
what it cannot queue, and once the daemon runs again it logs one line and
`status` counts the drops."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from pybpftune.client import query

from .harness import SLOW, Daemon, sysctl_get, sysctls

pytestmark = pytest.mark.kernel

FIN = "net.ipv4.tcp_fin_timeout"
# The ring buffer holds 256 KiB: about a thousand 256-byte events.
BURST = 4000


def test_a_full_ring_buffer_is_said_and_counted(tmp_path: Path, variant_args: tuple[str, ...]) -> None:
    state_dir = tmp_path / "state"
    with sysctls() as s:
        s.save(FIN)
        value = sysctl_get(FIN).encode()
        with Daemon(["-s", "-a", "sysctl", "--state-dir", str(state_dir), *variant_args]) as d:
            d.started()
            os.kill(d.proc.pid, signal.SIGSTOP)
            try:
                fd = os.open(f"/proc/sys/{FIN.replace('.', '/')}", os.O_WRONLY)
                try:
                    for _ in range(BURST):
                        os.pwrite(fd, value, 0)  # the same value: each write is an event
                finally:
                    os.close(fd)
            finally:
                os.kill(d.proc.pid, signal.SIGCONT)
            m = d.wait_for(r"lost (\d+) events before a tuner saw them \(since start: (\d+) because", 10 * SLOW)
            lost, full = int(m.group(1)), int(m.group(2))
            assert 0 < full <= lost < BURST and "may have been missed" in m.string
            reply = query("status", socket_path=state_dir / "bpftune.sock", as_json=True)
            own = json.loads(reply.text)["pybpftune"]
            assert own["events_dropped"] >= full
            assert own["events_received"] + own["events_dropped"] >= BURST
            assert d.stop() == 0
        said = [line for line in d.lines if re.search(r"lost \d+ events? before a tuner saw", line)]
        assert len(said) == 1, "one line per minute at most"
        assert re.search(r"# Summary: \d+ events handled from the ring buffer, \d+ lost \(\d+ for a full", d.output)
