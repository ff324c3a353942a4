"""The daemon as a service: :func:`run_daemon` wraps a
:class:`~pybpftune.daemon.Daemon` in what a service needs around it.

Capabilities are reduced once start-up is done, the metrics endpoint
(``--metrics``) starts, and systemd hears READY=1 (and watchdog pings from
the event loop) through :mod:`pybpftune.service`.  It lives apart from
daemon.py so that the daemon does not know the metrics that read it (no
import cycle); :mod:`pybpftune.metrics`, and prometheus-client with it, is
still imported only when ``--metrics`` is given.
"""

from __future__ import annotations

import logging

from .config import DaemonConfig
from .daemon import Daemon
from .errors import PybpftuneError
from .log import setup_logging, sink_name
from .service import Detached, Notifier, detach, parse_metrics_address
from .startup import EarlyProbe

__all__ = ["run_daemon"]

# The daemon's own logger: these lines read as they did from daemon.py.
log = logging.getLogger("pybpftune")


def run_daemon(config: DaemonConfig, early: EarlyProbe | None = None) -> int:
    """Entry point used by launch.start_daemon: returns the process exit code.

    Order: detach (-D) before logging is set up, so syslog names the daemon's
    own pid; start; reduce capabilities; serve metrics; tell systemd READY=1
    and ping its watchdog from the event loop; STOPPING=1 before the summary."""
    metrics_at = None
    if config.metrics is not None:
        from .metrics import DEFAULT_PORT

        metrics_at = parse_metrics_address(config.metrics, DEFAULT_PORT)
    if config.daemonize:
        assert early is None, "a thread must not be running across fork()"
    detached = detach(keep_stderr=config.to_stderr) if config.daemonize else None
    setup_logging(config.to_stderr, config.debug)
    try:
        return _serve(config, metrics_at, detached, early)
    except PybpftuneError as exc:
        if detached is not None and detached.pending:
            log.error("%s", exc)
            detached.failed(str(exc))
        raise


def _serve(
    config: DaemonConfig, metrics_at: tuple[str, int] | None, detached: Detached | None, early: EarlyProbe | None
) -> int:
    notifier = Notifier()
    metrics = None
    try:
        with Daemon(config, early=early) as daemon:

            def started() -> None:
                """Once the last tuner is up (the load thread has ended)."""
                nonlocal metrics
                if config.drop_capabilities:
                    _drop_capabilities()
                if metrics_at is not None:
                    from .metrics import MetricsServer

                    metrics = MetricsServer(daemon, *metrics_at, notifier=notifier)
                    metrics.start()
                names = ", ".join(t.name for t in daemon.tuners)
                notifier.ready(f"tuning with {len(daemon.tuners)} tuners: {names}")
                if notifier.watchdog is not None:
                    daemon.loop.call_every(notifier.watchdog, notifier.ping, "systemd watchdog")
                if detached is not None:
                    detached.ready()
                log.debug("logging to %s; systemd notify %s", sink_name(), "on" if notifier.enabled else "off")

            daemon.on_started.append(started)
            daemon.start()
            try:
                daemon.run()
            finally:
                notifier.stopping()
                if metrics is not None:
                    metrics.close()
    finally:
        notifier.close()
    return 0


def _drop_capabilities() -> None:
    from . import caps

    try:
        kept = caps.drop_to(caps.RUNTIME_CAPS)
    except caps.CapsError as exc:
        log.warning("keeping every capability: %s", exc)
        return
    log.info("capabilities after start-up: %s", ", ".join(caps.names(kept)) or "none")
