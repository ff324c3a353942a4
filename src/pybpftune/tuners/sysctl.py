"""sysctl tuner: back off when an administrator writes a tuned sysctl.

Any write by a process other than the daemon to a sysctl that another tuner
manages turns that tuner off in the writer's namespace only (bpftune's
"modified sysctl" line).  It changes nothing itself.

Every event names a namespace: a net sysctl's own, or for a sysctl of no
network namespace (kernel.core_pattern, vm.*) the writer's; where the BPF
side cannot tell (no cookies, kernels before 5.14) the documented unknown
value, and then the writer's namespace is looked up by its pid.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from .. import libbpf
from ..events import Event, cookie_text
from ..tuner import Tuner


def _cmdline(pid: int, comm: str) -> str:
    """The writer's command line while it lives, else its comm from BPF."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return comm or "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or comm or "?"


class SysctlTuner(Tuner):
    name = "sysctl"
    description = "notices administrator sysctl writes and disables the tuner that owns the sysctl there"
    bpf_name = "sysctl_tuner"
    cgroup_programs = ("bpftune_sysctl_gate", "bpftune_sysctl_write__cgroup_sysctl")
    # Kernels before 6.0 do not let cgroup programs call the pid/task helpers
    # this form needs; there the fentry/kprobe forms are used instead.
    kernel_dependent_forms = MappingProxyType(
        {"bpftune_sysctl_write__cgroup_sysctl": "pid and task helpers in cgroup programs (Linux 6.0+)"}
    )

    def _writer_cookie(self, pid: int) -> int | None:
        """Namespace of the writing process, if it is still there."""
        cookie = self.ctx.namespaces.add(f"/proc/{pid}/ns/net") if pid > 0 else None
        return cookie

    def handle_event(self, event: Event) -> None:
        payload = event.payload("struct sysctl_write_event")
        path = libbpf.c_string(payload.path)
        command = _cmdline(event.pid, libbpf.c_string(payload.comm))
        cookie: int | None = event.netns_cookie
        self.log.debug(
            "pid %d, cmd '%s' wrote sysctl '%s' in netns %s", event.pid, command, path, cookie_text(event.netns_cookie)
        )
        if cookie == libbpf.NETNS_UNKNOWN:
            cookie = self._writer_cookie(event.pid)
        store = self.ctx.store
        for tuner in self.ctx.peers():
            if tuner is self:
                continue
            for tunable in store.matches_sysctl(tuner, path):
                cookies = [cookie] if cookie is not None else self._changed_where(tuner, tunable.id)
                for c in cookies:
                    store.disable(
                        tuner,
                        c,
                        f"pid {event.pid}, cmd '{command}' modified sysctl '{tunable.name}' "
                        f"that tuner '{tuner.name}' uses",
                    )

    def _changed_where(self, tuner: Tuner, tunable_id: int) -> list[int]:
        """The writer is gone: find namespaces whose value is no longer ours."""
        store = self.ctx.store
        out = []
        for c in store.changed_here(tuner, tunable_id):
            try:
                if store.current(tuner, tunable_id, c) != store.written(tuner, tunable_id, c):
                    out.append(c)
            except Exception:  # the namespace went away meanwhile
                continue
        if not out:
            self.log.debug("could not tell where %s was written; its writer is gone", tuner.tunable(tunable_id).name)
        return out


TUNER = SysctlTuner
