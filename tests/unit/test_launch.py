"""The click-free daemon command line (pybpftune.launch) and the cheap
entry-point check: both keep start-up imports small without changing what a
command line means."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import click
import pytest

from pybpftune import launch, registry
from pybpftune.cli import main
from pybpftune.config import Config


def _click_daemon_options() -> dict[str, tuple[str, str]]:
    """option text (without dashes) -> (dest, kind) for every click option the fast path handles."""
    out: dict[str, tuple[str, str]] = {}
    for param in main.params:
        if not isinstance(param, click.Option) or param.name in ("help",):
            continue
        kind = "flag" if param.is_flag else "multi" if param.multiple else "value"
        for opt in param.opts:
            out[opt.lstrip("-")] = (str(param.name), kind)
    return out


def test_fast_options_are_exactly_clicks() -> None:
    clicks = _click_daemon_options()
    fast = {**launch.SHORT, **launch.LONG}
    for opt, spec in fast.items():
        assert clicks.get(opt) == spec, f"launch option {opt} disagrees with cli.main: {clicks.get(opt)} vs {spec}"
    # Every click option is either handled by the fast path or deliberately left to click.
    left_to_click = {"P", "print-libdir", "q", "query", "json", "S", "support", "V", "version", "restore"}
    assert set(clicks) - set(fast) == left_to_click


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {}),
        (["-s"], {"to_stderr": True}),
        (["-sR", "-a", "tcp_buffer"], {"to_stderr": True, "rollback": True, "allow": ("tcp_buffer",)}),
        (["-dsa", "sysctl", "-asysctl"], {"debug": True, "to_stderr": True, "allow": ("sysctl", "sysctl")}),
        (["--allow=a", "--allow", "b", "-L"], {"allow": ("a", "b"), "legacy": True}),
        (["-r", "2", "--state-dir", "/nonexistent/x"], {"learning_rate": 2, "state_dir": Path("/nonexistent/x")}),
        (["-r0"], {"learning_rate": 0}),
        (["-l", "/opt/t", "--libdir=mod"], {"libdirs": ("/opt/t", "mod")}),
        (["-D", "--debug", "--daemon"], {"daemonize": True, "debug": True}),
        (
            ["--advise", "-p", "5959", "--config", "/nonexistent/c.toml"],
            {"advise": True, "port": 5959, "config_path": Path("/nonexistent/c.toml")},
        ),
        (["-sp1"], {"to_stderr": True, "port": 1}),
        (["--port=65535", "--config=/etc/hostname"], {"port": 65535, "config_path": Path("/etc/hostname")}),
    ],
)
def test_plain_daemon_lines_parse_without_click(argv: list[str], expected: dict[str, object]) -> None:
    assert launch.parse_daemon_args(argv) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["-h"],
        ["--help"],
        ["-S"],
        ["-sV"],
        ["-q", "summary"],
        ["-q", "summary", "-p", "1"],
        ["-p", "0"],
        ["-p", "65536"],
        ["-p", "x"],
        ["-p", "+1"],
        ["-p", "\u0661"],  # an Arabic-Indic digit: int() takes it, so may click; not ours to judge
        ["-p"],
        ["-sp1", "--port=65535"],  # given twice: click takes the last one; we do not guess
        ["--json"],
        ["--advise=yes"],
        ["--config", "/"],
        ["--config", ""],
        ["-r", "9"],
        ["-r", "x"],
        ["-r", "1", "-r", "2"],
        ["-a"],
        ["--allow"],
        ["--frobnicate"],
        ["--stderr=yes"],
        ["--"],
        ["-"],
        ["positional"],
        ["--state-dir", "/etc/hostname"],
        ["--state-dir", ""],
        ["--learn", "1"],  # click does not expand prefixes: neither may we
    ],
)
def test_everything_else_goes_to_click(argv: list[str]) -> None:
    assert launch.parse_daemon_args(argv) is None


def test_click_and_fast_path_build_the_same_config(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, object]] = []

    def fake_start(kwargs: dict[str, object]) -> None:
        seen.append(kwargs)
        raise SystemExit(0)

    import pybpftune.cli as cli_mod

    monkeypatch.setattr(cli_mod, "start_daemon", fake_start)
    argv = ["-sR", "-a", "tcp_buffer", "-r", "3", "--state-dir", "/tmp/x", "-c", "/sys/fs/cgroup"]
    argv += ["--advise", "-p", "5959", "--config", "/nonexistent/c.toml"]
    with pytest.raises(SystemExit):
        main(args=argv, standalone_mode=False)
    fast = launch.parse_daemon_args(argv)
    assert fast is not None
    for key, value in fast.items():
        assert seen[0][key] == value, key
    # Both go through launch.daemon_config, which takes exactly these names.
    assert set(seen[0]) == set(inspect.signature(launch.daemon_config).parameters)


def test_daemon_config_puts_the_flags_over_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('learning_rate = 1\nport = 6000\nlog = "stderr"\n[tuners.tcp_conn]\nenabled = false\n')
    config = launch.daemon_config(learning_rate=3, advise=True, config_path=cfg, state_dir=tmp_path / "s")
    assert (config.learning_rate, config.port, config.advice, config.to_stderr) == (3, 6000, True, True)
    assert config.switched_off == {"tcp_conn"} and config.config_path == cfg and config.config_explicit
    assert config.socket_path == tmp_path / "s" / "bpftune.sock"
    again = launch.daemon_config(port=7000, config_path=cfg).with_file(Config())  # a reload to an empty file
    assert (again.port, again.learning_rate, again.to_stderr, again.switched_off) == (7000, 4, False, frozenset())


def test_entry_does_not_import_click_for_a_daemon_line(tmp_path: Path) -> None:
    """A daemon command line never imports click (it fails here for want of
    root, after the fast path, with the usual one line)."""
    code = (
        "import os, sys; os.geteuid = lambda: 1000\n"
        "from pybpftune import console\n"
        "try:\n"
        f"    console.entry(['-s', '--state-dir', {str(tmp_path)!r}])\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'click' in sys.modules, 'importlib.metadata' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "exit 1 False False", out.stdout + out.stderr
    assert "needs root" in out.stderr and "Traceback" not in out.stderr


def test_a_bad_configuration_file_stops_the_fast_path_before_anything_starts(tmp_path: Path) -> None:
    """Exit 2 and one line through console.entry as through click, before the
    support probe or the daemon's imports (and nothing written)."""
    bad = tmp_path / "c.toml"
    bad.write_text("[tuners.no_such]\nenabled = false\n")
    state = tmp_path / "state"
    code = (
        "import os, sys; os.geteuid = lambda: 0\n"
        "from pybpftune import console\n"
        "try:\n"
        f"    console.entry(['-s', '--config', {str(bad)!r}, '--state-dir', {str(state)!r}])\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, *(m in sys.modules for m in ('click', 'pybpftune.startup', 'pybpftune.daemon')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "exit 2 False False False", out.stdout + out.stderr
    assert out.stderr.startswith(f"bpftune: {bad}: tuners.no_such: unknown tuner; known tuners: ")
    assert out.stderr.count("\n") == 1 and not state.exists()


def test_entry_point_group_check(tmp_path: Path) -> None:
    (tmp_path / "other-1.0.dist-info").mkdir()
    (tmp_path / "other-1.0.dist-info" / "entry_points.txt").write_text("[console_scripts]\nx = y:z\n")
    (tmp_path / "junk.dist-info").mkdir()  # no entry_points.txt
    assert not registry._group_declared([str(tmp_path), str(tmp_path / "missing")])
    (tmp_path / "plug-1.0.dist-info").mkdir()
    (tmp_path / "plug-1.0.dist-info" / "entry_points.txt").write_text("[pybpftune.tuners]\nmine = plug:T\n")
    assert registry._group_declared([str(tmp_path)])
