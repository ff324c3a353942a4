"""The CLI's operator-facing behaviour, in-process (no root needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import pybpftune.support as support_mod
from pybpftune.cli import main
from tests.unit.test_support_and_loader import make_support


def test_help_teaches() -> None:
    result = CliRunner().invoke(main, ["-h"])
    assert result.exit_code == 0
    for flag in ("-a, --allow", "-S, --support", "-R, --rollback", "-r, --learning-rate", "Examples:"):
        assert flag in result.output


def test_bad_learning_rate_is_one_line_exit_2() -> None:
    result = CliRunner().invoke(main, ["-r", "9"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "9 is not in the range 0<=x<=4" in result.output


def test_unknown_option_exit_2() -> None:
    result = CliRunner().invoke(main, ["--frobnicate"])
    assert result.exit_code == 2


def test_version() -> None:
    result = CliRunner().invoke(main, ["-V"])
    assert result.exit_code == 0
    assert "pybpftune" in result.output and "libbpf" in result.output


@pytest.mark.parametrize(
    ("support", "code", "first"),
    [
        (make_support(), 0, "bpftune: bpftune works fully"),
        (make_support(ringbuf=False), 1, "bpftune: bpftune is not supported"),
        (make_support(kernel_btf=False), 1, "bpftune: bpftune is not supported"),
    ],
)
def test_support_exit_codes(
    monkeypatch: pytest.MonkeyPatch, support: support_mod.Support, code: int, first: str
) -> None:
    monkeypatch.setattr(support_mod, "probe_support", lambda: support)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    result = CliRunner().invoke(main, ["-S"])
    assert result.exit_code == code
    assert result.stderr.splitlines()[0] == first
    # bpftune's lines, then which variant the daemon would run and why.
    assert result.stderr.splitlines()[-1].startswith("bpftune: pybpftune ")
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("support", "reason"),
    [(make_support(ringbuf=False), "ring buffer"), (make_support(kernel_btf=False), "kernel BTF")],
)
def test_daemon_refuses_unsupported_kernel_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object, support: support_mod.Support, reason: str
) -> None:
    import pybpftune.startup as startup_mod

    monkeypatch.setattr(startup_mod, "probe_support", lambda: support)
    monkeypatch.setattr(startup_mod, "cache_key", lambda: "")  # no cache of a real boot's answer
    monkeypatch.setattr("os.geteuid", lambda: 0)
    result = CliRunner().invoke(main, ["-s", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if "not supported" in line]
    assert len(lines) == 1 and reason in lines[0]
    assert "Traceback" not in result.output


def test_daemon_needs_root(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    result = CliRunner().invoke(main, ["-s", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "needs root" in result.stderr and "Traceback" not in result.output


def test_query_without_a_daemon_is_one_line_exit_1(tmp_path: Path) -> None:
    empty = tmp_path / "config.toml"
    empty.write_text("")
    result = CliRunner().invoke(main, ["-q", "status", "--state-dir", str(tmp_path), "--config", str(empty)])
    assert result.exit_code == 1
    assert result.stderr == f"bpftune: no pybpftune daemon is running (nothing listens on {tmp_path}/bpftune.sock)\n"
    assert result.stdout == ""


def test_json_needs_a_query(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--json", "--state-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr == "bpftune: --json goes with -q REQUEST\n"


def test_untrusted_plugin_directory_is_refused(tmp_path: Path) -> None:
    from pybpftune.errors import UsageError
    from pybpftune.registry import extra_tuners

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    plugins.chmod(0o777)
    with pytest.raises(UsageError, match="refusing untrusted plugin"):
        extra_tuners([str(plugins)])
    plugins.chmod(0o755)
    (plugins / "evil_tuner.py").write_text("TUNER = None\n")
    (plugins / "evil_tuner.py").chmod(0o666)
    with pytest.raises(UsageError, match="refusing untrusted plugin"):
        extra_tuners([str(plugins)])
