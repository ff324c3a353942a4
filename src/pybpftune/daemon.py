"""The daemon: load the tuners, serve the shared ring buffer, stop cleanly.

Start-up is arranged so that events flow early and the slow parts overlap:

* the query socket is bound first: a second daemon stops there, before it
  loads anything, and whoever waits for readiness can ask at once;
* the support probe (or its per-boot cache) runs on the load thread while the
  tuner modules are imported (launch.start_daemon starts it before this
  module's own imports);
* every tuner object is then loaded and attached on that thread, in order
  (the sysctl tuner first), while the event loop already serves the ring
  buffer: an administrator's write is seen from the first attached tuner on.
  libbpf's work runs in C, where cffi releases the GIL.  Loads run one at a
  time: each parses the kernel's BTF, and peak memory has room for one copy;
* "bpftune started" is logged once the last tuner is up, the load thread
  ends, and the ``on_started`` hooks run (capabilities, metrics, READY=1).

Each tuner is isolated: one that fails to load, or whose handler raises, is
logged once with the reason and disabled while the others keep working.
Plugin directories (-l DIR) are watched: a plugin file added there is loaded
without a restart, a removed one is stopped.  Tuner ids are never reused while
the daemon runs, so a late event of a removed tuner is dropped, never handed
to another one.
SIGINT/SIGTERM end the loop; the summary is printed (one block), sysctls are
restored when rollback was asked for, and every program, link, map and mount
is released in reverse order.  SIGHUP re-reads the configuration file (once
every tuner is up, if it arrives during start-up).  The query server
(server.py) answers from the same loop, reading the daemon through the
:class:`pybpftune.query.View` methods below; the renderers (query.py) are
imported when the first request arrives.

Running it as a service (detach, capabilities, metrics, systemd) is
:mod:`pybpftune.serve`'s: this module knows neither metrics nor systemd.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from . import __version__
from .bpf import object_path
from .cgroup import CgroupRoot
from .config import ConfigError, DaemonConfig, Overrides, TunableLimits, normalize, read_config
from .errors import NotSupported, PybpftuneError
from .eventloop import EventLoop, Timer
from .events import Event, cookie_text
from .history import History
from .inotify import ADDED, GONE, OVERFLOW, REMOVED, DirEvent, DirWatcher
from .libbpf import MAX_TUNERS
from .loader import LoadBatch, LoadRequest, load
from .log import setup_logging
from .loss import EventLoss
from .netns import Namespaces, current_inode
from .objects import LoadedObject
from .registry import (
    PLUGIN_SUFFIX,
    Plugin,
    PluginError,
    PluginRefused,
    Trust,
    file_stamp,
    is_plugin_file,
    load_plugin,
    plugin_directories,
    select,
    unload_plugin,
)
from .resource import Resource
from .ringbuf import SharedMaps
from .startup import EarlyProbe, LoadThread, begin_probe
from .state import StateDir
from .store import ACTIVE, MANUAL, TunableStore
from .support import (
    Support,
    assemble,
    kinds_to_text,
    support_report,
    variant_line,
)
from .sysctl import ProcSysctl, SysctlBackend, SysctlMissing
from .tuner import Steps, Tunable, Tuner, TunerContext, known_tunables

if TYPE_CHECKING:
    from .query import DaemonInfo, RollbackItem, SignalState, SummaryCount, TunableValue, TunerState
    from .server import QueryServer

# Where callers have always found them; they live in config.py so that the
# launcher can build them before this module's imports.
__all__ = ["Daemon", "DaemonConfig", "Overrides"]

log = logging.getLogger("pybpftune")

TICK_S = 1.0
# The earliest a tuner's next tick may be: a tuner asking for "now" again
# must not spin the loop.
TICK_MIN_S = 0.01
# How long after events were drained the objects' ring-buffer drop counters
# are read (a full ring buffer means events to drain; no timer while idle).
LOSS_CHECK_S = 1.0
# What a tuner's own code (a plugin's) may raise and the daemon survives:
# anything but KeyboardInterrupt (SIGINT stops the loop instead, see start()).
TUNER_ERRORS = (Exception, SystemExit)


class Daemon(Resource):
    """Owns every kernel resource of a running pybpftune, in start order."""

    def __init__(
        self, config: DaemonConfig, backend: SysctlBackend | None = None, early: EarlyProbe | None = None
    ) -> None:
        """``early``: the support probe launch.start_daemon started before this
        module's imports (it brings the load thread it runs on)."""
        self.config = config
        self._early = early
        self.state = StateDir(config.state_dir)
        self.namespaces = Namespaces()
        self.store = TunableStore(
            backend or ProcSysctl(self.namespaces), self.namespaces, self.state, config.advice, config.limits
        )
        self.steps = Steps(config.learning_rate)
        self.support: Support | None = None
        self.variant = "legacy" if config.legacy else "full"
        self.variant_reason = ""
        self.server: QueryServer | None = None
        # Every tuner -a allows, in load order (the query's tuner list), and
        # the ones the configuration switches off, ready to start on a reload.
        self.classes: list[type[Tuner]] = []
        self.dormant: dict[str, Plugin] = {}
        self.started_at = time.time()
        # A SIGHUP that arrived while tuners were still loading (applied once
        # the last one is up: a reload must not race the load thread).
        self._reload_pending = False
        self.cgroup = CgroupRoot(self.state, config.cgroup)
        # Lost events, counted here (the ring buffer feeds it) and said (_check_loss).
        self.loss = EventLoss()
        self._loss_timer: Timer | None = None
        self.ring = SharedMaps(on_error=self._handler_failed, loss=self.loss)
        self.loop = EventLoop(on_error=self._loop_failed)
        self.tuners: list[Tuner] = []
        self.disabled: dict[str, str] = {}
        # Held while a tuner's BPF object is closed and while another thread
        # (a metrics scrape) reads BPF globals, so no read meets a freed object.
        self.objects_lock = threading.Lock()
        # Who may have written a plugin file (tests narrow it to their own directories).
        self.trust = Trust()
        self.watcher: DirWatcher | None = None
        # Plugin files loaded from watched directories, with the tuner each
        # started (which may have been disabled since).
        self.plugins: dict[Path, tuple[Plugin, Tuner]] = {}
        self._ctx: TunerContext | None = None
        self._next_id = 0
        self._ring_watched = False
        self._closed = False
        self.cache = StateDir(config.cache_dir) if config.cache_dir is not None else None
        self._loader = early.loader if early is not None else LoadThread()
        self._loading: list[Tuner] = []  # prepared, object being loaded
        self._loading_plugins: dict[int, Plugin] = {}  # tuner id -> plugin of a tuner being loaded
        self._loaded: collections.deque[tuple[Tuner, LoadedObject | None, BaseException | None]]
        self._loaded = collections.deque()  # load results handed over by the load thread
        # The start-up's loads, done by one loading child (loader.LoadBatch).
        self._batch: LoadBatch | None = None
        self._tick_timers: dict[int, Timer] = {}
        self._fatal: PybpftuneError | None = None
        self.t_start = time.monotonic()
        self.startup_s: float | None = None  # from start() to the last tuner up
        self.started = False
        # Run on the loop's thread once the last tuner is up (serve.run_daemon's
        # service steps: capabilities, metrics, READY=1).
        self.on_started: list[Callable[[], None]] = []

    # --- start -----------------------------------------------------------------------

    def start(self) -> None:
        """Bind the query socket, probe, prepare every tuner and hand their
        objects to the load thread; ``run()`` serves events while they load."""
        if os.geteuid() != 0:
            raise PybpftuneError("the daemon needs root (CAP_SYS_ADMIN, CAP_BPF, CAP_NET_ADMIN)")
        self.t_start = time.monotonic()
        # From here on the daemon may write (journal recovery, tuners that
        # start): SIGINT/SIGTERM stop the loop instead of ending the process
        # half-way.  start() then prepares no more tuners, run() returns at
        # once, and close() undoes what was done (-R) or exits as usual.
        self.loop.stop_on((signal.SIGINT, signal.SIGTERM))
        # The state directory's lock first: a second daemon stops here, before
        # it touches the journal or loads anything.
        self.state.lock()
        # Then the query socket, so whoever waits for readiness can ask at once.
        self._serve_queries()
        # SIGHUP's default would end the process: from here on it reloads.
        self.loop.on_signal(signal.SIGHUP, self._reload_on_signal)
        early = self._early if self._early is not None else begin_probe(self.config.cache_dir, self._loader)
        key, kinds, probed = early.key, early.kinds, early.probed
        # Watch before the directories are read, so no plugin added meanwhile is missed.
        directories = [d for d in plugin_directories(self.config.libdirs) if d.is_dir()]
        if directories:
            for d in directories:
                self.trust.check_directory(d)
            self.watcher = DirWatcher(directories)
            self.loop.add_reader(self.watcher.fileno(), self.service_plugins, "plugin directories")
        found: list[type[Tuner]] = []
        plugins = select(self.config.allow, self.config.libdirs, self.trust, found)  # imports overlap the probe
        t_select = time.monotonic()
        support: Support
        if kinds is None:
            result = probed.result()
            assert isinstance(result, Support)
            support = result
            if key and support.usable and self.cache is not None:
                self.cache.write_cache("support", kinds_to_text(key, support.kinds))
        else:
            support = assemble(kinds)
        self.support = support
        log.debug(
            "start-up: %s; waited %.0f ms for it after importing the tuners",
            "support probed" if kinds is None else "support from this boot's cache",
            1000 * (time.monotonic() - t_select),
        )
        headline, detail = support_report(support)
        if not support.usable:
            raise NotSupported("bpftune", "; ".join(support.missing()) or headline[0])
        self.variant_reason = variant_line(support, self.config.legacy)
        for line in [*headline, self.variant_reason]:
            log.info("%s", line)
        for line in detail:
            log.debug("%s", line)
        if not self.config.legacy:
            self.variant = support.default_variant
        log.info(
            "pybpftune %s starting (%s variant, learning rate %d%s%s)",
            __version__,
            self.variant,
            self.steps.rate,
            ", advice mode: nothing will be written" if self.config.advice else "",
            f", configuration {self.config.config_path}" if self.config.config_path else "",
        )
        self.classes = [p.cls for p in plugins]
        self._recover_journal(found)
        plugins = [p for p in plugins if not self._keep_dormant(p)]
        needs_cgroup = any(p.cls.cgroup_programs for p in plugins)
        if needs_cgroup:
            self.cgroup.open()
        self._ctx = self._context(support)
        self._batch = LoadBatch()
        try:
            for plugin in plugins:
                if self.loop.stopping:
                    break
                self._prepare_tuner(plugin)
        finally:
            self._batch.seal()  # its first load may start
        if self.loop.stopping:
            log.info("asked to stop during start-up: %d tuner(s) not started", len(plugins) - len(self.tuners))
            return
        if not self._loading:
            self._all_started()

    def _switched_off(self, name: str) -> bool:
        named = {normalize(a) for a in self.config.allow}
        return name in self.config.switched_off and name not in named

    def _keep_dormant(self, plugin: Plugin) -> bool:
        """A tuner the configuration switches off is not started; its plugin
        stays loaded so that a reload switching it on can start it."""
        if not self._switched_off(plugin.cls.name):
            return False
        log.info("tuner %s not started: the configuration switches it off", plugin.cls.name)
        self.dormant[plugin.cls.name] = plugin
        return True

    def _serve_queries(self) -> None:
        """Answer queries on the Unix socket (and -p's loopback port)."""
        from .server import QueryServer

        server = self.server = QueryServer(self.loop, self._answer)
        path = self.config.socket_path
        server.listen_unix(lambda: self.state.bind_socket(path), str(path))
        if self.config.port is not None:
            server.listen_tcp(self.config.port)
        log.info("serving queries on %s", ", ".join(server.addresses))

    def _answer(self, data: bytes) -> bytes:
        from .query import answer, parse_request

        return answer(self, parse_request(data)).encode()

    def _context(self, support: Support | None) -> TunerContext:
        return TunerContext(
            self.store,
            self.namespaces,
            self.steps,
            support,
            self.variant,
            self.config.debug,
            admin_wrote=lambda write: self.store.back_off([*self.tuners, *self._loading], write),
            rollback=self.config.rollback,
            loop=self.loop,
            request_tick=self._request_tick,
        )

    def _watch_ring(self) -> None:
        if not self.ring.active:
            return
        if not self._ring_watched:
            self._ring_watched = True
            self.loop.add_reader(self.ring.fileno(), self._drain_ring, "ring buffer")
        self._drain_ring()

    def _drain_ring(self) -> None:
        self.ring.consume()
        self._schedule_loss_check(time.monotonic() + LOSS_CHECK_S)

    # --- lost events ------------------------------------------------------------------------

    def _schedule_loss_check(self, when: float) -> None:
        timer = self._loss_timer
        if timer is not None and not timer.cancelled:
            if timer.when <= when:
                return
            timer.cancel()
        self._loss_timer = self.loop.call_at(when, self._check_loss, "lost events")

    def _check_loss(self) -> None:
        """Read the drop counters and say what was lost since the last line;
        come back when the next line is allowed if more is waiting."""
        self._loss_timer = None
        self.read_drops(self.tuners)
        self.loss.report()
        due = self.loss.due()
        if due is not None:
            self._schedule_loss_check(due)

    def read_drops(self, tuners: list[Tuner]) -> None:
        """Count what the tuners' objects dropped for a full ring buffer.
        From any thread: an object is read under ``objects_lock``, so never
        after it was closed (its last count was read just before)."""
        with self.objects_lock:
            for tuner in tuners:
                loaded = tuner.loaded
                if loaded is None or loaded.closed or not loaded.has_global("bpftune_ringbuf_drops"):
                    continue
                self.loss.bpf_count(tuner.id, loaded.get_global("bpftune_ringbuf_drops"))

    def _close_object(self, tuner: Tuner) -> None:
        """Close a tuner's object, its drop counter read one last time."""
        loaded = tuner.loaded
        if loaded is None:
            return
        with self.objects_lock:
            try:
                if not loaded.closed and loaded.has_global("bpftune_ringbuf_drops"):
                    self.loss.bpf_count(tuner.id, loaded.get_global("bpftune_ringbuf_drops"))
            finally:
                self.loss.forget(tuner.id)
                loaded.close()

    def _prepare_tuner(self, plugin: Plugin) -> None:
        """On the loop's thread: construct the tuner and read what its object
        needs (globals); then either start it (no BPF) or queue its load."""
        cls = plugin.cls
        ctx = self._ctx
        assert ctx is not None and ctx.support is not None
        support = ctx.support
        tuner: Tuner | None = None
        try:
            tuner = cls(ctx, self._new_tuner_id())
            self._admit(tuner)
            globals_ = self._globals(tuner) if cls.bpf_name is not None else {}
        except TUNER_ERRORS as exc:  # a tuner's own code (a plugin's) may raise anything
            self._start_failed(plugin, tuner, exc)
            return
        if cls.bpf_name is None:
            self._finish_start(plugin, tuner, None)
            return
        self._loading.append(tuner)
        self._loading_plugins[tuner.id] = plugin
        loading = tuner

        # Only start() prepares tuners, with its batch open (a plugin added
        # later starts through _start_tuner).
        assert self._batch is not None
        take = self._batch.add(lambda: self._load_request(loading, support, globals_))

        def load() -> LoadedObject:
            t0 = time.monotonic()
            loaded = take()
            log.debug("tuner %s: object loaded and attached in %.0f ms", loading.name, 1000 * (time.monotonic() - t0))
            return loaded

        def done(result: object, exc: BaseException | None) -> None:  # on the load thread
            self._loaded.append((loading, result if isinstance(result, LoadedObject) else None, exc))
            self.loop.call_soon_threadsafe(self._take_loaded, "tuner loaded")

        self._loader.submit(load, done)

    def _take_loaded(self) -> None:
        """On the loop's thread: start the tuners whose objects are loaded."""
        while self._loaded:
            tuner, loaded, exc = self._loaded.popleft()
            if tuner in self._loading:
                self._loading.remove(tuner)
            plugin = self._loading_plugins.pop(tuner.id)
            if self._closed or self.loop.stopping:
                if loaded is not None:
                    loaded.close()
                if plugin.path is not None:
                    unload_plugin(plugin)
                continue
            if exc is not None:
                self._start_failed(plugin, tuner, exc)
            else:
                self._finish_start(plugin, tuner, loaded)
            if not self._loading:
                self._all_started()

    def _start_failed(self, plugin: Plugin, tuner: Tuner | None, exc: BaseException, unload: bool = True) -> None:
        """One line for a tuner that could not start; what it wrote is undone.

        Whatever it raised (our errors, a bug, a plugin's sys.exit), it is
        skipped and the daemon goes on.  Its writes are rolled back whether
        -R was given or not: it never ran, so no running tuner owns them, and
        a start that stopped half-way is no tuning anyone asked to keep."""
        cls = plugin.cls
        why = str(exc) if isinstance(exc, PybpftuneError) else f"start failed: {exc!r}"
        self.disabled[cls.name] = why
        log.warning("tuner %s disabled: %s", cls.name, why)
        if tuner is not None:
            self._undo_start(tuner)
        if unload and plugin.path is not None:
            unload_plugin(plugin)

    def _undo_start(self, tuner: Tuner) -> None:
        try:
            self.store.rollback(tuner)  # it may have written before it raised
        except TUNER_ERRORS as exc:
            log.error("tuner %s: cannot undo what it wrote before it failed: %r", tuner.name, exc)
        if tuner.loaded is not None:
            try:
                self._close_object(tuner)
            except TUNER_ERRORS as exc:
                log.error("tuner %s: cannot release its BPF object: %r", tuner.name, exc)

    def _finish_start(self, plugin: Plugin, tuner: Tuner, loaded: LoadedObject | None) -> None:
        """On the loop's thread: start a tuner whose object (if any) is up."""
        tuner.loaded = loaded
        try:
            tuner.start()
        except TUNER_ERRORS as exc:  # a tuner's own code (a plugin's) may raise anything
            self._start_failed(plugin, tuner, exc)
            return
        self._started(tuner)
        if plugin.path is not None:
            self.plugins[plugin.path] = (plugin, tuner)

    def _started(self, tuner: Tuner) -> None:
        """Bookkeeping of a tuner that started: events, ticks, the log line."""
        # An administrator may have taken over while the object loaded (the
        # sysctl tuner was already watching): tell the BPF side now.
        for cookie in self.store.manual_namespaces(tuner):
            tuner.netns_disabled(cookie)
        self.disabled.pop(tuner.name, None)
        self.ring.register(tuner.id, self._dispatcher(tuner))
        self.tuners.append(tuner)
        # Events flow as soon as the first object shares the ring buffer.
        self._watch_ring()
        extra = ""
        if tuner.loaded is not None:
            unavailable = tuner.loaded.unavailable()
            forms = ", ".join(f"{c.signal} via {c.chosen}" for c in tuner.loaded.choices.values() if c.chosen)
            extra = f" ({forms})" if forms else ""
            for choice in unavailable:
                log.info("tuner %s: signal %s", tuner.name, choice.describe())
        log.info("tuner %s started%s", tuner.name, extra)
        if type(tuner).tick is not Tuner.tick:
            self._request_tick(tuner, time.monotonic() + TICK_S)

    def _all_started(self) -> None:
        # The load thread has no more work: let it end before anything drops
        # capabilities (they are per thread; no thread may keep the full set).
        self._loader.close()
        if self._batch is not None:
            self._batch.close()
            self._batch = None
        if not self.tuners:
            self._fatal = PybpftuneError(
                "no tuner could be started: "
                + ("; ".join(f"{k}: {v}" for k, v in self.disabled.items()) or "the configuration switches all off")
            )
            self.loop.stop()
            return
        self.namespaces.scan()
        self.startup_s = time.monotonic() - self.t_start
        self.started = True
        log.info("bpftune started")
        log.debug("start-up took %.2f s", self.startup_s)
        for hook in self.on_started:
            hook()
        if self._reload_pending:
            self._reload_pending = False
            self.reload()

    def _new_tuner_id(self) -> int:
        """The next unused id: ids are never reused while the daemon runs, so
        an event still queued for a removed tuner finds no handler."""
        if self._next_id >= MAX_TUNERS:
            raise PybpftuneError(f"all {MAX_TUNERS} tuner ids were used since the daemon started; restart it")
        self._next_id += 1
        return self._next_id - 1

    def _start_tuner(self, plugin: Plugin) -> Tuner | None:
        """Construct, load and start one tuner on the loop's thread (a plugin
        added while running); None (and one line) if it cannot run."""
        cls = plugin.cls
        ctx = self._ctx
        assert ctx is not None
        tuner: Tuner | None = None
        try:
            tuner = cls(ctx, self._new_tuner_id())
            self._admit(tuner)
            if cls.bpf_name is not None:
                tuner.loaded = self._load(tuner, ctx.support, self._globals(tuner))  # type: ignore[arg-type]
            tuner.start()
        except TUNER_ERRORS as exc:  # a tuner's own code (a plugin's) may raise anything
            self._start_failed(plugin, tuner, exc, unload=False)  # the caller unloads the plugin
            return None
        self._started(tuner)
        return tuner

    def _admit(self, tuner: Tuner) -> None:
        """A new tuner joins the store (once it can run here at all)."""
        if tuner.requires_cookies and not self.namespaces.cookie_supported:
            raise NotSupported(tuner.name, "needs network-namespace cookies (Linux 5.14+)")
        self.store.register(tuner)

    def _globals(self, tuner: Tuner) -> dict[str, int]:
        return {
            "tuner_id": tuner.id,
            "bpftune_pid": os.getpid(),
            "bpftune_learning_rate": self.steps.rate,
            "bpftune_debug": int(self.config.debug),
            "bpftune_netns_cookie_supported": int(self.namespaces.cookie_supported),
            "bpftune_init_netns_inum": current_inode(),
            **tuner.bpf_globals(),
        }

    def _load(self, tuner: Tuner, support: Support, globals_: dict[str, int]) -> LoadedObject:
        """Open, load and attach one tuner's object (in its own loading child)."""
        return load(self._load_request(tuner, support, globals_))

    def _load_request(self, tuner: Tuner, support: Support, globals_: dict[str, int]) -> LoadRequest:
        """What to load for a tuner; stale cgroup programs of its names are
        detached first (on the load thread at start)."""
        assert tuner.bpf_name is not None
        path = object_path(tuner.bpf_name, legacy=self.variant == "legacy", directory=tuner.bpf_dir)
        cgroup_fd = self.cgroup.fd
        if tuner.cgroup_programs and cgroup_fd is not None:
            from .libbpf import ATTACH_CGROUP_SOCK_OPS, ATTACH_CGROUP_SYSCTL

            names = set(tuner.cgroup_programs)
            for attach_type in (ATTACH_CGROUP_SYSCTL, ATTACH_CGROUP_SOCK_OPS):
                self.cgroup.detach_stale(attach_type, names, keep=set())
        return LoadRequest(
            path,
            tuner.bpf_name,
            support,
            shared=self.ring,
            globals_=globals_,
            optional_signals=tuner.optional_signals,
            cgroup_fd=cgroup_fd,
            prefer=tuner.preferred_forms,
        )

    def _recover_journal(self, classes: list[type[Tuner]]) -> None:
        """Take over what earlier daemons journaled: restore it with -R, else
        adopt it (the originals stay the originals until restored)."""
        if self.config.advice:
            if self.state.journal_path.exists():
                log.info("advice mode: the journal %s is left as it is", self.state.journal_path)
            return
        known = known_tunables(classes)
        pending = self.store.load_journal(known)
        if pending:
            log.warning(
                "a previous daemon left %d original value(s) journaled; %s",
                len(pending),
                "restoring them (-R)" if self.config.rollback else "adopting them: they stay the originals for -R",
            )
        self.store.recover(pending, known.get, restore=self.config.rollback)

    # --- plugins added and removed while running -------------------------------------------

    def service_plugins(self) -> None:
        """Act on whatever happened in the watched directories (non-blocking)."""
        if self.watcher is None:
            return
        for event in self.watcher.read_events():
            self.plugin_event(event)

    def plugin_event(self, event: DirEvent) -> None:
        if event.kind == GONE:
            log.warning("plugin directory %s is gone; no longer watching it", event.path)
        elif event.kind == OVERFLOW:
            log.warning("plugin directory %s changed faster than it could be watched; rescanning it", event.path)
            self._rescan(event.path)
        elif is_plugin_file(event.path):
            if event.kind == ADDED:
                self._plugin_added(event.path)
            elif event.kind == REMOVED and event.path in self.plugins:
                self._plugin_removed(event.path)

    def _rescan(self, directory: Path) -> None:
        for path in [p for p in self.plugins if p.parent == directory and not p.exists()]:
            self._plugin_removed(path)
        for path in sorted(directory.glob(f"*{PLUGIN_SUFFIX}")):
            if is_plugin_file(path):
                self._plugin_added(path)

    def _plugin_added(self, path: Path) -> None:
        """Load a plugin file that appeared (or changed) in a watched directory."""
        loaded = self.plugins.get(path)
        if loaded is not None:
            if loaded[0].stamp is not None and loaded[0].stamp == file_stamp(path):
                return  # the same file (closed without a change, or seen at start)
            self._plugin_removed(path)
        try:
            plugin = load_plugin(path, self.trust)
        except PluginRefused as exc:
            log.warning("%s", exc)
            return
        except PluginError as exc:
            log.warning("added lib %s, init failed: %s", path, exc)
            return
        allowed = {normalize(a) for a in self.config.allow}
        if allowed and plugin.cls.name not in allowed:
            log.info("plugin '%s' ignored: tuner '%s' is not one of the -a tuners", path, plugin.cls.name)
            unload_plugin(plugin)
            return
        running = [t for t in self.tuners if t.name == plugin.cls.name]
        if running or plugin.cls.name in self.dormant:
            log.warning("added lib %s, init failed: a tuner named '%s' is already running", path, plugin.cls.name)
            unload_plugin(plugin)
            return
        if plugin.cls not in self.classes:
            self.classes.append(plugin.cls)
        if self._keep_dormant(plugin):
            return
        if self._ctx is None:
            self._ctx = self._context(self.support)
        if plugin.cls.cgroup_programs and self.cgroup.fd is None:
            try:
                self.cgroup.open()
            except PybpftuneError as exc:
                log.warning("added lib %s, init failed: %s", path, exc)
                unload_plugin(plugin)
                return
        tuner = self._start_tuner(plugin)
        log.info("added lib %s, init %s", path, "succeeded" if tuner is not None else "failed")
        if tuner is None:
            unload_plugin(plugin)
            return
        self.plugins[path] = (plugin, tuner)
        self._watch_ring()  # the first object to share the ring buffer may be this one

    def _plugin_removed(self, path: Path) -> None:
        """Stop the tuner a removed plugin file started; its programs are detached."""
        dormant = next((p for p in self.dormant.values() if p.path == path), None)
        if dormant is not None:  # switched off by the configuration: nothing runs
            del self.dormant[dormant.cls.name]
            self.classes = [c for c in self.classes if c is not dormant.cls]
            log.info("removed '%s' (tuner %s was switched off)", path, dormant.cls.name)
            unload_plugin(dormant)
            return
        plugin, tuner = self.plugins.pop(path)
        self.classes = [c for c in self.classes if c is not plugin.cls]
        if tuner in self.tuners:
            log.info("removed '%s', fini tuner %s", path, tuner.name)
            try:
                self._stop_tuner(tuner, summarize=True)
            except TUNER_ERRORS as exc:  # the plugin's stop() is its own code
                log.error("stopping tuner %s failed: %r", tuner.name, exc)
        else:
            log.info("removed '%s' (tuner %s was not running)", path, plugin.cls.name)
        unload_plugin(plugin)

    # --- event path -----------------------------------------------------------------------

    def _dispatcher(self, tuner: Tuner):  # type: ignore[no-untyped-def]
        def dispatch(event: Event) -> None:
            if self.store.netns_state(tuner, event.netns_cookie) != ACTIVE:
                log.debug(
                    "event scenario %d for tuner %s skipped: disabled in that netns", event.scenario_id, tuner.name
                )
                return
            log.debug(
                "event scenario %d for tuner %s[%d] netns %s (%s)",
                event.scenario_id,
                tuner.name,
                tuner.id,
                cookie_text(event.netns_cookie),
                self.namespaces.describe(event.netns_cookie),
            )
            tuner.handle_event(event)

        return dispatch

    def _handler_failed(self, tuner_id: int, exc: BaseException) -> None:
        """A tuner whose handler (or tick) raised is stopped as at exit: one
        line, its summary, its stop(), rollback with -R only (it ran: what it
        wrote before is tuning, kept like any tuning without -R).  Further
        failures of the same batch find it stopped and add nothing."""
        for tuner in self.tuners:
            if tuner.id == tuner_id:
                log.error("tuner %s disabled: its event handler failed: %r", tuner.name, exc)
                self.disabled[tuner.name] = f"handler failed: {exc!r}"
                try:
                    self._stop_tuner(tuner, summarize=True)
                except TUNER_ERRORS as stop_exc:  # its stop() is its own code
                    log.error("stopping tuner %s failed: %r", tuner.name, stop_exc)
                return

    def _stop_tuner(self, tuner: Tuner, summarize: bool) -> None:
        self.ring.unregister(tuner.id)
        timer = self._tick_timers.pop(tuner.id, None)
        if timer is not None:
            timer.cancel()
        if tuner in self.tuners:
            self.tuners.remove(tuner)
        if summarize:
            self._summarize(tuner)
        try:
            tuner.stop()
        finally:
            self.store.release(tuner)
            if self.config.rollback:
                self.store.rollback(tuner)
            self._close_object(tuner)

    # --- main loop ---------------------------------------------------------------------------

    def request_stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        self.loop.stop()

    def run(self) -> None:
        """Serve events, queries and timers until SIGINT/SIGTERM (or
        request_stop); the tuners still loading come up meanwhile, and SIGHUP
        re-reads the configuration file."""
        self.loop.stop_on((signal.SIGINT, signal.SIGTERM))
        self.loop.run()
        if self._fatal is not None:
            raise self._fatal

    # --- reload (SIGHUP) -----------------------------------------------------------------------

    def _reload_on_signal(self, signum: int) -> None:
        if not self.started:
            # Tuners are still being prepared and loaded with the settings
            # they started with: apply the file once the last one is up.
            if not self._reload_pending:
                log.info("SIGHUP during start-up: the configuration is re-read once every tuner is up")
            self._reload_pending = True
            return
        self.reload()

    def reload(self) -> bool:
        """Re-read the configuration file and apply it; an invalid file is
        refused with one line and every setting stays as it was."""
        path = self.config.config_path if self.config.config_explicit else None
        try:
            file = read_config(path, self._known_classes(), trusted=os.geteuid() == 0)
        except ConfigError as exc:
            log.error("configuration not reloaded, the current settings stay: %s", exc)
            return False
        new = self.config.with_file(file)
        old = self.config
        changed: list[str] = []
        if new.socket_path != old.socket_path or new.port != old.port:
            try:
                self._move_endpoints(new)
            except PybpftuneError as exc:
                log.error("configuration not reloaded, the current settings stay: %s", exc)
                return False
            changed.append(f"queries on {', '.join(self.server.addresses) if self.server else '-'}")
        self.config = new
        if new.to_stderr != old.to_stderr:
            setup_logging(new.to_stderr, new.debug)
            changed.append("log to " + ("stderr" if new.to_stderr else "the system log"))
        if dict(new.limits) != dict(old.limits):
            self.store.limits = dict(new.limits)
            changed.append(f"limits {self._all_limits_text() or 'none'}")
        if new.learning_rate != old.learning_rate:
            self.steps.set_rate(new.learning_rate)
            for tuner in self.tuners:
                tuner.set_bpf_global("bpftune_learning_rate", new.learning_rate)
            changed.append(f"learning rate {new.learning_rate}")
        if new.advice != old.advice:
            self.store.advice = new.advice
            for tuner in self.tuners:
                tuner.advice_changed(new.advice)
            changed.append("advice mode " + ("on: nothing will be written" if new.advice else "off"))
        if new.rollback != old.rollback:
            if self._ctx is not None:
                self._ctx.rollback = new.rollback
            changed.append("rollback on exit " + ("on" if new.rollback else "off"))
        changed.extend(self._apply_switches())
        log.info(
            "configuration %s reloaded: %s",
            file.path or "(none: defaults)",
            "; ".join(changed) or "nothing changed",
        )
        return True

    def _known_classes(self) -> list[type[Tuner]]:
        """Every tuner the configuration may name: those -a allows and any
        other built-in or installed one (a file may name a tuner -a leaves out)."""
        from .registry import builtin_tuners, entry_point_tuners

        out = {c.name: c for c in [*builtin_tuners(), *entry_point_tuners()]}
        out.update((c.name, c) for c in self.classes)
        return list(out.values())

    def _all_limits_text(self) -> str:
        return "; ".join(f"{k}: {self._limits_text(v)}" for k, v in self.store.limits.items())

    @staticmethod
    def _limits_text(limits: TunableLimits) -> str:
        parts = [("", limits.everywhere), ("global ", limits.global_), ("netns ", limits.netns)]
        return ", ".join(
            f"{kind}{lim.describe()}" for kind, lim in parts if lim.floor is not None or lim.cap is not None
        )

    def _move_endpoints(self, new: DaemonConfig) -> None:
        """Serve queries where ``new`` says: the new endpoints are opened
        before the old ones close, and if one cannot be had, nothing moves."""
        server = self.server
        if server is None:
            return
        old = self.config
        opened: list[str] = []
        try:
            if new.port != old.port and new.port is not None:
                opened.append(server.listen_tcp(new.port))
            if new.socket_path != old.socket_path:
                path = new.socket_path
                opened.append(server.listen_unix(lambda: self.state.bind_socket(path), str(path)))
        except BaseException:
            for key in opened:
                server.stop_listening(key)
            if new.socket_path != old.socket_path:
                self.state.remove_socket(new.socket_path)
            raise
        if new.port != old.port and old.port is not None:
            server.stop_listening(f"tcp:{old.port}")
        if new.socket_path != old.socket_path:
            server.stop_listening(f"unix:{old.socket_path}")
            self.state.remove_socket(old.socket_path)

    def _apply_switches(self) -> list[str]:
        """Stop tuners the file now switches off; start the ones it switches on."""
        out = []
        for tuner in list(self.tuners):
            if not self._switched_off(tuner.name):
                continue
            log.info("tuner %s stopped: the configuration switches it off", tuner.name)
            self._stop_tuner(tuner, summarize=True)
            plugin = self._plugin_of(tuner)
            if plugin is not None:
                self.dormant[tuner.name] = plugin
            out.append(f"{tuner.name} off")
        for name, plugin in list(self.dormant.items()):
            if self._switched_off(name) or self._ctx is None:
                continue
            del self.dormant[name]
            if plugin.cls.cgroup_programs:
                self.cgroup.open()
            started = self._start_tuner(plugin)
            if started is None:
                out.append(f"{name} failed to start")
                if plugin.path is not None:
                    unload_plugin(plugin)
                    self.classes = [c for c in self.classes if c is not plugin.cls]
                continue
            if plugin.path is not None:
                self.plugins[plugin.path] = (plugin, started)
            out.append(f"{name} on")
        return out

    def _plugin_of(self, tuner: Tuner) -> Plugin | None:
        """The plugin a running tuner came from (a built-in's is made up)."""
        for path, (plugin, t) in list(self.plugins.items()):
            if t is tuner:
                del self.plugins[path]
                return plugin
        cls = type(tuner)
        return Plugin(cls) if cls in self.classes else None

    def _request_tick(self, tuner: Tuner, when: float) -> None:
        """Have ``tuner.tick`` run at ``when`` unless a tick is due sooner."""
        timer = self._tick_timers.get(tuner.id)
        if timer is not None and not timer.cancelled:
            if timer.when <= when:
                return
            timer.cancel()
        if math.isinf(when):
            return
        self._tick_timers[tuner.id] = self.loop.call_at(
            max(when, time.monotonic() + TICK_MIN_S), lambda: self._tick(tuner), f"tuner {tuner.name} tick"
        )

    def _tick(self, tuner: Tuner) -> None:
        self._tick_timers.pop(tuner.id, None)
        if tuner not in self.tuners:
            return
        now = time.monotonic()
        try:
            due = tuner.tick(now)
        except TUNER_ERRORS as exc:
            self._handler_failed(tuner.id, exc)
            return
        self._request_tick(tuner, now + TICK_S if due is None else due)

    def _loop_failed(self, what: str, exc: BaseException) -> None:
        log.error("%s failed: %r", what, exc)

    # --- stop ----------------------------------------------------------------------------------

    def _summary_lines(self, tuner: Tuner) -> list[str]:
        return self.store.summary(tuner) + tuner.summary_lines()

    def _summarize(self, tuner: Tuner) -> None:
        for line in self._summary_lines(tuner):
            log.info("%s", line)

    # --- what queries read (pybpftune.query.View) ------------------------------------------

    @property
    def history(self) -> History:
        return self.store.history

    def info(self) -> DaemonInfo:
        from .query import DaemonInfo

        support = self.support
        self.read_drops(self.tuners)
        lost = self.loss.counts()
        return DaemonInfo(
            version=__version__,
            pid=os.getpid(),
            started=self.started_at,
            level=support.level if support is not None else "unknown",
            variant=self.variant,
            variant_reason=self.variant_reason,
            netns_policy=self.namespaces.cookie_supported,
            advice=self.store.advice,
            learning_rate=self.steps.rate,
            config=str(self.config.config_path) if self.config.config_path else None,
            limits=self._all_limits_text(),
            events_received=self.ring.received,
            events_dropped=lost.ring_full,
            events_malformed=lost.malformed,
            events_unknown=lost.unknown,
        )

    def tuner_states(self) -> list[TunerState]:
        from .query import TunableInfo, TunerState

        loading = {t.name for t in self._loading}
        running = {t.name: t for t in self.tuners}
        out = []
        for cls in self.classes:
            tunables = tuple(
                TunableInfo(t.name, _type_name(t), t.num_values, t.namespaced, t.is_sysctl) for t in cls.tunables
            )
            tuner = running.get(cls.name)
            if tuner is not None:
                manual = self.store.netns_state(tuner, self.namespaces.global_cookie) == MANUAL
                out.append(TunerState(cls.name, "manual" if manual else "active", "", _signals(tuner), tunables))
            elif cls.name in self.disabled:
                out.append(TunerState(cls.name, "inactive", self.disabled[cls.name], (), tunables))
            elif cls.name in loading:
                out.append(TunerState(cls.name, "inactive", "starting: its BPF object is being loaded", (), tunables))
            else:
                out.append(TunerState(cls.name, "inactive", "switched off by the configuration", (), tunables))
        return out

    def tunable_values(self) -> list[TunableValue]:
        from .query import TunableValue

        out = []
        for tuner in self.tuners:
            for t in tuner.tunables:
                if not t.is_sysctl:
                    continue
                try:
                    values: tuple[int | str, ...]
                    if t.kind == "string":
                        values = (self.store.current_text(tuner, t.id),)
                    else:
                        values = self.store.current(tuner, t.id)
                except (SysctlMissing, OSError, PybpftuneError):
                    continue  # an optional sysctl this kernel lacks
                out.append(TunableValue(tuner.name, t.name, values))
        return out

    def summary(self) -> tuple[list[str], list[SummaryCount]]:
        from .query import SummaryCount

        lines: list[str] = []
        counts: list[SummaryCount] = []
        for tuner in self.tuners:
            lines += self._summary_lines(tuner)
            for tunable, scenario, global_ns, n in self.store.counts(tuner):
                counts.append(SummaryCount(tuner.name, tunable, scenario, global_ns, n))
        return lines, counts

    def rollback_items(self) -> list[RollbackItem]:
        from .query import RollbackItem

        out = []
        for tuner in self.tuners:
            for t, cookie, original, current in self.store.changed_values(tuner):
                command = self.store.command(tuner, t, original, cookie)
                out.append(
                    RollbackItem(
                        tuner.name, t.name, cookie, self.namespaces.is_global(cookie), current, original, command
                    )
                )
        return out

    def close(self) -> None:
        """Summary, rollback (-R), then release everything in reverse order.

        The summary of every tuner is gathered first and logged as one block;
        only then are the tuners stopped (their rollback and teardown lines
        follow the block instead of cutting through it)."""
        if self._closed:
            return
        self._closed = True
        # Refused at the lock (another daemon runs): nothing of ours started or stops.
        ours = self.state.locked
        if self.server is not None:
            self.server.close()
            self.state.remove_socket(self.config.socket_path)
        self._loader.close()  # waits for a load in progress
        if self._batch is not None:
            self._batch.close()  # the loads not taken end with their child
        self._take_loaded()  # closed: what was loaded meanwhile is released, not started
        tuners = list(reversed(self.tuners))
        block = []
        for tuner in tuners:
            try:
                block += self._summary_lines(tuner)
            except Exception as exc:
                log.error("summarizing tuner %s failed: %r", tuner.name, exc)
        if tuners and self.ring.active:
            # The event path's volume, for whoever weighs its cost (bench/overhead.py).
            self.read_drops(tuners)
            lost = self.loss.counts()
            block.append(
                f"# Summary: {self.ring.received} events handled from the ring buffer, {lost.total} lost "
                f"({lost.ring_full} for a full ring buffer, {lost.malformed} malformed, {lost.unknown} for no tuner)"
            )
        if tuners:
            for line in ["# Summary of changes made across all tuners:", *block]:
                log.info("%s", line, extra={"bpftune": {"summary": True}})
        for tuner in tuners:
            try:
                self._stop_tuner(tuner, summarize=False)
            except (Exception, SystemExit) as exc:  # a plugin's stop() may raise anything: tear the rest down
                log.error("stopping tuner %s failed: %r", tuner.name, exc)
        if self.watcher is not None:
            self.watcher.close()
        for plugin, _tuner in self.plugins.values():
            unload_plugin(plugin)
        self.plugins.clear()
        for plugin in self.dormant.values():
            if plugin.path is not None:
                unload_plugin(plugin)
        self.dormant.clear()
        if self.config.rollback and not self.config.advice:
            # What no running tuner owned: adopted from an earlier daemon, or
            # changed by a tuner removed since.
            self.store.rollback_all()
        self.store.close()
        # Only now: until the journal is settled, SIGTERM/SIGINT must stay ours
        # (the loop restores the default handlers, which would end the process).
        self.loop.close()
        self.ring.close()
        self.cgroup.close()
        self.state.unlock()
        if ours:
            log.info("bpftune stopped")


def _signals(tuner: Tuner) -> tuple[SignalState, ...]:
    """How each of a tuner's kernel signals is observed here (none: no BPF)."""
    from .query import SignalState

    loaded = tuner.loaded
    if loaded is None:
        return ()
    out = [
        SignalState(
            c.signal,
            SIGNAL_KIND.get(c.chosen, c.chosen) if c.chosen else "none",
            c.chosen,
            "; ".join(f"{f}: {r}" for f, r in c.rejected.items()),
        )
        for c in loaded.choices.values()
    ]
    # Programs that are no signal's form (sockops, cgroup/sysctl gates) are
    # the tuner's way of seeing too.
    out.extend(
        SignalState(info.name, SIGNAL_KIND.get(info.kind, info.kind), info.kind)
        for info in loaded.programs.values()
        if info.signal is None and loaded.autoload(info.name)
    )
    return tuple(out)


def _type_name(t: Tunable) -> str:
    """bpftune's word for a tunable's type in `tunables`."""
    return "string" if t.kind == "string" else "integer"


# Form families as `status` names them.
SIGNAL_KIND = {
    "tp_btf": "tracepoint",
    "raw_tp": "tracepoint",
    "tracepoint": "tracepoint",
    "cgroup_sysctl": "cgroup",
}
