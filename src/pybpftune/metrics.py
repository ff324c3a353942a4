"""``--metrics ADDR:PORT``: the daemon's state as Prometheus / OpenMetrics text.

The exposition format, the HTTP server (one daemon thread, a thread per
scrape) and the process CPU/memory figures are prometheus-client's.  What is
ours is :class:`DaemonCollector`: at every scrape it reads the daemon's state
through read-only views that copy what they walk, so a scrape never waits for
the event loop and the loop never waits for a scrape.  The module (and
prometheus-client) is imported only when ``--metrics`` is given.

Metrics (all prefixed ``bpftune_``):

========================================  =========================================================
``info{version,variant}``                 1
``tuner_state{tuner,state}``              1 per tuner: state "active" or "disabled"
``tuner_namespaces{tuner,state}``         namespaces a tuner stopped acting in ("manual", "gone")
``tunable_value{tuner,tunable,ns,         a managed numeric sysctl's value: live for the global
netns_cookie,index}``                     namespace, the value last set for any other one
``changes_total{tuner,scenario,           changes made (or proposed, in advice mode)
tunable,ns}``
``events_received_total{tuner}``          ring-buffer events dispatched to a tuner
``events_dropped_total{reason}``          ring_buffer_full (BPF side), malformed, unknown_tuner
``sample_calls_total{tuner,signal}``      calls of a sampled hot hook
``sample_rate{tuner,signal}``             its current sampling rate (1 in N calls does work)
``loop_wakeups_total``                    event-loop wake-ups (idle cost)
``sd_notify_total{message}``              messages sent to systemd (READY, WATCHDOG, ...)
========================================  =========================================================

plus prometheus-client's ``process_*`` (CPU seconds, resident and virtual
memory, open fds, start time) for the daemon itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import __version__
from .errors import PybpftuneError
from .resource import Resource
from .sysctl import PROC_SYS, SysctlMissing, parse_values

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .daemon import Daemon
    from .service import Notifier

log = logging.getLogger("pybpftune.metrics")

DEFAULT_PORT = 9557


def _ns(is_global: bool) -> str:
    return "global" if is_global else "non-global"


class DaemonCollector:
    """Reads a running :class:`~pybpftune.daemon.Daemon` at scrape time."""

    def __init__(self, daemon: Daemon, notifier: Notifier | None = None) -> None:
        self.daemon = daemon
        self.notifier = notifier

    def describe(self) -> list[Metric]:
        # Registering must not run collect() (the daemon may still be starting).
        return []

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        tuners = list(d.tuners)
        by_name = {t.name: t for t in tuners}

        info = GaugeMetricFamily("bpftune_info", "pybpftune version and BPF variant", labels=["version", "variant"])
        info.add_metric([__version__, d.variant], 1)
        yield info

        state = GaugeMetricFamily("bpftune_tuner_state", "Tuner state (1 = in that state)", labels=["tuner", "state"])
        for t in tuners:
            state.add_metric([t.name, "active"], 1)
        for name in list(d.disabled):
            state.add_metric([name, "disabled"], 1)
        yield state

        per_ns: dict[tuple[str, str], int] = {}
        for (tuner_name, _cookie), st in d.store.netns_states().items():
            per_ns[(tuner_name, st)] = per_ns.get((tuner_name, st), 0) + 1
        nss = GaugeMetricFamily(
            "bpftune_tuner_namespaces",
            "Network namespaces a tuner no longer acts in, by why (manual: an administrator set a value)",
            labels=["tuner", "state"],
        )
        for (tuner_name, st), n in sorted(per_ns.items()):
            nss.add_metric([tuner_name, st], n)
        yield nss

        yield self._values()

        changes = CounterMetricFamily(
            "bpftune_changes",
            "Tunable changes made (or proposed in advice mode), by tuner, scenario, tunable and namespace kind",
            labels=["tuner", "scenario", "tunable", "ns"],
        )
        for tuner_name, tunable, scenario_id, is_global, n in d.store.change_counts():
            tuner = by_name.get(tuner_name)
            scenario = str(scenario_id)
            if tuner is not None:
                try:
                    scenario = tuner.scenario(scenario_id).name
                except PybpftuneError:
                    pass
            changes.add_metric([tuner_name, scenario, tunable, _ns(is_global)], n)
        yield changes

        ring = d.ring
        received = CounterMetricFamily(
            "bpftune_events_received", "Ring-buffer events dispatched to a tuner", labels=["tuner"]
        )
        names = {t.id: t.name for t in tuners}
        for tuner_id, n in sorted(dict(ring.received_by_tuner).items()):
            received.add_metric([names.get(tuner_id, str(tuner_id))], n)
        yield received

        calls = CounterMetricFamily("bpftune_sample_calls", "Calls of a sampled BPF hook", labels=["tuner", "signal"])
        rates = GaugeMetricFamily(
            "bpftune_sample_rate",
            "Current sampling rate of a BPF hook (1 in N calls does work)",
            labels=["tuner", "signal"],
        )
        from .tuners.common import samples

        with d.objects_lock:  # no object is closed while we read its globals
            for t in tuners:
                loaded = t.loaded
                if loaded is None or loaded.closed:
                    continue
                for signal, count, rate in samples(t):
                    calls.add_metric([t.name, signal], count)
                    rates.add_metric([t.name, signal], rate)
        # The daemon's EventLoss: drops of tuners stopped since stay counted.
        d.read_drops(tuners)
        lost = d.loss.counts()
        dropped = CounterMetricFamily(
            "bpftune_events_dropped", "Events lost before a tuner saw them, by reason", labels=["reason"]
        )
        dropped.add_metric(["ring_buffer_full"], lost.ring_full)
        dropped.add_metric(["malformed"], lost.malformed)
        dropped.add_metric(["unknown_tuner"], lost.unknown)
        yield dropped
        yield calls
        yield rates

        yield CounterMetricFamily("bpftune_loop_wakeups", "Event-loop wake-ups", value=d.loop.wakeups)
        if self.notifier is not None:
            sent = CounterMetricFamily("bpftune_sd_notify", "Messages sent to the service manager", labels=["message"])
            for message, n in sorted(self.notifier.sent.items()):
                sent.add_metric([message], n)
            yield sent

    def _values(self) -> GaugeMetricFamily:
        d = self.daemon
        values = GaugeMetricFamily(
            "bpftune_tunable_value",
            "Value of a managed numeric sysctl: live in the global namespace, last set elsewhere",
            labels=["tuner", "tunable", "ns", "netns_cookie", "index"],
        )
        glob = d.namespaces.global_cookie
        for tuner_name, tunable in d.store.tunables():
            if tunable.kind != "sysctl":
                continue
            try:
                # This thread never leaves the initial namespace: /proc/sys is the global one.
                current = parse_values((PROC_SYS / tunable.path).read_text())
            except (OSError, PybpftuneError, SysctlMissing):
                continue
            for i, v in enumerate(current):
                values.add_metric([tuner_name, tunable.name, "global", str(glob), str(i)], v)
        for tuner_name, tunable, cookie, written in d.store.namespace_values():
            if cookie == glob or tunable.kind != "sysctl":
                continue
            for i, v in enumerate(written):
                values.add_metric([tuner_name, tunable.name, "non-global", str(cookie), str(i)], v)
        return values


class MetricsServer(Resource):
    """The HTTP endpoint: started after start-up (and after capabilities are
    dropped, so its threads inherit the reduced set), stopped first at exit."""

    def __init__(self, daemon: Daemon, host: str, port: int, notifier: Notifier | None = None) -> None:
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(daemon, notifier))
        ProcessCollector(registry=self.registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as exc:
            raise PybpftuneError(
                f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror or exc}"
                + (" (ports below 1024 need privileges the daemon has dropped)" if self.port < 1024 else "")
            ) from None
        self.port = self._server.server_port
        log.info("serving metrics on http://%s:%d/metrics", self.address, self.port)

    @property
    def address(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
