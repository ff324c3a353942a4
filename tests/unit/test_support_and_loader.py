"""Support levels and the form chain's planning, without a kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from pybpftune.loader import _plan, _signals
from pybpftune.objects import OpenObject
from pybpftune.support import KindSupport, Support, support_report, variant_line

ALL_KINDS = ("fentry", "fexit", "tp_btf", "raw_tp", "kprobe", "kretprobe", "iter", "cgroup_sysctl", "sockops")


def make_support(broken: dict[str, str] | None = None, **kw: object) -> Support:
    broken = broken or {}
    kinds = {k: KindSupport(k, k not in broken, k not in broken, broken.get(k, "")) for k in ALL_KINDS}
    args: dict[str, object] = {
        "kernel_btf": True,
        "ringbuf": True,
        "netns_cookie": True,
        "cgroup2": "/sys/fs/cgroup",
        "memlock": "unlimited",
    }
    args.update(kw)
    return Support(kinds=kinds, **args)  # type: ignore[arg-type]


def test_levels() -> None:
    assert make_support().level == "full"
    dev_kernel = make_support({"fentry": "EPERM", "fexit": "EPERM", "kprobe": "ENOENT", "kretprobe": "ENOENT"})
    assert dev_kernel.level == "legacy"
    assert dev_kernel.default_variant == "full"
    assert make_support({"tp_btf": "x", "fentry": "x", "fexit": "x", "iter": "x"}).default_variant == "legacy"
    assert make_support(ringbuf=False).level == "none"
    assert make_support(kernel_btf=False).level == "none"
    assert make_support({"raw_tp": "x", "tp_btf": "x"}).level == "none"


def test_report_lines_match_bpftune() -> None:
    head, detail = support_report(make_support())
    assert head == ["bpftune works fully", "bpftune supports per-netns policy (via netns cookie)"]
    head, detail = support_report(make_support({"fentry": "load refused: EPERM"}, netns_cookie=False))
    assert head == ["bpftune works in legacy mode", "bpftune does not support per-netns policy (via netns cookie)"]
    assert any("fentry" in line and "EPERM" in line for line in detail)
    head, detail = support_report(make_support(ringbuf=False))
    assert head == ["bpftune is not supported"]
    assert any("ring buffer" in line for line in detail if "cannot run" in line)


def test_variant_line_says_which_variant_runs_and_why() -> None:
    """The line after bpftune's: on a kernel bpftune calls "legacy mode" the
    full variant still runs, and the line says so instead of contradicting."""
    assert variant_line(make_support()) == "pybpftune runs its full variant: every program kind it uses works here"
    dev = make_support({"fentry": "load refused: EPERM", "fexit": "load refused: EPERM", "kprobe": "attach refused"})
    assert support_report(dev)[0][0] == "bpftune works in legacy mode"
    assert variant_line(dev) == (
        "pybpftune runs its full variant because tp_btf works; fentry, fexit, kprobe do not (fentry: load refused: "
        "EPERM), so signals written only in those forms use another form or are reported unavailable"
    )
    assert variant_line(dev, legacy=True) == (
        "pybpftune runs its legacy variant (raw tracepoints and kprobes) because -L asks for it"
    )
    assert variant_line(make_support({"tp_btf": "load refused: EINVAL"})) == (
        "pybpftune runs its legacy variant (raw tracepoints and kprobes) because tp_btf does not work "
        "(tp_btf: load refused: EINVAL)"
    )
    assert variant_line(make_support(ringbuf=False)).startswith("pybpftune cannot run here: no BPF ring buffer")


def test_plan_prefers_tracepoints_and_switches_others_off(test_object: Path) -> None:
    with OpenObject.from_path(test_object) as obj:
        assert _signals(obj.programs.values()) == {
            "syscall": {"tp_btf": ["bpftune_syscall__tp_btf"], "kprobe": ["bpftune_syscall__kprobe"]}
        }
        choices = _plan(obj, make_support(), {})
        assert choices["syscall"].chosen == "tp_btf"
        assert obj.autoload("bpftune_syscall__tp_btf") and not obj.autoload("bpftune_syscall__kprobe")


def test_a_tuner_may_prefer_a_form_that_fires_less_often(test_object: Path) -> None:
    """ip_frag asks for its defrag-path forms first; where they do not work
    the usual order still finds the tracepoint."""
    with OpenObject.from_path(test_object) as obj:
        assert list(_signals(obj.programs.values(), ("kprobe",))["syscall"]) == ["kprobe", "tp_btf"]
        assert _plan(obj, make_support(), {}, ("kprobe",))["syscall"].chosen == "kprobe"
        refused = make_support({"kprobe": "load refused: EPERM"})
        assert _plan(obj, refused, {}, ("kprobe",))["syscall"].chosen == "tp_btf"


def test_plan_falls_back_and_explains(test_object: Path) -> None:
    with OpenObject.from_path(test_object) as obj:
        choices = _plan(obj, make_support({"tp_btf": "needs kernel BTF"}), {})
        assert choices["syscall"].chosen == "kprobe"
        assert obj.autoload("bpftune_syscall__kprobe") and not obj.autoload("bpftune_syscall__tp_btf")
        choices = _plan(obj, make_support({"tp_btf": "needs kernel BTF"}), {("syscall", "kprobe"): "attach refused"})
        assert choices["syscall"].chosen is None
        assert "needs kernel BTF" in choices["syscall"].describe()
        assert "attach refused" in choices["syscall"].describe()


@pytest.mark.parametrize("legacy", [False, True])
def test_legacy_variant_uses_raw_tracepoint(legacy: bool) -> None:
    name = "ringbuf_test.bpf.legacy.o" if legacy else "ringbuf_test.bpf.o"
    path = Path(__file__).resolve().parents[1] / "bpf" / name
    with OpenObject.from_path(path) as obj:
        choices = _plan(obj, make_support(), {})
        assert choices["syscall"].chosen == ("raw_tp" if legacy else "tp_btf")
