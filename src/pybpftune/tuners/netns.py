"""netns tuner: keep the namespace registry current as namespaces come and go.

It changes nothing itself.  At start every namespace reachable through an nsfs
mount (``/run/netns/*``) or a process is learned; afterwards:

* where the kernel allows fentry or kprobes (stock 5.x/6.x kernels), the BPF
  side reports each namespace created (return of ``copy_net_ns``) and each one
  freed (``__put_net``) with its cookie and inode, so the registry maps it
  without entering it, and forgets a dead one at once;
* everywhere, an inotify watch on /run/netns notices new bind mounts (`ip netns
  add`, container runtimes) within a tick, and unknown cookies met later are
  resolved on demand (hint, mounts, then at most one /proc scan per 10 s).

Needs netns cookies (Linux 5.14+), as bpftune's netns tuner does.
"""

from __future__ import annotations

from ..events import Event
from ..tuner import Scenario, Tunable, Tuner, TunerContext

SCENARIO_CREATE, SCENARIO_DESTROY = 0, 1
TUNABLE_NAMESPACE = 0
FORGET_EVERY_S = 30.0


class NetnsTuner(Tuner):
    name = "netns"
    description = "learns network namespaces as they are created and forgets them when they die"
    bpf_name = "netns_tuner"
    requires_cookies = True
    optional_signals = frozenset({"netns_create", "netns_destroy"})
    tunables = (Tunable(TUNABLE_NAMESPACE, "network_namespace", namespaced=True, kind="other"),)
    scenarios = (
        Scenario(SCENARIO_CREATE, "netns created", "A network namespace was created."),
        Scenario(SCENARIO_DESTROY, "netns destroyed", "A network namespace was freed."),
    )

    def __init__(self, ctx: TunerContext, tuner_id: int) -> None:
        super().__init__(ctx, tuner_id)
        self.at_start: set[int] = set()
        self.seen: set[int] = set()
        self.created_bpf = 0
        self.created_watch = 0
        self.destroyed = 0
        self.watching = False
        self._next_forget = 0.0

    def start(self) -> None:
        ns = self.ctx.namespaces
        ns.scan()
        self.at_start = {ref.cookie for ref in ns.known()}
        self.seen = set(self.at_start)
        self.watching = ns.watch()
        signal = None
        if self.loaded is not None:
            choice = self.loaded.choices.get("netns_create")
            signal = choice.chosen if choice is not None else None
        how = f"from the kernel ({signal} on copy_net_ns)" if signal else "without a kernel signal"
        self.log.info(
            "netns: %d namespaces besides the global one at start; learning new ones %s%s",
            len(self.at_start),
            how,
            ", watching /run/netns" if self.watching else "",
        )

    def _created(self, cookie: int, via: str) -> None:
        if cookie in self.seen or cookie == self.ctx.namespaces.global_cookie:
            return
        self.seen.add(cookie)
        if via == "bpf":
            self.created_bpf += 1
        else:
            self.created_watch += 1
        self.log.debug("netns created (cookie %d) [%s]", cookie, via)

    def handle_event(self, event: Event) -> None:
        e = event.payload("struct netns_event")
        cookie, inode = int(e.cookie), int(e.inum)
        ns = self.ctx.namespaces
        if event.scenario_id == SCENARIO_CREATE:
            ns.learn(cookie, inode, f"/proc/{event.pid}/ns/net" if event.pid > 0 else None)
            self._created(cookie, "bpf")
        elif event.scenario_id == SCENARIO_DESTROY:
            if ns.mark_gone(cookie):
                self.destroyed += 1
                self.log.debug("netns destroyed (cookie %d)", cookie)
            self.seen.discard(cookie)

    def tick(self, now: float) -> None:
        ns = self.ctx.namespaces
        for cookie in ns.poll_watch():
            self._created(cookie, "/run/netns")
        if now >= self._next_forget:
            self._next_forget = now + FORGET_EVERY_S
            for cookie in ns.forget_gone():
                self.seen.discard(cookie)

    def stop(self) -> None:
        self.ctx.namespaces.close()

    def summary_lines(self) -> list[str]:
        ns = self.ctx.namespaces
        return [
            f"# Summary: netns tuner: {len(ns.known())} namespaces known now, {len(self.at_start)} at start, "
            f"{self.created_bpf + self.created_watch} created since ({self.created_bpf} reported by BPF, "
            f"{self.created_watch} seen under /run/netns), {self.destroyed} freed",
            f"# Summary: netns tuner: {ns.process_scans} process scans, {ns.mount_scans} mount scans, "
            f"{ns.entered_to_learn} namespaces entered to read a cookie",
        ]


TUNER = NetnsTuner
