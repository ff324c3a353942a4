"""sysctl tuner: back off when an administrator writes a tuned sysctl.

Any write by a process other than the daemon to a sysctl that another tuner
manages turns that tuner off in the writer's namespace only (bpftune's
"modified sysctl" line).  It changes nothing itself: its decision names the
write, and the daemon has the store back off every tuner that manages it.

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
from ..tuner import AdminWrite, Decision, Tuner


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
        return self.ctx.namespaces.add(f"/proc/{pid}/ns/net") if pid > 0 else None

    def decide(self, event: Event) -> Decision:
        payload = event.payload("struct sysctl_write_event")
        path = libbpf.c_string(payload.path)
        command = _cmdline(event.pid, libbpf.c_string(payload.comm))
        cookie: int | None = event.netns_cookie
        self.log.debug(
            "pid %d, cmd '%s' wrote sysctl '%s' in netns %s", event.pid, command, path, cookie_text(event.netns_cookie)
        )
        if cookie == libbpf.NETNS_UNKNOWN:
            cookie = self._writer_cookie(event.pid)
        # The daemon backs off every tuner managing that sysctl (AdminWrite).
        return Decision(effects=(AdminWrite(path, cookie, event.pid, command),))


TUNER = SysctlTuner
