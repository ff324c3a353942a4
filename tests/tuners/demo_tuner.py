"""A BPF-free tuner for daemon-level tests, loaded with `-l tests/tuners`.

Once a second it raises net.ipv4.tcp_fin_timeout in the global namespace by
one, at most STEPS times: enough to exercise the write path, the log lines,
the summary, rollback, journaling and administrator back-off without waiting
for real traffic.  Also shows what a third-party tuner looks like.
"""

from __future__ import annotations

import os

from pybpftune.tuner import Proposal, Scenario, Tunable, Tuner

STEPS = int(os.environ.get("PYBPFTUNE_DEMO_STEPS", "3"))


class DemoTuner(Tuner):
    name = "demo"
    description = "test tuner: steps tcp_fin_timeout up once a second"
    tunables = (Tunable(0, "net.ipv4.tcp_fin_timeout", 1, namespaced=True, lower=1, upper=600),)
    scenarios = (Scenario(0, "demo step", "A test tuner stepped the value."),)

    def start(self) -> None:
        self.base = self.current(0)[0]
        self.steps_done = 0

    def tick(self, now: float) -> None:
        if self.steps_done >= STEPS:
            return
        self.steps_done += 1
        glob = self.ctx.namespaces.global_cookie
        self.apply(Proposal(0, 0, glob, (self.base + self.steps_done,), "demo step"))


TUNER = DemoTuner
