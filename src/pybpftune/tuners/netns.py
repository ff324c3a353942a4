"""netns tuner: keep the namespace registry current as namespaces come and go.

It changes nothing itself.  At start every namespace reachable through an nsfs
mount (``/run/netns/*``) or a process is learned; afterwards:

* where the kernel allows fentry or kprobes (stock 5.x/6.x kernels), the BPF
  side reports each namespace created (return of ``copy_net_ns``) and each one
  freed (``__put_net``) with its cookie and inode, so the registry maps it
  without entering it, and forgets a dead one at once;
* everywhere, an inotify watch on /run/netns notices new bind mounts (`ip netns
  add`, container runtimes): its fd is one of the daemon loop's readers, so
  nothing polls while nothing changes; a new entry whose bind mount has not
  shown yet is looked at again every PENDING_RETRY_S until it does.  Unknown
  cookies met later are resolved on demand (hint, mounts, then at most one
  /proc scan per 10 s).

Needs netns cookies (Linux 5.14+), as bpftune's netns tuner does.
"""

from __future__ import annotations

from ..bindings import NetnsEvent, NetnsScenario, NetnsTunable
from ..events import Event
from ..tuner import NOTHING, Decision, NamespaceGone, Scenario, Tunable, Tuner, TunerContext

FORGET_EVERY_S = 30.0
# ... and as often when BPF reports each namespace freed (a safety net only).
FORGET_SIGNALLED_S = 300.0
# A /run/netns entry waiting for its bind mount is retried this often.
PENDING_RETRY_S = 0.25
# Without the loop (unit tests) the watch is polled from tick() this often.
POLL_S = 1.0


class NetnsTuner(Tuner):
    name = "netns"
    description = "learns network namespaces as they are created and forgets them when they die"
    bpf_name = "netns_tuner"
    requires_cookies = True
    optional_signals = frozenset({"netns_create", "netns_destroy"})
    tunables = (Tunable(NetnsTunable.NAMESPACE, "network_namespace", namespaced=True, kind="other"),)
    scenarios = (
        Scenario(NetnsScenario.CREATE, "netns created", "A network namespace was created."),
        Scenario(NetnsScenario.DESTROY, "netns destroyed", "A network namespace was freed."),
    )

    def __init__(self, ctx: TunerContext, tuner_id: int) -> None:
        super().__init__(ctx, tuner_id)
        self.at_start: set[int] = set()
        self.seen: set[int] = set()
        self.created_bpf = 0
        self.created_watch = 0
        self.destroyed = 0
        self.watching = False
        self._reading = False  # the watch fd is a reader of the daemon's loop
        self._destroy_signal = False  # BPF reports namespaces freed
        self._next_forget = 0.0

    def start(self) -> None:
        ns = self.ctx.namespaces
        ns.scan()
        self.at_start = {ref.cookie for ref in ns.known()}
        self.seen = set(self.at_start)
        self.watching = ns.watch()
        loop, fd = self.ctx.loop, ns.watch_fd
        if self.watching and loop is not None and fd is not None:
            loop.add_reader(fd, self._on_watch, "netns: /run/netns watch")
            self._reading = True
        signal = None
        if self.loaded is not None:
            choice = self.loaded.choices.get("netns_create")
            signal = choice.chosen if choice is not None else None
        if self.loaded is not None:
            destroy = self.loaded.choices.get("netns_destroy")
            self._destroy_signal = destroy is not None and destroy.chosen is not None
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

    def decide(self, event: Event) -> Decision:
        e = NetnsEvent.unpack(event.raw)
        cookie, inode = e.cookie, e.inum
        ns = self.ctx.namespaces
        if event.scenario_id == NetnsScenario.CREATE:
            ns.learn(cookie, inode, f"/proc/{event.pid}/ns/net" if event.pid > 0 else None)
            self._created(cookie, "bpf")
        elif event.scenario_id == NetnsScenario.DESTROY and not ns.is_gone(cookie):
            # The store alone decides "gone" (it closes what it held there).
            self.destroyed += 1
            self.seen.discard(cookie)
            self.log.debug("netns destroyed (cookie %d)", cookie)
            return Decision(effects=(NamespaceGone(cookie, "freed (reported by BPF)"),))
        return NOTHING

    def _on_watch(self) -> None:
        self._poll_watch(self.clock())

    def _poll_watch(self, now: float) -> None:
        ns = self.ctx.namespaces
        for cookie in ns.poll_watch():
            self._created(cookie, "/run/netns")
        if ns.pending:
            self.tick_at(now + PENDING_RETRY_S)

    def tick(self, now: float) -> float | None:
        ns = self.ctx.namespaces
        if not self._reading or ns.pending:
            self._poll_watch(now)
        if now >= self._next_forget:
            # With the BPF destroy signal the registry forgets at once; the
            # sweep then only has to catch what was never announced.
            self._next_forget = now + (FORGET_EVERY_S if not self._destroy_signal else FORGET_SIGNALLED_S)
            for cookie in ns.forget_gone():
                self.seen.discard(cookie)
        due = self._next_forget
        if not self._reading:
            due = min(due, now + POLL_S)
        elif ns.pending:
            due = min(due, now + PENDING_RETRY_S)
        return due

    def stop(self) -> None:
        ns = self.ctx.namespaces
        if self._reading and self.ctx.loop is not None and ns.watch_fd is not None:
            self.ctx.loop.remove_reader(ns.watch_fd)
            self._reading = False
        ns.close()

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
