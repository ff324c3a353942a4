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
from .errors import PybpftuneError, UsageError
from .launch import fail, start_daemon

EPILOG = """\b
Examples:
  bpftune -s                 run in the foreground, log to stderr
  bpftune -s -d -a tcp_buffer   only the tcp_buffer tuner, with debug logs
  bpftune -S                 say what this kernel supports, then exit
  bpftune -sR                restore every changed sysctl on exit
  bpftune -q summary         ask a running daemon for its summary
  bpftune --metrics 9557     also serve Prometheus metrics on 127.0.0.1:9557

Tuners are named without the "_tuner" suffix (tcp_buffer, sysctl, ...);
"tcp_buffer_tuner.so" is accepted too, as bpftune spells it.
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
@click.option("-p", "--port", type=click.IntRange(1, 65535), default=None, help="Query server port (loopback only).")
@click.option("-P", "--print-libdir", is_flag=True, help="Print where the built-in tuners live, then exit.")
@click.option(
    "-q", "--query", metavar="REQUEST", default=None, help="Send REQUEST to the running daemon and print the reply."
)
@click.option(
    "-r",
    "--learning-rate",
    "learning_rate",
    type=click.IntRange(0, 4),
    default=4,
    show_default=True,
    help="How big one step is: 0 = 1.6 %, 1 = 3.1 %, 2 = 6.25 %, 3 = 12.5 %, 4 = 25 %.",
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
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("/run/pybpftune"),
    show_default=True,
    help="Where the journal of original values (and a private cgroup2 mount, if needed) live.",
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
    learning_rate: int,
    rollback: bool,
    to_stderr: bool,
    support: bool,
    version: bool,
    metrics: str | None,
    state_dir: Path,
) -> None:
    """BPF-driven auto-tuning of Linux networking.

    Watches the kernel with BPF programs and tunes sysctls in response,
    explaining every change in the log, backing off when an administrator sets
    a value by hand, and working per network namespace.  Needs root.
    """
    try:
        if version:
            from . import libbpf

            click.echo(f"bpftune (pybpftune) v{__version__}, libbpf {libbpf.version()}, kernel {os.uname().release}")
            return
        if print_libdir:
            click.echo(str(Path(__file__).resolve().parent / "tuners"))
            return
        if support:
            sys.exit(_support(debug))
        if query is not None:
            fail("queries are not yet supported by this version", 1)
        # The same path as a plain command line through launch.entry (no click).
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
            }
        )
    except UsageError as exc:
        fail(str(exc), 2)
    except PybpftuneError as exc:
        fail(str(exc))
    except PermissionError as exc:
        fail(f"permission denied ({exc.filename or exc}); pybpftune needs root (CAP_SYS_ADMIN, CAP_BPF, CAP_NET_ADMIN)")


def _support(debug: bool) -> int:
    from .log import setup_logging
    from .support import probe_support, support_report

    setup_logging(to_stderr=True, debug=debug)
    if os.geteuid() != 0:
        fail("-S needs root: BPF programs are loaded to find out what works", 1)
    result = probe_support()
    headline, detail = support_report(result)
    for line in headline:
        click.echo(f"bpftune: {line}", err=True)
    for line in detail:
        click.echo(line)
    return 0 if result.usable else 1
