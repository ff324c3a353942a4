"""Plugin files: bpftune's trust rules, source-only loading, one line per failure.

Every check runs on real files; the trust root and owner are the test's own
(``Trust(uid=<our uid>, top=tmp_path)``), so nothing here needs root, while
the daemon itself checks for root up to '/'.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import struct
import sys
from collections.abc import Iterator
from importlib._bootstrap_external import _code_to_timestamp_pyc  # type: ignore[attr-defined]
from pathlib import Path

import pytest

from pybpftune.errors import UsageError
from pybpftune.registry import (
    PLUGIN_MODULE_PREFIX,
    PluginError,
    PluginRefused,
    Trust,
    directory_plugins,
    extra_tuners,
    load_plugin,
    select,
    unload_plugin,
)

PLUGIN = """\
from pathlib import Path

from pybpftune.tuner import Scenario, Tuner


class {cls}(Tuner):
    name = "{name}"
    description = "{description}"
    scenarios = (Scenario(0, "seen"),)
{body}

TUNER = {cls}
"""


def plugin_source(name: str, description: str = "from source", body: str = "", cls: str = "T") -> str:
    return PLUGIN.format(name=name, description=description, body=body or "    pass", cls=cls)


class Lines(logging.Handler):
    """Every record of the pybpftune logger tree, formatted, with its exc_info."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def text(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("pybpftune")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture
def trust(tmp_path: Path) -> Trust:
    return Trust(uid=os.geteuid(), top=tmp_path)


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    d = tmp_path / "plugins"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    return d


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# --- trust -------------------------------------------------------------------------


def test_a_trusted_plugin_loads(plugins: Path, trust: Trust) -> None:
    plugin = load_plugin(write(plugins / "good_tuner.py", plugin_source("good")), trust)
    try:
        assert plugin.cls.name == "good" and plugin.path == plugins / "good_tuner.py"
        assert plugin.cls.__module__.startswith(PLUGIN_MODULE_PREFIX)
        assert sys.modules[plugin.cls.__module__].__file__ == str(plugins / "good_tuner.py")
    finally:
        unload_plugin(plugin)
    assert plugin.cls.__module__ not in sys.modules


def test_a_sticky_world_writable_ancestor_is_refused(tmp_path: Path, trust: Trust) -> None:
    """/tmp's case: root's own directory below a sticky 1777 one is still refused,
    since anyone could have created it there first."""
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    d = sticky / "plugins"
    d.mkdir(mode=0o755)
    path = write(d / "x_tuner.py", plugin_source("x"))
    with pytest.raises(PluginRefused, match=rf"refusing untrusted plugin '{path}': {sticky} is group- or other-"):
        load_plugin(path, trust)


def test_the_real_tmp_is_refused_with_the_daemons_default_trust(tmp_path: Path) -> None:
    """With the daemon's own rule (root, up to /) nothing under pytest's /tmp passes."""
    d = tmp_path / "plugins"
    d.mkdir(mode=0o755)
    path = write(d / "x_tuner.py", plugin_source("x"))
    with pytest.raises(PluginRefused, match="refusing untrusted plugin"):
        load_plugin(path)
    with pytest.raises(UsageError, match="refusing untrusted plugin"):
        extra_tuners([str(d)])


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_a_group_or_other_writable_file_is_refused(plugins: Path, trust: Trust, mode: int) -> None:
    path = write(plugins / "w_tuner.py", plugin_source("w"), mode)
    with pytest.raises(PluginRefused, match=f"is group- or other-writable \\(mode 0{mode:o}\\)"):
        load_plugin(path, trust)


@pytest.mark.parametrize("mode", [0o775, 0o757])
def test_a_writable_directory_is_refused(plugins: Path, trust: Trust, mode: int) -> None:
    path = write(plugins / "w_tuner.py", plugin_source("w"))
    plugins.chmod(mode)
    with pytest.raises(PluginRefused, match=f"{plugins} is group- or other-writable"):
        load_plugin(path, trust)


def test_another_owner_is_refused(plugins: Path, tmp_path: Path) -> None:
    path = write(plugins / "o_tuner.py", plugin_source("o"))
    other = Trust(uid=os.geteuid() + 1, top=tmp_path)
    with pytest.raises(PluginRefused, match=f"is owned by uid {os.geteuid()}, not {os.geteuid() + 1}"):
        load_plugin(path, other)


def test_symlinks_are_refused(plugins: Path, tmp_path: Path, trust: Trust) -> None:
    real = write(tmp_path / "real_tuner.py", plugin_source("real"))
    link = plugins / "link_tuner.py"
    link.symlink_to(real)
    with pytest.raises(PluginRefused, match=f"{link} is a symbolic link"):
        load_plugin(link, trust)
    # A symlinked directory on the way is refused too.
    linked_dir = tmp_path / "linked"
    linked_dir.symlink_to(plugins)
    write(plugins / "in_tuner.py", plugin_source("in"))
    with pytest.raises(PluginRefused, match=f"{linked_dir} is a symbolic link"):
        load_plugin(linked_dir / "in_tuner.py", trust)


def test_a_directory_named_like_a_plugin_is_refused(plugins: Path, trust: Trust) -> None:
    (plugins / "dir_tuner.py").mkdir(mode=0o755)
    with pytest.raises(PluginRefused, match="is not a regular file"):
        load_plugin(plugins / "dir_tuner.py", trust)


def _acl_with_a_user_entry() -> bytes:
    """A POSIX ACL (xattr format, version 2) naming uid 4242.  Read-only: a
    write grant would show in the mode's group bits (the ACL mask) and be
    refused for that already."""
    nobody = 0xFFFFFFFF
    entries = [(0x01, 6, nobody), (0x02, 4, 4242), (0x04, 4, nobody), (0x10, 4, nobody), (0x20, 4, nobody)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_a_posix_acl_is_refused(plugins: Path, trust: Trust) -> None:
    path = write(plugins / "acl_tuner.py", plugin_source("acl"))
    try:
        os.setxattr(path, "system.posix_acl_access", _acl_with_a_user_entry())
    except OSError as exc:
        pytest.skip(f"this filesystem takes no POSIX ACL: {exc.strerror}")
    with pytest.raises(PluginRefused, match="has a POSIX ACL"):
        load_plugin(path, trust)


def test_untrusted_bpf_objects_refuse_the_plugin(plugins: Path, trust: Trust) -> None:
    """A directory plugin's BPF objects must be as trusted as its source."""
    body = '    bpf_name = "obj_tuner"\n    bpf_dir = Path(__file__).parent'
    path = write(plugins / "obj_tuner.py", plugin_source("obj", body=body))
    obj = write(plugins / "obj_tuner.bpf.o", "not really ELF", 0o666)
    with pytest.raises(PluginRefused, match=f"{obj} is group- or other-writable"):
        load_plugin(path, trust)
    obj.chmod(0o644)
    unload_plugin(load_plugin(path, trust))


# --- source only ------------------------------------------------------------------------


def test_bytecode_is_never_read_nor_written(plugins: Path, trust: Trust) -> None:
    """A matching .pyc in __pycache__ (which the ordinary import would run) is
    ignored, and loading writes no cache."""
    path = write(plugins / "bc_tuner.py", plugin_source("bc", description="from source"))
    st = path.stat()
    evil = compile(plugin_source("bc", description="from bytecode"), str(path), "exec")
    cache = Path(importlib.util.cache_from_source(str(path)))
    cache.parent.mkdir()
    cache.write_bytes(_code_to_timestamp_pyc(evil, int(st.st_mtime), st.st_size))
    # The control: Python's own loader takes the planted bytecode.
    spec = importlib.util.spec_from_file_location("bc_control", path)
    assert spec is not None and spec.loader is not None
    control = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(control)
    assert control.TUNER.description == "from bytecode"

    plugin = load_plugin(path, trust)
    try:
        assert plugin.cls.description == "from source"
    finally:
        unload_plugin(plugin)
    cache.unlink()
    plugin = load_plugin(path, trust)
    unload_plugin(plugin)
    assert not cache.exists() and list(cache.parent.iterdir()) == []


# --- failures are one line --------------------------------------------------------------


def test_a_syntax_error_is_one_line_and_skipped(plugins: Path, trust: Trust, lines: Lines) -> None:
    write(plugins / "a_tuner.py", plugin_source("a"))
    write(plugins / "b_tuner.py", "def broken(:\n")
    write(plugins / "c_tuner.py", plugin_source("c"))
    found = directory_plugins(plugins, trust)
    try:
        assert [p.cls.name for p in found] == ["a", "c"]
    finally:
        for p in found:
            unload_plugin(p)
    [line] = [r for r in lines.records if "b_tuner.py" in r.getMessage()]
    assert line.levelno == logging.WARNING and line.exc_info is None
    assert f"cannot load plugin '{plugins / 'b_tuner.py'}': SyntaxError: " in line.getMessage()
    assert "line 1" in line.getMessage() and line.getMessage().endswith("skipping it")
    assert not any(m.startswith(PLUGIN_MODULE_PREFIX + "b_tuner") for m in sys.modules)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("x = 1\nraise RuntimeError('no network here')\n", "RuntimeError: no network here (line 2)"),
        ("import no_such_module_pbt\n", "ModuleNotFoundError: No module named 'no_such_module_pbt' (line 1)"),
        ("1 / 0\n", "ZeroDivisionError: division by zero (line 1)"),
        ("raise SystemExit(3)\n", "SystemExit: 3 (line 1)"),
        ("TUNER = 42\n", "defines no TUNER class derived from pybpftune.tuner.Tuner"),
    ],
)
def test_raising_at_import_is_one_line(plugins: Path, trust: Trust, code: str, expected: str) -> None:
    path = write(plugins / "r_tuner.py", code)
    with pytest.raises(PluginError) as info:
        load_plugin(path, trust)
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert not any(m.startswith(PLUGIN_MODULE_PREFIX + "r_tuner") for m in sys.modules)


def test_module_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lines: Lines) -> None:
    """-l MODULE: a name that does not exist is an operator mistake (exit 2);
    a module that exists but raises, or has no TUNER, is one line and skipped."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "pbt_raises_mod.py").write_text("import no_such_dependency_pbt\n")
    (tmp_path / "pbt_empty_mod.py").write_text("X = 1\n")
    (tmp_path / "pbt_syntax_mod.py").write_text("def (\n")
    with pytest.raises(UsageError, match="cannot import tuner module pbt_no_such_mod"):
        extra_tuners(["pbt_no_such_mod"])
    assert extra_tuners(["pbt_raises_mod", "pbt_empty_mod", "pbt_syntax_mod"]) == []
    msgs = lines.text
    assert any("pbt_raises_mod: ModuleNotFoundError: No module named 'no_such_dependency_pbt'" in m for m in msgs)
    assert any("pbt_empty_mod defines no TUNER class" in m for m in msgs)
    assert any("pbt_syntax_mod: SyntaxError" in m for m in msgs)
    assert all(r.exc_info is None for r in lines.records)


def test_a_plugin_cannot_shadow_a_builtin(plugins: Path, trust: Trust, lines: Lines) -> None:
    write(plugins / "tcp_buffer_tuner.py", plugin_source("tcp_buffer"))
    chosen = select(["tcp_buffer"], [str(plugins)], trust)
    assert [p.path for p in chosen] == [None]
    assert any("tuner tcp_buffer from" in m and "ignored" in m for m in lines.text)
    assert not any(m.startswith(PLUGIN_MODULE_PREFIX + "tcp_buffer") for m in sys.modules)


# --- bytecode planted by someone else, and declarations that are not a tuner's -----------------


def planted_bytecode(path: Path, text: str, how: str) -> Path:
    """A .pyc for ``path`` in its __pycache__, compiled from ``text``: one that
    the ordinary import would take (timestamp-checked), or one it takes
    whatever the source says (unchecked hash)."""
    from importlib._bootstrap_external import _code_to_hash_pyc  # type: ignore[attr-defined]

    code = compile(text, str(path), "exec")
    cache = Path(importlib.util.cache_from_source(str(path)))
    cache.parent.mkdir(exist_ok=True)
    if how == "timestamp":
        st = path.stat()
        cache.write_bytes(_code_to_timestamp_pyc(code, int(st.st_mtime), st.st_size))
    else:
        cache.write_bytes(_code_to_hash_pyc(code, importlib.util.source_hash(b"other"), checked=False))
    return cache


@pytest.mark.parametrize("how", ["timestamp", "unchecked-hash"])
@pytest.mark.parametrize("owner", ["ours", "another user"])
def test_planted_bytecode_never_runs_whoever_owns_it(
    plugins: Path, trust: Trust, lines: Lines, how: str, owner: str
) -> None:
    path = write(plugins / "pc_tuner.py", plugin_source("pc", description="from source"))
    marker = plugins.parent / "bytecode-ran"
    evil = plugin_source("pc", description="from bytecode") + f"\nopen({str(marker)!r}, 'w').close()\n"
    cache = planted_bytecode(path, evil, how)
    if owner == "another user":
        if os.geteuid() != 0:
            pytest.skip("chown needs root")
        os.chown(cache.parent, 65534, 65534)
        os.chown(cache, 65534, 65534)
        cache.chmod(0o666)
    # The directory path (select, hot plug and the configuration check all load through it).
    found = directory_plugins(plugins, trust)
    try:
        assert [p.cls.description for p in found] == ["from source"]
    finally:
        for p in found:
            unload_plugin(p)
    assert not marker.exists(), "the planted bytecode ran"
    assert sorted(cache.parent.iterdir()) == [cache], "nothing written next to the plugin"


def test_a_helper_a_plugin_imports_gets_no_bytecode_written(
    plugins: Path, trust: Trust, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plugin that imports a helper of its own from a directory it adds to
    sys.path: no cache is written there while the daemon loads it (whatever
    PYTHONDONTWRITEBYTECODE says)."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    helpers = tmp_path / "helpers"
    helpers.mkdir()
    (helpers / "pbt_plugin_helper.py").write_text("VALUE = 'helped'\n")
    body = (
        f"    import sys as _sys\n    _sys.path.insert(0, {str(helpers)!r})\n"
        "    import pbt_plugin_helper\n    description = pbt_plugin_helper.VALUE\n"
        f"    _sys.path.remove({str(helpers)!r})\n"
    )
    path = write(plugins / "h_tuner.py", plugin_source("h", body=body))
    try:
        plugin = load_plugin(path, trust)
        assert plugin.cls.description == "helped"
        unload_plugin(plugin)
    finally:
        sys.modules.pop("pbt_plugin_helper", None)
    assert not (helpers / "__pycache__").exists()
    assert sys.dont_write_bytecode is False, "restored afterwards"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('    name = ["a", "list"]', "its name must be a non-empty string"),
        ('    name = ""', "its name must be a non-empty string"),
        ("    tunables = 5", "tunables must be a tuple of Tunable"),
        ("    scenarios = [1]", "scenarios must be a tuple of Scenario"),
        ("    bpf_name = 7", "bpf_name must be a string or None"),
    ],
)
def test_a_class_that_is_no_tuner_declaration_is_one_line(
    plugins: Path, trust: Trust, lines: Lines, body: str, expected: str
) -> None:
    write(plugins / "d_tuner.py", plugin_source("d", body=body))
    write(plugins / "ok_tuner.py", plugin_source("ok"))
    chosen = select([], [str(plugins)], trust)
    try:
        assert "ok" in [p.cls.name for p in chosen] and all(p.path != plugins / "d_tuner.py" for p in chosen)
    finally:
        for p in chosen:
            unload_plugin(p)
    [line] = [m for m in lines.text if "d_tuner.py" in m]
    assert expected in line and line.endswith("skipping it")
    assert all(r.exc_info is None for r in lines.records)


def test_the_configuration_check_does_not_say_a_broken_plugin_twice(
    plugins: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lines: Lines
) -> None:
    """The command line's configuration check imports the -l plugins to learn
    their names; the daemon loads them again and says what fails, once."""
    from pybpftune import registry
    from pybpftune.launch import daemon_config

    write(plugins / "b_tuner.py", "def broken(:\n")
    write(plugins / "r_tuner.py", "raise RuntimeError('boom')\n")
    cfg = tmp_path / "config.toml"
    cfg.write_text("learning_rate = 2\n")
    monkeypatch.setattr(registry, "Trust", lambda: Trust(uid=os.geteuid(), top=tmp_path))
    config = daemon_config(libdirs=[str(plugins)], config_path=cfg)
    assert config.learning_rate == 2
    assert [r for r in lines.records if r.levelno >= logging.WARNING] == []
