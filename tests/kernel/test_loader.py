"""The loader against the real kernel: verify, attach, fire, share, clean up."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pybpftune import libbpf
from pybpftune.errors import BpfLoadError, BpfObjectError, NotSupported
from pybpftune.events import Event
from pybpftune.loader import LoadBatch, LoadRequest, load_object
from pybpftune.objects import LoadedObject, OpenObject
from pybpftune.registry import builtin_tuners
from pybpftune.ringbuf import SharedMaps
from pybpftune.support import KindSupport, Support, probe_support, variant_line

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
OBJECTS = sorted((ROOT / "src" / "pybpftune" / "bpf").glob("*.o"))
TEST_OBJECTS = [ROOT / "tests" / "bpf" / "ringbuf_test.bpf.o", ROOT / "tests" / "bpf" / "ringbuf_test.bpf.legacy.o"]
GETPPID_SCENARIO = 7


def our_program_ids(prefix: str = "") -> set[int]:
    """Kernel ids of loaded programs whose names start with ``prefix``."""
    return {pid for pid, name, _type in libbpf.loaded_programs() if name.startswith(prefix)}


def settled_program_ids(prefix: str, allowed: set[int], timeout: float = 3.0) -> set[int]:
    """Program ids with ``prefix`` once the kernel's deferred frees have run."""
    deadline = time.monotonic() + timeout
    while True:
        ids = our_program_ids(prefix)
        if ids <= allowed or time.monotonic() > deadline:
            return ids
        time.sleep(0.05)


def kernel_dependent_forms(path: Path) -> dict[str, str]:
    """Programs of the object at ``path`` its tuner declares kernel-dependent."""
    for cls in builtin_tuners():
        if cls.bpf_name and path.name.split(".", 1)[0] == cls.bpf_name:
            return dict(cls.kernel_dependent_forms)
    return {}


def programs_of(path: Path) -> list[str]:
    with OpenObject.from_path(path) as obj:
        return list(obj.programs)


@pytest.mark.parametrize(
    ("path", "program"),
    [(p, prog) for p in OBJECTS for prog in programs_of(p)],
    ids=lambda v: v.name if isinstance(v, Path) else v,
)
def test_every_program_whose_kind_loads_passes_the_verifier(path: Path, program: str) -> None:
    """One load per program, so a rejection names exactly one (host stage)."""
    support = probe_support()
    with OpenObject.from_path(path) as obj:
        kind = obj.programs[program].kind
        for name in obj.programs:
            obj.set_autoload(name, name == program)
        if not support.kinds.get(kind, KindSupport(kind, True, True)).loads:
            # The probe said this kind cannot load here: the kernel must agree.
            with pytest.raises(BpfLoadError):
                obj.load()
            return
        needs = kernel_dependent_forms(path).get(program)
        if needs is not None:
            # Declared by its tuner: this kernel may lack what the form needs;
            # the loader then uses another form or reports the signal.
            try:
                loaded = obj.load()
            except BpfLoadError as exc:
                print(f"{program} refused here ({needs}): {exc}")
                return
        else:
            loaded = obj.load()  # raises BpfLoadError with the verifier log on rejection
    with loaded:
        assert loaded.program_fd(program) >= 0


@pytest.mark.guest
@pytest.mark.parametrize("path", OBJECTS, ids=lambda p: p.name)
def test_every_object_passes_the_verifier_in_one_load(path: Path) -> None:
    """Every program whose kind loads here, in one load per object: in the
    slow guests each load re-parses the kernel BTF, so one load per object
    keeps the VM stages short; BpfLoadError names the program that failed."""
    support = probe_support()
    dependent = kernel_dependent_forms(path)
    with OpenObject.from_path(path) as obj:
        loadable = [
            name
            for name, info in obj.programs.items()
            if support.kinds.get(info.kind, KindSupport(info.kind, True, True)).loads and name not in dependent
        ]
        for name in obj.programs:
            obj.set_autoload(name, name in loadable)
        with obj.load() as loaded:
            assert all(loaded.program_fd(name) >= 0 for name in loadable)


def _getppid_events(ring: SharedMaps, want: int) -> None:
    for _ in range(want):
        os.getppid()
    for _ in range(20):
        if ring.poll(50) == 0 and ring.received >= want:
            break


@pytest.mark.guest
@pytest.mark.parametrize("variant", TEST_OBJECTS, ids=["full", "legacy"])
def test_two_objects_feed_one_ring_buffer(variant: Path) -> None:
    support = probe_support()
    got: dict[int, list[Event]] = {1: [], 2: []}
    before = our_program_ids("bpftune_syscall")
    with SharedMaps() as ring:
        ring.register(1, got[1].append)
        ring.register(2, got[2].append)
        first = load_object(
            variant,
            "first",
            support,
            shared=ring,
            globals_={"tuner_id": 1, "bpftune_pid": os.getpid(), "magic": 0x1111},
        )
        second = load_object(
            variant,
            "second",
            support,
            shared=ring,
            globals_={"tuner_id": 2, "bpftune_pid": os.getpid(), "magic": 0x2222},
        )
        with first, second:
            # Both objects write through the same kernel map.
            assert first.map_fd("bpftune_ringbuf") != second.map_fd("bpftune_ringbuf")
            assert os.fstat(ring.map_fd("bpftune_ringbuf")).st_ino == os.fstat(second.map_fd("bpftune_ringbuf")).st_ino
            _getppid_events(ring, 3)
            # A global written after load through the mmap is seen by the BPF side.
            second.set_global("value", 99)
            _getppid_events(ring, 1)
            assert second.get_global("bpftune_events_sent") == 4
            assert second.get_global("bpftune_ringbuf_drops") == 0
        assert len(got[1]) == 4 and len(got[2]) == 4
        for tuner_id, magic in ((1, 0x1111), (2, 0x2222)):
            payloads = [ev.payload("struct pybpftune_test_payload") for ev in got[tuner_id]]
            assert {ev.scenario_id for ev in got[tuner_id]} == {GETPPID_SCENARIO}
            assert {ev.pid for ev in got[tuner_id]} == {os.getpid()}
            assert [p.seq for p in payloads] == [0, 1, 2, 3]
            assert {p.magic for p in payloads} == {magic}
        assert [ev.payload("struct pybpftune_test_payload").value for ev in got[2]] == [0, 0, 0, 99]
    assert settled_program_ids("bpftune_syscall", before) <= before, "programs left loaded after close"


@pytest.mark.guest
def test_a_batch_loads_in_one_child_and_shares_the_ring_buffer(test_object: Path) -> None:
    support = probe_support()
    got: dict[int, list[Event]] = {1: [], 2: [], 3: []}
    before = our_program_ids("bpftune_syscall")
    with SharedMaps() as ring:
        for tuner_id, events in got.items():
            ring.register(tuner_id, events.append)
        batch = LoadBatch()

        def request(i: int) -> Callable[[], LoadRequest]:
            source = test_object if i != 2 else test_object.with_name("missing.bpf.o")
            return lambda: LoadRequest(
                source,
                f"batch{i}",
                support,
                shared=ring,
                globals_={"tuner_id": i, "bpftune_pid": os.getpid(), "magic": i},
            )

        takes = [batch.add(request(i)) for i in (1, 2, 3)]
        batch.seal()
        loaded: list[LoadedObject] = []
        try:
            loaded.append(takes[0]())
            with pytest.raises(BpfObjectError, match=r"missing\.bpf\.o"):
                takes[1]()  # its own failure: the child goes on with the next
            loaded.append(takes[2]())
            ring_ino = os.fstat(ring.map_fd("bpftune_ringbuf")).st_ino
            for one in loaded:
                assert os.fstat(one.map_fd("bpftune_ringbuf")).st_ino == ring_ino
                assert one.links, "attached in the child, adopted here"
            _getppid_events(ring, 2)
        finally:
            batch.close()
            batch.close()
            for one in loaded:
                one.close()
    assert len(got[1]) == 2 and len(got[3]) == 2
    assert {ev.payload("struct pybpftune_test_payload").magic for ev in got[3]} == {3}
    assert settled_program_ids("bpftune_syscall", before) <= before, "programs left loaded after close"


@pytest.mark.guest
def test_a_batch_closed_early_leaks_nothing(test_object: Path) -> None:
    support = probe_support()

    def cycle(take: int) -> None:
        with SharedMaps() as ring:
            batch = LoadBatch()

            def request(i: int) -> Callable[[], LoadRequest]:
                return lambda: LoadRequest(test_object, f"early{i}", support, shared=ring, globals_={"tuner_id": i})

            takes = [batch.add(request(i)) for i in range(3)]
            batch.seal()
            loaded = [t() for t in takes[:take]]
            batch.close()  # the rest end with the child
            for one in loaded:
                one.close()
                one.close()

    before_ids = our_program_ids("bpftune_syscall")
    cycle(3)  # warm caches
    before = len(list(Path("/proc/self/fd").iterdir()))
    for take in (0, 1, 3):
        cycle(take)
    assert len(list(Path("/proc/self/fd").iterdir())) == before
    assert settled_program_ids("bpftune_syscall", before_ids) <= before_ids, "programs left loaded after close"


@pytest.mark.guest
def test_unknown_tuner_events_are_dropped_not_fatal(test_object: Path) -> None:
    with (
        SharedMaps() as ring,
        load_object(
            test_object,
            "orphan",
            probe_support(),
            shared=ring,
            globals_={"tuner_id": 9, "bpftune_pid": os.getpid()},
        ),
    ):
        _getppid_events(ring, 2)
        assert ring.dropped_unknown == 2 and ring.received == 0


@pytest.mark.guest
def test_handler_errors_reach_the_error_callback(test_object: Path) -> None:
    errors: list[tuple[int, BaseException]] = []

    def bad_handler(event: Event) -> None:
        raise ValueError("tuner bug")

    with (
        SharedMaps(on_error=lambda tid, exc: errors.append((tid, exc))) as ring,
        load_object(
            test_object, "buggy", probe_support(), shared=ring, globals_={"tuner_id": 4, "bpftune_pid": os.getpid()}
        ),
    ):
        ring.register(4, bad_handler)
        _getppid_events(ring, 1)
    assert errors and errors[0][0] == 4 and isinstance(errors[0][1], ValueError)


@pytest.mark.guest
def test_attach_chain_falls_back_or_explains(test_object: Path) -> None:
    """With tp_btf ruled out, the kprobe form is used where kprobes work,
    and where they do not the error names the signal and both reasons."""
    real = probe_support()
    kinds = dict(real.kinds)
    kinds["tp_btf"] = KindSupport("tp_btf", False, False, "ruled out by the test")
    support = Support(kinds, real.kernel_btf, real.ringbuf, real.netns_cookie, real.cgroup2, real.memlock)
    got: list[Event] = []
    with SharedMaps() as ring:
        ring.register(0, got.append)
        try:
            loaded = load_object(test_object, "chain", support, shared=ring, globals_={"bpftune_pid": os.getpid()})
        except NotSupported as exc:
            assert not real.works("kprobe")
            assert "syscall" in str(exc) and "ruled out by the test" in str(exc) and "kprobe" in str(exc)
            return
        with loaded:
            assert real.works("kprobe")
            assert loaded.choices["syscall"].chosen == "kprobe"
            _getppid_events(ring, 2)
        assert len(got) == 2


@pytest.mark.guest
def test_broken_program_fails_with_verifier_log() -> None:
    path = ROOT / "tests" / "bpf" / "broken_fentry.bpf.o"
    support = probe_support()
    with OpenObject.from_path(path) as obj, pytest.raises(BpfLoadError) as info:
        obj.load()
    err = info.value
    assert err.program == "bpftune_connect__fentry"
    assert err.log_tail, "the error must carry libbpf's log"
    if support.works("fentry"):
        assert any("invalid mem access" in line or "R1" in line for line in err.log_tail), err.log_tail
    with pytest.raises(NotSupported, match="connect"):
        load_object(path, "broken", support)


@pytest.mark.guest
def test_no_fd_leak_across_load_and_close(test_object: Path) -> None:
    support = probe_support()

    def cycle() -> None:
        with SharedMaps() as ring:
            for i in range(3):
                loaded = load_object(test_object, f"leak{i}", support, shared=ring, globals_={"tuner_id": i})
                loaded.set_global("value", i)  # maps the .bss too
                loaded.close()
                loaded.close()

    cycle()  # warm caches (libbpf's kernel BTF, probe results)
    before = len(list(Path("/proc/self/fd").iterdir()))
    for _ in range(3):
        cycle()
    assert len(list(Path("/proc/self/fd").iterdir())) == before


@pytest.mark.guest
def test_support_cli_leaves_nothing_behind() -> None:
    mounts = Path("/proc/mounts").read_text()
    programs = our_program_ids("bpftune_probe")
    bpftune = Path(sys.executable).parent / "bpftune"
    proc = subprocess.run([str(bpftune), "-S"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stderr.splitlines()[:2]
    # What docs/support.md promises for the kernels we test on.
    expected = {
        "6.1": ("works fully", "supports"),
        "5.10": ("works fully", "does not support"),
    }.get(".".join(os.uname().release.split(".")[:2]))
    if expected is not None:
        assert first == f"bpftune: bpftune {expected[0]}", proc.stderr
        assert second == f"bpftune: bpftune {expected[1]} per-netns policy (via netns cookie)", proc.stderr
    else:  # the development host, or a contributor's kernel: one of the two, and consistent with the probe
        level = probe_support().level
        assert (
            first == {"full": "bpftune: bpftune works fully", "legacy": "bpftune: bpftune works in legacy mode"}[level]
        )
        assert "per-netns policy" in second
    # After bpftune's lines: which variant the daemon runs here and why.
    assert proc.stderr.splitlines()[2] == f"bpftune: {variant_line(probe_support())}"
    assert "tp_btf" in proc.stdout and "cgroup_sysctl" in proc.stdout
    assert Path("/proc/mounts").read_text() == mounts
    assert settled_program_ids("bpftune_probe", programs) <= programs


@pytest.mark.guest
def test_one_poll_dispatches_at_most_max_batch(test_object: Path) -> None:
    got: list[Event] = []
    with (
        SharedMaps(max_batch=2) as ring,
        load_object(
            test_object, "batch", probe_support(), shared=ring, globals_={"tuner_id": 3, "bpftune_pid": os.getpid()}
        ),
    ):
        ring.register(3, got.append)
        for _ in range(5):
            os.getppid()
        assert ring.poll(100) == 2
        assert ring.poll(100) == 2
        assert ring.poll(100) == 1
    assert [ev.payload("struct pybpftune_test_payload").seq for ev in got] == [0, 1, 2, 3, 4]


@pytest.mark.guest
def test_interrupt_in_a_handler_is_not_swallowed(test_object: Path) -> None:
    def interrupted(event: Event) -> None:
        raise KeyboardInterrupt

    with (
        SharedMaps(on_error=lambda tid, exc: None) as ring,
        load_object(
            test_object, "intr", probe_support(), shared=ring, globals_={"tuner_id": 5, "bpftune_pid": os.getpid()}
        ),
    ):
        ring.register(5, interrupted)
        os.getppid()
        with pytest.raises(KeyboardInterrupt):
            ring.poll(100)
