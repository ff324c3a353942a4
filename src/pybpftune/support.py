"""What the running kernel lets pybpftune do, learned by trying it.

Each program kind is loaded AND attached from the probe object, one at a time,
then detached: a kind counts only if both work (kprobes may load yet have no
PMU to attach to).  The result is cached for the process.  Nothing is left
behind: no mounts, no programs, no files.

Levels, in bpftune's words:

* ``full``   - kernel BTF, ring buffer, tp_btf, fentry/fexit, raw tracepoints
  and cgroup/sysctl all work: every form of every signal is available.
* ``legacy`` - kernel BTF, ring buffer, raw tracepoints and cgroup/sysctl
  work, but not all of the BTF-typed kinds (fentry is the usual casualty).
  Tuners still run; a signal whose only forms are unavailable is reported.
* ``none``   - no ring buffer, no kernel BTF, or no raw tracepoints.

The variant pybpftune loads is a separate decision: the full variant (tp_btf,
fentry and kprobe forms) whenever tp_btf works, else the legacy variant
(raw_tp and kprobe forms).  See docs/support.md.
"""

from __future__ import annotations

import functools
import os
import resource
from dataclasses import dataclass, field
from pathlib import Path

from . import isolate, libbpf
from .bpf import object_path
from .errors import BpfError, PybpftuneError
from .netns import current_cookie
from .objects import CGROUP_KINDS, LoadedObject, OpenObject
from .procfs import mounts

SO_NETNS_COOKIE = 71
KERNEL_BTF = Path("/sys/kernel/btf/vmlinux")

# Probe program per kind, in the order reported.
PROBE_PROGRAMS = {
    "fentry": "bpftune_probe_fentry",
    "fexit": "bpftune_probe_fexit",
    "tp_btf": "bpftune_probe_tp_btf",
    "raw_tp": "bpftune_probe_raw_tp",
    "kprobe": "bpftune_probe_kprobe",
    "kretprobe": "bpftune_probe_kretprobe",
    "iter": "bpftune_probe_iter",
    "cgroup_sysctl": "bpftune_probe_cgroup_sysctl",
    "sockops": "bpftune_probe_sockops",
}
FULL_KINDS = ("tp_btf", "fentry", "fexit", "raw_tp", "cgroup_sysctl")
LEGACY_KINDS = ("raw_tp", "cgroup_sysctl")


@dataclass(frozen=True)
class KindSupport:
    """Whether one program kind loads and attaches here, and if not why."""

    kind: str
    loads: bool
    attaches: bool
    reason: str = ""

    @property
    def works(self) -> bool:
        return self.loads and self.attaches


@dataclass(frozen=True)
class Support:
    kinds: dict[str, KindSupport]
    kernel_btf: bool
    ringbuf: bool
    netns_cookie: bool
    cgroup2: str | None
    memlock: str
    kernel: str = field(default_factory=lambda: os.uname().release)

    def works(self, kind: str) -> bool:
        """Programs of ``kind`` load and attach (unknown kinds: assume yes)."""
        k = self.kinds.get(kind)
        return True if k is None else k.works

    def why_not(self, kind: str) -> str:
        k = self.kinds.get(kind)
        return "" if k is None or k.works else k.reason

    @property
    def level(self) -> str:
        if not (self.kernel_btf and self.ringbuf):
            return "none"
        if all(self.works(k) for k in FULL_KINDS):
            return "full"
        if all(self.works(k) for k in LEGACY_KINDS):
            return "legacy"
        return "none"

    @property
    def usable(self) -> bool:
        return self.level != "none"

    @property
    def default_variant(self) -> str:
        """Which object variant to load: full wherever BTF-typed tracepoints work."""
        return "full" if self.works("tp_btf") else "legacy"

    def missing(self) -> list[str]:
        """Why the level is not 'full', one phrase each."""
        out = []
        if not self.kernel_btf:
            out.append("no kernel BTF (/sys/kernel/btf/vmlinux)")
        if not self.ringbuf:
            out.append("no BPF ring buffer (needs Linux 5.8+)")
        out.extend(f"{k}: {self.kinds[k].reason}" for k in FULL_KINDS if k in self.kinds and not self.works(k))
        return out


def find_cgroup2() -> str | None:
    """Mount point of a cgroup v2 hierarchy, preferring /sys/fs/cgroup."""
    found = [m.target for m in mounts() if m.fstype == "cgroup2"]
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if preferred in found:
            return preferred
    return found[0] if found else None


def raise_memlock() -> str:
    """Try to lift RLIMIT_MEMLOCK; never fatal (5.11+ charges BPF to memcg)."""
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        return "unlimited"
    except (ValueError, OSError):
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft // 1024} KiB"
        return f"{limit} (could not raise; fine on Linux 5.11+, which charges BPF memory to the cgroup)"


def _attach_probe(obj: LoadedObject, kind: str, program: str, cgroup2: str | None) -> KindSupport:
    """Attach one loaded probe program and detach it at once."""
    try:
        if kind in CGROUP_KINDS:
            if cgroup2 is None:
                return KindSupport(kind, True, False, "no cgroup v2 hierarchy is mounted")
            fd = os.open(cgroup2, os.O_RDONLY | os.O_DIRECTORY)
            try:
                obj.attach(program, cgroup_fd=fd).close()
            finally:
                os.close(fd)
        else:
            obj.attach(program).close()
    except BpfError as exc:
        return KindSupport(kind, True, False, f"attach refused: {exc.short()}")
    return KindSupport(kind, True, True)


def _probe_kinds(data: bytes, kinds: dict[str, str], cgroup2: str | None) -> dict[str, KindSupport]:
    """Load every probe program at once (one BTF parse: slow kernels and VMs
    care); only if the kernel refuses that, load them one by one."""
    with OpenObject(data, "probe") as obj:
        for name in obj.programs:
            obj.set_autoload(name, name in kinds.values())
        try:
            loaded = obj.load()
        except BpfError:
            pass
        else:
            with loaded:
                return {kind: _attach_probe(loaded, kind, prog, cgroup2) for kind, prog in kinds.items()}
    out = {}
    for kind, program in kinds.items():
        with OpenObject(data, "probe") as obj:
            for name in obj.programs:
                obj.set_autoload(name, name == program)
            try:
                loaded = obj.load()
            except BpfError as exc:
                out[kind] = KindSupport(kind, False, False, f"load refused: {exc.short()}")
                continue
        with loaded:
            out[kind] = _attach_probe(loaded, kind, program, cgroup2)
    return out


def assemble(kinds: dict[str, KindSupport]) -> Support:
    """A Support from probed (or cached) program kinds plus the cheap facts,
    which are always looked up afresh (they can change without a reboot)."""
    return Support(
        kinds={k: kinds[k] for k in PROBE_PROGRAMS},
        kernel_btf=KERNEL_BTF.exists(),
        ringbuf=libbpf.probe_map_type(libbpf.MAP_TYPE_RINGBUF),
        netns_cookie=current_cookie() is not None,
        cgroup2=find_cgroup2(),
        memlock=raise_memlock(),
    )


def probe_kinds() -> dict[str, KindSupport]:
    """Load and attach one probe program per kind (the costly part)."""
    raise_memlock()
    kernel_btf = KERNEL_BTF.exists()
    cgroup2 = find_cgroup2()
    kinds: dict[str, KindSupport] = {}
    try:
        data = object_path("probe").read_bytes()
    except OSError as exc:
        raise PybpftuneError(f"cannot read the probe object: {exc}") from exc
    btf_kinds = ("fentry", "fexit", "tp_btf", "iter")
    for kind in PROBE_PROGRAMS:
        if not kernel_btf and kind in btf_kinds:
            kinds[kind] = KindSupport(kind, False, False, "needs kernel BTF")
    todo = {k: p for k, p in PROBE_PROGRAMS.items() if k not in kinds}
    kinds.update(_probe_kinds(data, todo, cgroup2))
    return {k: kinds[k] for k in PROBE_PROGRAMS}


def probe_kinds_isolated() -> dict[str, KindSupport]:
    """:func:`probe_kinds` in a forked child (isolate.py): the probe parses the
    kernel's BTF like any load, and that must not count in the daemon's memory."""

    def job() -> tuple[object, list[int]]:
        return [(k.kind, k.loads, k.attaches, k.reason) for k in probe_kinds().values()], []

    value, _ = isolate.run(job, "probing the kernel")
    return {kind: KindSupport(kind, loads, attaches, reason) for kind, loads, attaches, reason in value}


@functools.cache
def probe_support() -> Support:
    """Probe once per process; later calls return the cached answer."""
    return assemble(probe_kinds_isolated())


# --- the per-boot cache of probed kinds --------------------------------------------
#
# What a kernel lets BPF do does not change while it runs, and probing costs a
# kernel BTF parse and nine verifications (about a second in an emulated
# guest), so the daemon keeps the probed kinds for the rest of the boot.  The
# key names everything the answer depends on; a file that does not match it
# exactly, or does not parse as expected, is ignored and the kernel probed again.

CACHE_FORMAT = 1


def cache_key() -> str:
    """This boot, kernel, libbpf, pybpftune and probe object."""
    from . import __version__

    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        st = object_path("probe").stat()
    except OSError:
        return ""  # no boot id: no cache
    probe = f"{st.st_size}:{st.st_mtime_ns}"
    return f"{CACHE_FORMAT} {boot_id} {os.uname().release} {libbpf.version()} {__version__} {probe}"


def kinds_to_text(key: str, kinds: dict[str, KindSupport]) -> str:
    import json

    return json.dumps({"key": key, "kinds": {k.kind: [k.loads, k.attaches, k.reason] for k in kinds.values()}})


def kinds_from_text(text: str, key: str) -> dict[str, KindSupport] | None:
    """Validated kinds from a cache file, or None (wrong key, damaged, incomplete)."""
    import json

    try:
        raw = json.loads(text)
    except ValueError:
        return None
    if not key or not isinstance(raw, dict) or raw.get("key") != key or not isinstance(raw.get("kinds"), dict):
        return None
    kinds: dict[str, KindSupport] = {}
    for kind in PROBE_PROGRAMS:
        entry = raw["kinds"].get(kind)
        if not (isinstance(entry, list) and len(entry) == 3):
            return None
        loads, attaches, reason = entry
        if not (isinstance(loads, bool) and isinstance(attaches, bool) and isinstance(reason, str)):
            return None
        if len(reason) > 500 or not reason.isprintable() or (loads and attaches and reason):
            return None
        kinds[kind] = KindSupport(kind, loads, attaches, reason)
    return kinds


# Program kinds the full variant's fallbacks are made of, in the order named.
VARIANT_KINDS = ("tp_btf", "fentry", "fexit", "kprobe", "kretprobe", "raw_tp")


def variant_line(support: Support, legacy: bool = False) -> str:
    """Which variant the daemon runs here and why, in one line: what -S prints
    after bpftune's lines, what the daemon logs at start and `status` says.

    bpftune's level ("works fully" / "in legacy mode") says whether every
    program kind works; the variant is a separate choice, and on a kernel
    where tp_btf works but fentry does not the two read as a contradiction
    unless this line explains it."""
    if not support.usable:
        return "pybpftune cannot run here: " + "; ".join(support.missing() or ["raw tracepoints or cgroup programs"])
    broken = [k for k in VARIANT_KINDS if k in support.kinds and not support.works(k)]
    first = f" ({broken[0]}: {support.why_not(broken[0])})" if broken else ""
    if legacy:
        return "pybpftune runs its legacy variant (raw tracepoints and kprobes) because -L asks for it"
    if support.default_variant == "legacy":
        return f"pybpftune runs its legacy variant (raw tracepoints and kprobes) because tp_btf does not work{first}"
    if not broken:
        return "pybpftune runs its full variant: every program kind it uses works here"
    return (
        f"pybpftune runs its full variant because tp_btf works; {', '.join(broken)} do not{first}, "
        "so signals written only in those forms use another form or are reported unavailable"
    )


def support_report(support: Support) -> tuple[list[str], list[str]]:
    """bpftune-compatible headline lines, then pybpftune's detail lines."""
    headline = {
        "full": "bpftune works fully",
        "legacy": "bpftune works in legacy mode",
        "none": "bpftune is not supported",
    }[support.level]
    lines = [headline]
    if support.usable:
        lines.append(
            "bpftune supports per-netns policy (via netns cookie)"
            if support.netns_cookie
            else "bpftune does not support per-netns policy (via netns cookie)"
        )
    detail = [f"kernel {support.kernel}, libbpf {libbpf.version()}"]
    detail.append(f"  {'kernel BTF':<14} {'yes' if support.kernel_btf else 'no'}")
    detail.append(f"  {'ring buffer':<14} {'yes' if support.ringbuf else 'no'}")
    detail.append(f"  {'cgroup v2':<14} {support.cgroup2 or 'not mounted'}")
    detail.append(f"  {'memlock':<14} {support.memlock}")
    detail.append("program kinds (load / attach):")
    for k in support.kinds.values():
        state = "works" if k.works else k.reason
        detail.append(f"  {k.kind:<14} {state}")
    if support.usable:
        detail.append(f"variant loaded by default: {support.default_variant}")
        if support.level != "full":
            detail.append("not fully supported because: " + "; ".join(support.missing()))
    else:
        detail.append("cannot run because: " + "; ".join(support.missing() or ["raw tracepoints or cgroup programs"]))
    return lines, detail
