"""Opening objects is pure parsing: no root needed, bad input is named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pybpftune.bpf import available, object_path
from pybpftune.errors import BpfObjectError, PybpftuneError
from pybpftune.libbpf import failed_program
from pybpftune.objects import OpenObject, ProgramInfo, program_kind

ROOT = Path(__file__).resolve().parents[2]


def packaged_objects() -> list[Path]:
    return sorted((ROOT / "src" / "pybpftune" / "bpf").glob("*.o"))


def named_objects() -> list[Path]:
    """Every object pybpftune loads: the packaged ones, the sample outside
    tuner's (built against the installed header) and the tests' own, less
    loss_xdp (iproute2 loads it to stand in for a lossy network)."""
    sample = sorted((ROOT / "examples" / "sample_tuner" / "pybpftune_sample").glob("*.bpf*.o"))
    tests = sorted(p for p in (ROOT / "tests" / "bpf").glob("*.o") if not p.name.startswith("loss_xdp."))
    return packaged_objects() + sample + tests


def test_every_packaged_object_has_both_variants() -> None:
    names = available()
    assert "probe" in names
    for name in names:
        assert object_path(name).is_file()
        assert object_path(name, legacy=True).is_file()


@pytest.mark.parametrize("path", packaged_objects(), ids=lambda p: p.name)
def test_every_object_opens(path: Path) -> None:
    with OpenObject.from_path(path) as obj:
        assert obj.programs
        for info in obj.programs.values():
            assert info.kind != "other", f"{info.name}: unknown section {info.section}"


def test_legacy_variant_has_no_btf_typed_programs() -> None:
    for path in (ROOT / "src" / "pybpftune" / "bpf").glob("*.bpf.legacy.o"):
        if path.name.startswith("probe."):
            continue  # the probe holds one program of every kind on purpose
        with OpenObject.from_path(path) as obj:
            kinds = {info.kind for info in obj.programs.values()}
            assert not kinds & {"tp_btf", "fentry", "fexit", "iter"}, f"{path.name}: {kinds}"


def test_truncated_object_is_named(tmp_path: Path) -> None:
    data = object_path("probe").read_bytes()
    bad = tmp_path / "cut.bpf.o"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(BpfObjectError, match="cut"):
        OpenObject.from_path(bad)


def test_garbage_and_missing_objects(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bpf.o"
    junk.write_bytes(b"not an elf file at all" * 10)
    with pytest.raises(BpfObjectError, match="not an ELF"):
        OpenObject.from_path(junk)
    with pytest.raises(BpfObjectError, match="cannot read"):
        OpenObject.from_path(tmp_path / "absent.bpf.o")


def test_globals_set_before_load_are_in_the_initial_image(test_object: Path) -> None:
    with OpenObject.from_path(test_object) as obj:
        obj.set_global("magic", 0xDEADBEEF)
        obj.set_global("bpftune_pid", 1234)
        assert obj.get_global("magic") == 0xDEADBEEF
        assert obj.get_global("bpftune_learning_rate") == 4  # .data default from the BPF source
        with pytest.raises(PybpftuneError, match="no global"):
            obj.set_global("no_such_variable", 1)


def test_program_metadata(test_object: Path) -> None:
    with OpenObject.from_path(test_object) as obj:
        tp = obj.programs["bpftune_syscall__tp_btf"]
        assert (tp.kind, tp.signal, tp.family, tp.target) == ("tp_btf", "syscall", "tp_btf", "sys_enter")
        kp = obj.programs["bpftune_syscall__kprobe"]
        assert (kp.kind, kp.family) == ("kprobe", "kprobe")


@pytest.mark.parametrize("path", named_objects(), ids=lambda p: p.name)
def test_every_program_and_map_is_named_bpftune(path: Path) -> None:
    """Operators find ours with `bpftool prog | grep bpftune` (bpftool prints a
    program's full name) and `bpftool map | grep bpftune` (maps show the
    kernel's name: the first 15 characters, so ours fit in 15)."""
    with OpenObject.from_path(path) as obj:
        assert obj.programs and all(name.startswith("bpftune_") for name in obj.programs), list(obj.programs)
        maps = obj.map_names
        assert all(name.startswith("bpftune") and len(name) <= 15 for name in maps), maps


@pytest.mark.parametrize(
    ("name", "signal"),
    [
        ("bpftune_rcv_space__tp_btf", "rcv_space"),
        ("bpftune_sysctl_write__cgroup_sysctl", "sysctl_write"),
        ("bpftune_sysctl_gate", None),
        ("rcv_space__kprobe", "rcv_space"),  # an object built before the prefix
    ],
)
def test_signal_is_read_after_the_prefix(name: str, signal: str | None) -> None:
    assert ProgramInfo(name, "kprobe/x", "kprobe").signal == signal


def test_configuring_after_close_is_refused(test_object: Path) -> None:
    obj = OpenObject.from_path(test_object)
    obj.close()
    obj.close()  # idempotent
    with pytest.raises(PybpftuneError, match="closed"):
        obj.set_autoload("bpftune_syscall__kprobe", False)


@pytest.mark.parametrize(
    ("section", "kind"),
    [
        ("tp_btf/neigh_create", "tp_btf"),
        ("raw_tp/neigh_create", "raw_tp"),
        ("fentry/tcp_v4_connect", "fentry"),
        ("fexit/x", "fexit"),
        ("kprobe/x", "kprobe"),
        ("kretprobe/x", "kretprobe"),
        ("iter/tcp", "iter"),
        ("cgroup/sysctl", "cgroup_sysctl"),
        ("sockops", "sockops"),
        ("weird/thing", "other"),
    ],
)
def test_program_kind(section: str, kind: str) -> None:
    assert program_kind(section) == kind


def test_failed_program_is_found_in_libbpf_log() -> None:
    log = [
        "libbpf: prog 'rcv__fentry': BPF program load failed: Permission denied",
        "libbpf: -- BEGIN PROG LOAD LOG --",
        "R1 invalid mem access 'scalar'",
        "libbpf: prog 'rcv__fentry': failed to load: -13",
        "libbpf: failed to load object 'tcp'",
    ]
    assert failed_program(log) == "rcv__fentry"
    assert failed_program(["libbpf: failed to load object 'x'"]) is None


def test_loading_spends_the_open_object(test_object: Path) -> None:
    """What a load (here: an empty hand-over) returns owns the object; the
    open object configures nothing more, and both close idempotently."""
    obj = OpenObject.from_path(test_object)
    with pytest.raises(PybpftuneError, match="2 fds handed over for 0 names"):
        obj.adopt([], [os.dup(0), os.dup(0)])
    assert not obj.closed, "a refused hand-over leaves the object open"
    with obj.adopt([], []) as loaded:
        with pytest.raises(PybpftuneError, match="loaded"):
            obj.set_autoload("bpftune_syscall__kprobe", False)
        assert loaded.programs == obj.programs and loaded.name == obj.name
        assert loaded.unavailable() == []
    assert loaded.closed
    loaded.close()
    obj.close()
