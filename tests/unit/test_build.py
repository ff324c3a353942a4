"""`python -m pybpftune.build`: where an outside tuner finds the headers and the fragment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pybpftune import build

ROOT = Path(__file__).resolve().parents[2]


def test_the_include_dir_holds_what_a_tuner_compiles_against() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pybpftune.build", "--include-dir"], capture_output=True, text=True, check=True
    )
    directory = Path(out.stdout.strip())
    assert sorted(p.name for p in directory.iterdir()) == sorted(build.INCLUDE_FILES)
    # The installed copies are the sources our own objects are built from.
    assert (directory / "pybpftune.bpf.h").read_bytes() == (ROOT / "src/bpf/pybpftune.bpf.h").read_bytes()
    assert (directory / "pybpftune.mk").read_bytes() == (ROOT / "src/bpf/pybpftune.mk").read_bytes()


def test_flags_and_fragment(capsys: pytest.CaptureFixture[str]) -> None:
    assert build.main(["--cflags"]) == 0
    assert capsys.readouterr().out == f"-I{build.include_dir()}\n"
    assert build.main(["--makefile"]) == 0
    assert capsys.readouterr().out == f"{build.include_dir() / 'pybpftune.mk'}\n"


def test_missing_headers_are_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(build, "INCLUDE_FILES", ("no-such-header.h",))
    assert build.main(["--include-dir"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pybpftune.build: no-such-header.h missing from ") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        build.main([])
    assert exc.value.code == 2
