"""A BPF-free tuner for the per-namespace policy tests (`-l tests/tuners -a nsdemo`).

Once a second it raises net.ipv4.tcp_fin_timeout by one in every namespace
named in the file $PYBPFTUNE_NSDEMO_FILE (one /run/netns name a line; the
word "global" means the daemon's own namespace), at most
$PYBPFTUNE_NSDEMO_STEPS times per namespace.  Names are mapped to cookies
through the daemon's namespace registry, and each write goes through the
store, so the test sees exactly what a real tuner gets: writes inside the
right namespace, back-off where an administrator wrote, namespaces created
after start, and a namespace vanishing under a write.
"""

from __future__ import annotations

import os
from pathlib import Path

from pybpftune.tuner import Proposal, Scenario, Tunable, Tuner, TunerContext

FIN = "net.ipv4.tcp_fin_timeout"


class NsDemoTuner(Tuner):
    name = "nsdemo"
    description = "test tuner: steps tcp_fin_timeout in listed namespaces"
    tunables = (Tunable(0, FIN, 1, namespaced=True, lower=1, upper=600),)
    scenarios = (Scenario(0, "nsdemo step", "A test tuner stepped the value in a namespace."),)

    def __init__(self, ctx: TunerContext, tuner_id: int) -> None:
        super().__init__(ctx, tuner_id)
        self.file = Path(os.environ.get("PYBPFTUNE_NSDEMO_FILE", "/nonexistent"))
        self.max_steps = int(os.environ.get("PYBPFTUNE_NSDEMO_STEPS", "1000"))
        self.done: dict[int, int] = {}
        self.cookies: dict[str, int] = {}

    def _targets(self) -> list[int]:
        try:
            names = self.file.read_text().split()
        except OSError:
            return []
        ns = self.ctx.namespaces
        out = []
        for name in names:
            if name == "global":
                out.append(ns.global_cookie)
                continue
            cookie = self.cookies.get(name)
            if cookie is None:
                cookie = ns.cookie_of_path(f"/run/netns/{name}")
                if cookie is None:
                    continue
                self.cookies[name] = cookie
            out.append(cookie)
        return out

    def tick(self, now: float) -> None:
        for cookie in self._targets():
            done = self.done.get(cookie, 0)
            if done >= self.max_steps:
                continue
            self.done[cookie] = done + 1
            try:
                value = self.current(0, cookie)[0]
            except Exception:
                value = 60
            self.apply(Proposal(0, 0, cookie, (value + 1,), "nsdemo step"))


TUNER = NsDemoTuner
