"""``pybpftune-service``: install the systemd unit shipped in the wheel.

``pybpftune-service install`` writes ``/etc/systemd/system/pybpftune.service``
with ExecStart pointing at the ``bpftune`` of the environment this command
runs from (a venv's bin/, or /usr/local/bin), writes the environment file
(``/etc/default/pybpftune``, options in ``PYBPFTUNE_OPTS``) unless it exists,
and reloads systemd; ``--now`` also enables and starts the service.
``show`` prints the unit it would write; ``uninstall`` stops, disables and
removes it (the environment file stays: it is the operator's).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import resources
from pathlib import Path
from typing import NoReturn

import click

UNIT_NAME = "pybpftune.service"
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_ENV_FILE = Path("/etc/default/pybpftune")


def _fail(message: str) -> NoReturn:
    click.echo(f"pybpftune-service: {message}", err=True)
    sys.exit(1)


def _data(name: str) -> str:
    return (resources.files("pybpftune") / "data" / name).read_text()


def find_bpftune() -> Path:
    """The ``bpftune`` script installed beside this package's interpreter."""
    candidates = [Path(sysconfig.get_path("scripts")) / "bpftune", Path(sys.executable).parent / "bpftune"]
    which = shutil.which("bpftune")
    if which:
        candidates.append(Path(which))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path.absolute()
    raise click.ClickException("cannot find the bpftune command of this installation; pass --bpftune PATH")


HOME_DIRS = ("/home", "/root", "/run/user")
TMP_DIRS = ("/tmp", "/var/tmp")


def _interpreter(script: Path) -> Path | None:
    """The interpreter a console script's #! line names."""
    try:
        with script.open("rb") as f:
            first = f.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    return Path(words[0]) if words else None


def _lives_under(bpftune: Path, dirs: tuple[str, ...]) -> bool:
    """Do this installation's command, package or interpreter live under one of ``dirs``?"""
    import pybpftune

    used = [bpftune, Path(pybpftune.__file__)]
    interpreter = _interpreter(bpftune)
    if interpreter is not None:
        used.append(interpreter)
    for path in used:
        real = str(path.resolve())
        if any(real == d or real.startswith(d + "/") for d in dirs):
            return True
    return False


def protect_home(bpftune: Path) -> str:
    """ProtectHome= for this installation: "yes" hides /home, /root and
    /run/user from the service, which would stop it from running at all if
    its interpreter or package lives there; "read-only" then."""
    return "read-only" if _lives_under(bpftune, HOME_DIRS) else "yes"


def private_tmp(bpftune: Path) -> str:
    """PrivateTmp= for this installation: a private /tmp would hide an
    installation that lives in /tmp or /var/tmp (a checkout there, say)."""
    return "no" if _lives_under(bpftune, TMP_DIRS) else "yes"


def render_unit(bpftune: Path, env_file: Path) -> str:
    for path in (bpftune, env_file):
        if not path.is_absolute() or any(c.isspace() or c in "%$\\\"'" for c in str(path)):
            raise click.ClickException(f"{path}: the unit needs an absolute path without spaces or quotes")
    return (
        _data(UNIT_NAME)
        .replace("@BPFTUNE@", str(bpftune))
        .replace("@ENV_FILE@", str(env_file))
        .replace("@PROTECT_HOME@", protect_home(bpftune))
        .replace("@PRIVATE_TMP@", private_tmp(bpftune))
    )


def _systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def _systemctl(*args: str) -> None:
    proc = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        _fail(f"systemctl {' '.join(args)} failed: {proc.stderr.strip() or proc.returncode}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Install or remove the pybpftune systemd service."""


_bpftune_opt = click.option(
    "--bpftune", type=click.Path(path_type=Path), default=None, help="The bpftune to run (default: this install's)."
)
_env_opt = click.option(
    "--env-file", type=click.Path(path_type=Path), default=DEFAULT_ENV_FILE, show_default=True,
    help="Environment file with PYBPFTUNE_OPTS.",
)  # fmt: skip
_unit_dir_opt = click.option(
    "--unit-dir", type=click.Path(path_type=Path), default=DEFAULT_UNIT_DIR, show_default=True,
    help="Where unit files go.",
)  # fmt: skip


@main.command()
@_bpftune_opt
@_env_opt
def show(bpftune: Path | None, env_file: Path) -> None:
    """Print the unit file install would write."""
    click.echo(render_unit(bpftune or find_bpftune(), env_file), nl=False)


@main.command()
@_bpftune_opt
@_env_opt
@_unit_dir_opt
@click.option("--now", is_flag=True, help="Also enable the service and start it.")
@click.option("--no-reload", is_flag=True, help="Do not run systemctl daemon-reload.")
def install(bpftune: Path | None, env_file: Path, unit_dir: Path, now: bool, no_reload: bool) -> None:
    """Write the unit and the environment file, reload systemd."""
    unit = render_unit(bpftune or find_bpftune(), env_file)
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        target = unit_dir / UNIT_NAME
        tmp = target.with_name(f".{UNIT_NAME}.tmp")
        tmp.write_text(unit)
        tmp.chmod(0o644)
        tmp.replace(target)
        click.echo(f"wrote {target}")
        if not env_file.exists():
            env_file.parent.mkdir(parents=True, exist_ok=True)
            env_file.write_text(_data("pybpftune.env"))
            env_file.chmod(0o644)
            click.echo(f"wrote {env_file} (set PYBPFTUNE_OPTS there)")
        else:
            click.echo(f"kept {env_file}")
    except OSError as exc:
        _fail(f"{exc.filename or exc}: {exc.strerror or exc}")
    if no_reload or not _systemd_running():
        if now:
            _fail("--now needs a running systemd")
        click.echo("systemd is not running here: run `systemctl daemon-reload` where it is")
        return
    _systemctl("daemon-reload")
    if now:
        _systemctl("enable", "--now", UNIT_NAME)
        click.echo(f"enabled and started {UNIT_NAME}")
    else:
        click.echo(f"next: systemctl enable --now {UNIT_NAME}")


@main.command()
@_unit_dir_opt
def uninstall(unit_dir: Path) -> None:
    """Stop and disable the service, remove the unit (the environment file stays)."""
    target = unit_dir / UNIT_NAME
    if _systemd_running() and target.exists():
        subprocess.run(["systemctl", "disable", "--now", UNIT_NAME], capture_output=True)
    try:
        target.unlink()
        click.echo(f"removed {target}")
    except FileNotFoundError:
        click.echo(f"{target} was not installed")
    except OSError as exc:
        _fail(f"{target}: {exc.strerror or exc}")
    if _systemd_running():
        _systemctl("daemon-reload")
