"""The `bpftune` command: bpftune's flags, same letters, with help that teaches.

Operator mistakes end in one line on stderr and a non-zero exit (2 for bad
usage, 1 for anything the system refused); never a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from . import __version__
from .errors import UsageError
from .launch import fail, one_line_errors, start_daemon

EPILOG = """\b
Examples:
  bpftune -s                    run in the foreground, log to stderr
  bpftune -s -d -a tcp_buffer   only the tcp_buffer tuner, with debug logs
  bpftune -S                    say what this kernel supports, then exit
  bpftune -sR                   restore every changed sysctl on exit
  bpftune --restore             after a crash: restore every journaled original, then exit
  bpftune -s --advise           decide as usual but change nothing: log the commands
  bpftune -q summary            ask a running daemon for its summary
  bpftune -q help               list the requests a running daemon answers
  bpftune -q status --json      its status as JSON (the same as -q jstatus)
  bpftune -q advice             advice mode: the commands to apply, one per tunable
  bpftune -s --config FILE      settings from FILE (default /etc/pybpftune/config.toml)
  bpftune -s --metrics 9557     also serve Prometheus metrics on 127.0.0.1:9557

\b
Tuners are named without the "_tuner" suffix (tcp_buffer, sysctl, ...);
"tcp_buffer_tuner.so" is accepted too, as bpftune spells it.  SIGHUP makes
a running daemon re-read its configuration file.  See docs/querying.md.
"""


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EPILOG,
)
@click.option("-a", "--allow", "allow", multiple=True, metavar="TUNER", help="Only load this tuner (repeatable).")
@click.option(
    "-c",
    "--cgroup",
    "cgroup",
    type=click.Path(path_type=Path),
    default=None,
    help="cgroup v2 directory to attach cgroup programs to. Default: an existing cgroup2 mount, "
    "else one mounted privately under /run/pybpftune and removed on exit.",
)
@click.option("-d", "--debug", is_flag=True, help="Debug logging, including libbpf's messages.")
@click.option(
    "-D",
    "--daemon",
    "daemonize",
    is_flag=True,
    help="Detach and run in the background (exit 0 once it runs, 1 if start-up failed); logs go to "
    "journald/syslog and the pid to STATE_DIR/pybpftune.pid.",
)
@click.option(
    "-l",
    "--libdir",
    "libdirs",
    multiple=True,
    metavar="DIR|MODULE",
    help="Extra tuners: a root-owned directory of <name>_tuner.py plugin files (watched: files added "
    "or removed later are loaded or stopped), or an importable module name.",
)
@click.option("-L", "--legacy", is_flag=True, help="Load the legacy variant (raw tracepoints and kprobes only).")
@click.option(
    "-p",
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Daemon: also answer queries on this TCP port of 127.0.0.1 and ::1 (never other addresses). "
    "With -q: ask over that port instead of the Unix socket.",
)
@click.option("-P", "--print-libdir", is_flag=True, help="Print where the built-in tuners live, then exit.")
@click.option(
    "-q",
    "--query",
    metavar="REQUEST",
    default=None,
    help="Send REQUEST (help, tuners, tunables, status, summary, rollback, changes, advice; "
    "jNAME for JSON) to the running daemon and print the reply.",
)
@click.option("--json", "as_json", is_flag=True, help="With -q: ask for the JSON form of the reply.")
@click.option(
    "-r",
    "--learning-rate",
    "learning_rate",
    type=click.IntRange(0, 4),
    default=None,
    help="How big one step is: 0 = 1.6 %, 1 = 3.1 %, 2 = 6.25 %, 3 = 12.5 %, 4 = 25 % (the default).",
)
@click.option("-R", "--rollback", is_flag=True, help="Restore every sysctl the daemon changed when it exits.")
@click.option("-s", "--stderr", "to_stderr", is_flag=True, help="Log to stderr instead of syslog/journald.")
@click.option(
    "-S", "--support", "support", is_flag=True, help="Print what this kernel supports, then exit (0 usable, 1 not)."
)
@click.option("-V", "--version", "version", is_flag=True, help="Print the version, then exit.")
@click.option(
    "--metrics",
    metavar="[ADDR:]PORT",
    default=None,
    help="Serve Prometheus/OpenMetrics text on http://ADDR:PORT/metrics (ADDR defaults to 127.0.0.1). "
    "Off unless given.",
)
@click.option(
    "--advise",
    "advise",
    is_flag=True,
    help="Advice mode: observe and decide as usual but write nothing; log each decision with the "
    "command (sysctl -w, ip ntable change) that would apply it (-q advice lists them).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Configuration file (TOML). Default: /etc/pybpftune/config.toml if it exists. Flags override it.",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("/run/pybpftune"),
    show_default=True,
    help="Where the journal of original values (and a private cgroup2 mount, if needed) live.",
)
@click.option(
    "--restore",
    "restore",
    is_flag=True,
    help="Restore every original value journaled in the state directory (what a killed daemon "
    "changed), then exit: 0 if nothing is left journaled, 1 if something could not be restored. "
    "Refused while a daemon runs on the same state directory.",
)
def main(
    allow: tuple[str, ...],
    cgroup: Path | None,
    debug: bool,
    daemonize: bool,
    libdirs: tuple[str, ...],
    legacy: bool,
    port: int | None,
    print_libdir: bool,
    query: str | None,
    as_json: bool,
    learning_rate: int | None,
    rollback: bool,
    to_stderr: bool,
    support: bool,
    version: bool,
    metrics: str | None,
    advise: bool,
    config_path: Path | None,
    state_dir: Path,
    restore: bool,
) -> None:
    """BPF-driven auto-tuning of Linux networking.

    Watches the kernel with BPF programs and tunes sysctls in response,
    explaining every change in the log, backing off when an administrator sets
    a value by hand, and working per network namespace.  Needs root.
    """
    with one_line_errors():
        if version:
            from . import libbpf

            click.echo(f"bpftune (pybpftune) v{__version__}, libbpf {libbpf.version()}, kernel {os.uname().release}")
            return
        if print_libdir:
            click.echo(str(Path(__file__).resolve().parent / "tuners"))
            return
        if support:
            sys.exit(_support(debug, legacy))
        if query is not None:
            sys.exit(_query(query, as_json, port, config_path, state_dir))
        if as_json:
            raise UsageError("--json goes with -q REQUEST")
        if restore:
            from .restore import restore_journaled

            sys.exit(restore_journaled(state_dir, libdirs, debug))
        # The same path as a plain command line through console.entry (no click).
        start_daemon(
            {
                "allow": allow,
                "cgroup": cgroup,
                "debug": debug,
                "daemonize": daemonize,
                "libdirs": libdirs,
                "legacy": legacy,
                "port": port,
                "learning_rate": learning_rate,
                "rollback": rollback,
                "to_stderr": to_stderr,
                "state_dir": state_dir,
                "metrics": metrics,
                "advise": advise,
                "config_path": config_path,
            }
        )


def _query(request: str, as_json: bool, port: int | None, config_path: Path | None, state_dir: Path) -> int:
    """bpftune -q: the reply on stdout (exit 0), or one line on stderr (exit 1)."""
    from .client import query
    from .config import read_config
    from .query import REQUESTS, UNKNOWN

    file = read_config(config_path)
    socket_path = file.socket if file.socket is not None else state_dir / "bpftune.sock"
    reply = query(request, socket_path=socket_path, port=port, as_json=as_json)
    if not reply.error:
        click.echo(reply.text, nl=not reply.text.endswith("\n"))
        return 0
    first = reply.text.splitlines()[0] if reply.text.strip() else "error"
    if first.startswith('{"error"'):
        import json

        try:
            first = str(json.loads(reply.text)["error"])
        except (ValueError, KeyError, TypeError):
            pass
    if first.startswith(UNKNOWN):
        first = first.split(";")[0] + "; supported requests are: " + ", ".join(REQUESTS) + " (jNAME for JSON)"
    fail(first, 1)


def _support(debug: bool, legacy: bool) -> int:
    from .log import setup_logging
    from .support import probe_support, support_report, variant_line

    setup_logging(to_stderr=True, debug=debug)
    if os.geteuid() != 0:
        fail("-S needs root: BPF programs are loaded to find out what works", 1)
    result = probe_support()
    headline, detail = support_report(result)
    # bpftune's lines first (scripts grep them), then which variant we run and why.
    for line in [*headline, variant_line(result, legacy)]:
        click.echo(f"bpftune: {line}", err=True)
    for line in detail:
        click.echo(line)
    return 0 if result.usable else 1
