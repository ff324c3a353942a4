"""The configuration file: what it may say, every way it can be wrong, and fuzz."""

from __future__ import annotations

import os
import random
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

from pybpftune.cli import main
from pybpftune.config import MAX_CONFIG_BYTES, Config, ConfigError, Limits, parse_config, read_config
from pybpftune.daemon import DaemonConfig, Overrides
from pybpftune.registry import builtin_tuners

KNOWN = builtin_tuners()
GOOD = b"""
advice = true
learning_rate = 2
log = "stderr"
rollback = true
socket = "/run/pybpftune/other.sock"
port = 5959

[tuners.tcp_conn]
enabled = false
[tuners.neigh_table_tuner]   # bpftune's spelling works too
enabled = true

[tunables."net.ipv4.tcp_rmem"]
cap = [4096, 131072, 16777216]
netns = { cap = 4194304 }
global = { floor = [4096, 131072, 6291456] }

[tunables."net.core.netdev_max_backlog"]
floor = 1000
cap = 30000

[tunables."neigh.arp_cache.gc_thresh"]
cap = 8192
"""


def load(text: str | bytes, known: bool = True) -> Config:
    data = text.encode() if isinstance(text, str) else text
    return parse_config(data, Path("/etc/pybpftune/config.toml"), KNOWN if known else None)


def test_a_full_file_is_read() -> None:
    c = load(GOOD)
    assert (c.advice, c.learning_rate, c.log, c.rollback, c.port) == (True, 2, "stderr", True, 5959)
    assert c.socket == Path("/run/pybpftune/other.sock")
    assert not c.enabled("tcp_conn") and c.enabled("neigh_table") and c.enabled("tcp_buffer")
    rmem = c.limits["net.ipv4.tcp_rmem"]
    assert rmem.for_namespace(True) == Limits((4096, 131072, 6291456), (4096, 131072, 16777216))
    assert rmem.for_namespace(False) == Limits(None, 4194304)
    assert c.limits["net.core.netdev_max_backlog"].for_namespace(False) == Limits(1000, 30000)


def test_zero_configuration_is_the_default() -> None:
    assert load("") == Config(path=Path("/etc/pybpftune/config.toml"))
    if not Path("/etc/pybpftune/config.toml").exists():
        assert read_config(None, KNOWN) == Config()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("frobnicate = 1", "frobnicate: unknown key; expected one of: advice, learning_rate"),
        ("advice = 1", "advice: expected true or false, got int 1"),
        ("learning_rate = 5", "learning_rate: 5 is out of range 0..4"),
        ("learning_rate = true", "learning_rate: expected an integer, got true"),
        ("learning_rate = 2.5", "learning_rate: expected an integer, got float 2.5"),
        ("port = 0", "port: 0 is out of range 1..65535"),
        ('log = "journal"', "log: expected one of 'syslog', 'journald', 'stderr', got the string 'journal'"),
        ('socket = "relative.sock"', "socket: relative.sock is not an absolute path"),
        ('socket = "/' + "x" * 200 + '"', "socket: a Unix socket path holds at most 107 bytes"),
        ("[tuners.nosuch]\nenabled = false", "tuners.nosuch: unknown tuner; known tuners: sysctl, netns"),
        ("[tuners.tcp_conn]\nenable = false", "tuners.tcp_conn.enable: unknown key; expected one of: enabled"),
        ('[tuners.tcp_conn]\nenabled = "no"', "tuners.tcp_conn.enabled: expected true or false, got the string 'no'"),
        ("tuners = 3", "tuners: expected a table, got int 3"),
        ('[tunables."net.nope"]\ncap = 1', 'tunables."net.nope": unknown tunable (`bpftune -q tunables` lists them)'),
        (
            '[tunables."net.ipv4.tcp_congestion_control"]\ncap = 1',
            'tunables."net.ipv4.tcp_congestion_control": holds text: floors and caps apply to numeric tunables only',
        ),
        ('[tunables."net.ipv4.tcp_rmem"]\nceiling = 1', 'tunables."net.ipv4.tcp_rmem".ceiling: unknown key'),
        ('[tunables."net.ipv4.tcp_rmem"]\ncap = -1', 'tunables."net.ipv4.tcp_rmem".cap: -1 is out of range 0..'),
        ('[tunables."net.ipv4.tcp_rmem"]\ncap = [1, 2]', "expected one integer or a list of 3 integers, got a list"),
        ('[tunables."net.ipv4.tcp_rmem"]\ncap = [1, "2", 3]', 'tunables."net.ipv4.tcp_rmem".cap[1]: expected an'),
        (
            '[tunables."net.ipv4.tcp_rmem"]\nfloor = 8192\ncap = 4096',
            'tunables."net.ipv4.tcp_rmem": cap 4096 is below floor 8192',
        ),
        (
            '[tunables."net.ipv4.tcp_rmem"]\nfloor = 8192\nnetns = { cap = [4096, 4096, 4096] }',
            'tunables."net.ipv4.tcp_rmem".netns: cap[0] 4096 is below floor[0] 8192',
        ),
        (
            '[tunables."net.ipv4.tcp_mem"]\nnetns = { cap = 1 }',
            'tunables."net.ipv4.tcp_mem".netns: this tunable is not per-namespace',
        ),
        ('[tunables."net.ipv4.tcp_rmem"]\nnetns = { top = 1 }', 'tunables."net.ipv4.tcp_rmem".netns.top: unknown key'),
        (
            '[tunables."net.core.netdev_budget_usecs"]\ncap = 100000000',
            "100000000 is out of range 0..",
        ),
        ('[tunables."net.core.netdev_max_backlog"]\ncap = 0', "cap 0 is below net.core.netdev_max_backlog's hard min"),
        ("advice = \nx = 1", "not valid TOML: Invalid value (at line 1, column 10)"),
        ("a = [" * 5000, "not valid TOML"),
    ],
)
def test_each_mistake_is_one_line_naming_file_key_and_reason(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(text)
    msg = str(info.value)
    assert msg.startswith("/etc/pybpftune/config.toml: ")
    assert message in msg, msg
    assert "\n" not in msg


def test_hostile_keys_are_shown_safely() -> None:
    with pytest.raises(ConfigError) as info:
        load('"a\\nb\\u0007' + "k" * 500 + '" = 1')
    msg = str(info.value)
    assert "\n" not in msg and "\x07" not in msg and len(msg) < 300 and "a\\x0ab\\x07kkk" in msg


def test_not_utf8_and_too_big(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 9\)"):
        load(b"advice = \xff")
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than 256 KiB"):
        read_config(big, KNOWN)


def test_missing_named_file_and_directories(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.toml: no such file$"):
        read_config(tmp_path / "nope.toml", KNOWN)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_config(tmp_path, KNOWN)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a file owned by someone else")
def test_a_root_daemon_refuses_a_file_others_could_write(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("advice = true\n")
    f.chmod(0o666)
    with pytest.raises(ConfigError, match="must be owned by root and not writable by group or others"):
        read_config(f, KNOWN, trusted=True)
    f.chmod(0o644)
    os.chown(f, 65534, 65534)
    with pytest.raises(ConfigError, match="must be owned by root"):
        read_config(f, KNOWN, trusted=True)
    assert read_config(f, KNOWN, trusted=False).advice is True


def test_the_client_checks_types_but_not_names() -> None:
    c = load("[tuners.mine]\nenabled = false\n[tunables.x]\ncap = [1, 2]", known=False)
    assert not c.enabled("mine")
    with pytest.raises(ConfigError, match="port: expected an integer"):
        load('port = "80"', known=False)


def test_flags_override_the_file() -> None:
    file = load(GOOD)
    plain = DaemonConfig().with_file(file)
    assert (plain.learning_rate, plain.advice, plain.to_stderr, plain.port) == (2, True, True, 5959)
    assert plain.switched_off == {"tcp_conn"} and plain.socket_path == Path("/run/pybpftune/other.sock")
    flags = DaemonConfig(flags=Overrides(learning_rate=4, port=6000)).with_file(file)
    assert (flags.learning_rate, flags.port) == (4, 6000)
    none = DaemonConfig(state_dir=Path("/run/x")).with_file(Config())
    assert (none.learning_rate, none.advice, none.to_stderr, none.port, none.rollback) == (4, False, False, None, False)
    assert none.socket_path == Path("/run/x/bpftune.sock")


def test_cli_refuses_a_bad_file_before_starting_anything(tmp_path: Path) -> None:
    """Exit 2, one line, and nothing written: the state directory is not even created."""
    bad = tmp_path / "c.toml"
    bad.write_text('[tunables."net.ipv4.tcp_rmem"]\nfloor = 9\ncap = 8\n')
    state = tmp_path / "state"
    result = CliRunner().invoke(main, ["-s", "--config", str(bad), "--state-dir", str(state)])
    assert result.exit_code == 2
    assert result.stderr == f'bpftune: {bad}: tunables."net.ipv4.tcp_rmem": cap 8 is below floor 9\n'
    assert not state.exists()


# --- fuzz -----------------------------------------------------------------------------


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(3)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            del b[pos : pos + rng.randint(1, 20)]
        elif op == 1:
            b[pos:pos] = rng.choice([b"[", b"]", b"=", b'"', b"\n", b"{", b"}", b",", b"-1", b"9" * 30, b"\xff"])
        elif b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
    return bytes(b)


def test_fuzz_never_escapes_as_anything_but_one_line() -> None:
    rng = random.Random(1234)
    for i in range(3000):
        data = rng.randbytes(rng.randint(0, 300)) if i % 3 == 0 else _mutate(rng, GOOD)
        try:
            load(data)
        except ConfigError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 600


def test_huge_inputs_cost_bounded_memory() -> None:
    rng = random.Random(99)
    inputs = [
        b"a = [" * 100_000,
        b"x = " + b"9" * 200_000,
        b"".join(b'k%d = "%s"\n' % (i, b"v" * 50) for i in range(3000)),
        rng.randbytes(MAX_CONFIG_BYTES),
    ]
    tracemalloc.start()
    try:
        for data in inputs:
            try:
                load(data)
            except ConfigError as exc:
                assert "\n" not in str(exc)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20
