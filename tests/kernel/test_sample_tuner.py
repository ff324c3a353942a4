"""The sample outside tuner (examples/sample_tuner) against the real kernel.

Its objects are built from its own directory against the headers pybpftune
installed (`make` runs its Makefile with the venv's python).  One daemon per
variant loads it from a plugin directory, sees its event, has it removed,
refuses untrusted copies and loads it again, all without a restart.  The
kprobe form, which only stock kernels run, is tested in the VMs.
The fresh-virtualenv install of the package is the wheel stage's
(tests/sample-tuner-check.sh).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pybpftune import libbpf
from pybpftune.objects import OpenObject, read_object_file

from .forms import fallback_forms
from .harness import IN_VM, SLOW, Daemon, repeat_until_logged, trusted_dir

pytestmark = pytest.mark.kernel

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample_tuner" / "pybpftune_sample"
OBJECTS = ("sample_tuner.bpf.o", "sample_tuner.bpf.legacy.o")
MODULE = "sample_tuner.py"


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    missing = [f for f in OBJECTS if not (SAMPLE / f).is_file()]
    if missing:
        pytest.skip(f"the sample tuner is not built ({', '.join(missing)}; run `make`)")


def install_module(plugins: Path, mode: int = 0o644) -> Path:
    """Put the module in whole: written under another name, then renamed."""
    staging = plugins / ".sample.staging"
    shutil.copyfile(SAMPLE / MODULE, staging)
    staging.chmod(mode)
    staging.rename(plugins / MODULE)
    return plugins / MODULE


def program_names() -> set[str]:
    """The sample's full program names (the header's macros name them
    bpftune_<signal>__<form>, so an outside tuner's are recognisable too)."""
    names: set[str] = set()
    for f in OBJECTS:
        with OpenObject(read_object_file(SAMPLE / f), "sample_tuner") as obj:
            names |= set(obj.programs)
    assert names and all(n.startswith("bpftune_") for n in names), names
    return names


def loaded(names: set[str]) -> list[str]:
    """Those of ``names`` loaded now, compared in full: the kernel's own names
    stop at 15 characters, where the sample's forms look alike."""
    return [name for _id, name, _type in libbpf.loaded_programs(full_names=True) if name in names]


def wait_unloaded(names: set[str], timeout: float = 5) -> list[str]:
    deadline = time.monotonic() + timeout * SLOW
    while (left := loaded(names)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def rename(name: str) -> None:
    """A process that gives itself ``name``: task:task_rename fires."""
    subprocess.run(["sh", "-c", f"printf %s {name} > /proc/self/comm"], check=True)


def test_sample_tuner_hot_added_removed_and_refused(
    tmp_path: Path, variant: str, variant_args: tuple[str, ...]
) -> None:
    names = program_names()
    assert not loaded(names), "a sample tuner is already loaded"
    tag = f"{os.getpid() % 100000:05d}"
    with trusted_dir() as plugins:
        for f in OBJECTS:
            shutil.copyfile(SAMPLE / f, plugins / f)
        module = install_module(plugins)
        args = ["-s", "-l", str(plugins), "-a", "sample", "--state-dir", str(tmp_path / "state"), *variant_args]
        with Daemon(args) as d:
            d.started()
            form = "raw_tp" if variant == "legacy" else "tp_btf"
            d.wait_for(rf"tuner sample started \(rename via {form}\)")
            assert loaded(names)
            seen = rf"sample: pid \d+ renamed a task to 'sample-a{tag}'"
            repeat_until_logged(d, lambda: rename(f"sample-a{tag}"), seen)

            # Removed: stopped, its programs detached; the daemon goes on.
            mark = len(d.lines)
            module.unlink()
            d.wait_for(rf"removed '{re.escape(str(module))}', fini tuner sample$", start=mark)
            assert d.wait_for(r"# sample: \d+ rename event\(s\) seen", start=mark)
            assert not wait_unloaded(names), "the removed tuner's programs are still loaded"

            # Untrusted copies are refused, one line each.
            refused = rf"refusing untrusted plugin '{re.escape(str(module))}': "
            install_module(plugins, mode=0o664)
            d.wait_for(refused + r".* is group- or other-writable \(mode 0664\)", start=mark)
            module.unlink()
            module.symlink_to(SAMPLE / MODULE)
            d.wait_for(refused + r".* is a symbolic link", start=mark)
            module.unlink()

            # Added again without a restart; a new tuner id receives the events.
            install_module(plugins)
            d.wait_for(rf"added lib {re.escape(str(module))}, init succeeded", start=mark)
            assert loaded(names)
            repeat_until_logged(d, lambda: rename(f"sample-b{tag}"), rf"renamed a task to 'sample-b{tag}'")
            assert d.proc.poll() is None
            assert d.stop() == 0
        out = d.output
        assert "Traceback" not in out
        assert out.count("tuner sample started") == 2
        assert out.count("init succeeded") == 1 and "init failed" not in out
    assert not wait_unloaded(names)


@pytest.mark.guest  # kprobes attach only in the VMs' stock kernels
@pytest.mark.all_variants
def test_sample_tuner_kprobe_form(variant: str) -> None:
    """With its tracepoint ruled out the sample falls back to its kprobe on
    __set_task_comm and still sees a rename; where kprobes cannot attach (the
    host) the loader says so, naming the signal."""
    name = f"sample-k{os.getpid() % 100000:05d}"
    with fallback_forms("sample_tuner", variant, tuner_id=9, netns=True, directory=SAMPLE) as forms:
        if not forms.real.works("kprobe"):
            assert not IN_VM, "kprobes attach in the VMs' stock kernels"
            forms.assert_says_why("rename")
            return
        assert forms.loaded is not None
        choice = forms.loaded.choices["rename"]
        assert choice.chosen == "kprobe", choice.describe()
        forms.poll_until(lambda: any(e.text == name for e in forms.events), 10, between=lambda: rename(name))
        [event] = [e for e in forms.events if e.text == name][:1]
        assert event.tuner_id == 9 and event.scenario_id == 0 and event.pid > 0
