"""The maps every tuner object shares, and the one consumer of the ring buffer.

:class:`SharedMaps` owns the maps all objects share: the ring buffer every
object writes its events to and the correlation map.  The first object loaded
creates them; the hub keeps a dup of each fd so they outlive any object, and
every later object reuses them (``bpf_map__reuse_fd``) before its load.  Inside
it, one libbpf consumer polls the ring buffer and dispatches each event to the
handler registered for its tuner id: one object owns the ring-buffer fd.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from . import libbpf
from .errors import PybpftuneError
from .events import HEADER_SIZE, Event
from .loss import EventLoss
from .objects import LoadedObject, OpenObject
from .resource import Resource

log = logging.getLogger("pybpftune.ringbuf")

RING_MAP = "bpftune_ringbuf"
SHARED_MAPS = (RING_MAP, "bpftune_corr")

Handler = Callable[[Event], None]
ErrorHandler = Callable[[int, BaseException], None]


class SharedMaps(Resource):
    """The shared maps' fds, plus the single consumer of the ring buffer."""

    def __init__(
        self,
        size: int | None = None,
        on_error: ErrorHandler | None = None,
        max_batch: int = 4096,
        loss: EventLoss | None = None,
    ) -> None:
        """``size`` (bytes, a power of two) overrides the BPF default;
        ``on_error`` receives (tuner_id, exception) when a handler raises;
        without it the exception propagates out of :meth:`poll`.
        ``max_batch`` bounds how many events one poll dispatches, so a flood
        cannot hold the caller (ticks, signals) for seconds.
        ``loss``: where malformed events and events for no tuner are
        counted (the daemon's; a new one by default)."""
        self._size = size
        self._max_batch = max_batch
        self._batch = 0
        self._fds: dict[str, int] = {}
        self._ring: libbpf.CData | None = None
        self._keepalive: libbpf.CData | None = None
        self._handlers: dict[int, Handler] = {}
        self._on_error = on_error
        self._errors: list[tuple[int, BaseException]] = []
        self.received = 0
        self.received_by_tuner: dict[int, int] = {}
        self.loss = loss if loss is not None else EventLoss()
        # Ids of tuners that were registered and are no more: their late
        # events are dropped on purpose, not lost.
        self._retired: set[int] = set()
        self.dropped_late = 0
        self._closed = False

    # --- sharing ------------------------------------------------------------

    def prepare(self, obj: OpenObject) -> None:
        """Before ``obj.load()``: make it reuse the shared maps we already hold."""
        self._require_open()
        for name in SHARED_MAPS:
            if not obj.has_map(name):
                continue
            if name in self._fds:
                obj.reuse_map(name, self._fds[name])
            elif name == RING_MAP and self._size:
                obj.set_map_max_entries(name, self._size)

    def adopt(self, obj: LoadedObject) -> None:
        """After load: keep the shared maps ``obj`` created alive."""
        self._require_open()
        for name in SHARED_MAPS:
            if obj.has_map(name) and name not in self._fds:
                self._fds[name] = os.dup(obj.map_fd(name))
        if self._ring is None and RING_MAP in self._fds:
            self._ring, self._keepalive = libbpf.ring_buffer_new(self._fds[RING_MAP], self._on_record)

    def map_fd(self, name: str) -> int:
        try:
            return self._fds[name]
        except KeyError:
            raise PybpftuneError(f"shared map {name} does not exist yet: no object was loaded") from None

    # --- dispatch ------------------------------------------------------------

    def register(self, tuner_id: int, handler: Handler) -> None:
        if not 0 <= tuner_id < libbpf.MAX_TUNERS:
            raise PybpftuneError(f"tuner id {tuner_id} is out of range 0..{libbpf.MAX_TUNERS - 1}")
        self._handlers[tuner_id] = handler
        self._retired.discard(tuner_id)

    def unregister(self, tuner_id: int) -> None:
        if self._handlers.pop(tuner_id, None) is not None:
            self._retired.add(tuner_id)

    @property
    def dropped_malformed(self) -> int:
        return self.loss.malformed

    @property
    def dropped_unknown(self) -> int:
        return self.loss.unknown

    def _on_record(self, data: bytes) -> int:
        self._batch += 1
        stop = libbpf.STOP_DRAIN if self._batch >= self._max_batch else 0
        if len(data) < HEADER_SIZE:
            self.loss.malformed_event()
            log.debug("dropping a %d-byte ring-buffer record: shorter than an event header", len(data))
            return stop
        event = Event(data)
        handler = self._handlers.get(event.tuner_id)
        if handler is None:
            if event.tuner_id in self._retired:
                self.dropped_late += 1
                log.debug("dropping a late event of stopped tuner %d (scenario %d)", event.tuner_id, event.scenario_id)
            else:
                self.loss.unknown_event()
                log.debug("dropping event for unknown tuner id %d (scenario %d)", event.tuner_id, event.scenario_id)
            return stop
        self.received += 1
        self.received_by_tuner[event.tuner_id] = self.received_by_tuner.get(event.tuner_id, 0) + 1
        try:
            handler(event)
        except (Exception, SystemExit) as exc:  # isolated per tuner, reported after the poll
            self._errors.append((event.tuner_id, exc))
        return stop

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for events and dispatch them; returns how many."""
        self._require_open()
        if self._ring is None:
            raise PybpftuneError("no object shares the ring buffer yet")
        self._batch = 0
        n = libbpf.ring_buffer_poll(self._ring, timeout_ms)
        self._raise_errors()
        if n == libbpf.STOP_DRAIN:
            return self._batch
        if n < 0 and n != -4:  # EINTR is a signal arriving, not a failure
            raise PybpftuneError(f"polling the ring buffer failed: {os.strerror(-n)}")
        return max(n, 0)

    def consume(self) -> int:
        """Dispatch whatever is queued without waiting."""
        self._require_open()
        if self._ring is None:
            return 0
        self._batch = 0
        n = libbpf.ring_buffer_consume(self._ring)
        self._raise_errors()
        return self._batch if n == libbpf.STOP_DRAIN else max(n, 0)

    def _raise_errors(self) -> None:
        errors, self._errors = self._errors, []
        if not errors:
            return
        if self._on_error is None:
            if len(errors) == 1:
                raise errors[0][1]
            raise ExceptionGroup(
                f"{len(errors)} ring-buffer handlers failed", [e for _, e in errors if isinstance(e, Exception)]
            )
        for tuner_id, exc in errors:
            self._on_error(tuner_id, exc)

    @property
    def active(self) -> bool:
        """True once an object shares the ring buffer (there is something to poll)."""
        return self._ring is not None

    def fileno(self) -> int:
        """An epoll fd that becomes readable when events are queued."""
        if self._ring is None:
            raise PybpftuneError("no object shares the ring buffer yet")
        return libbpf.ring_buffer_epoll_fd(self._ring)

    # --- lifecycle -------------------------------------------------------------

    def _require_open(self) -> None:
        if self._closed:
            raise PybpftuneError("the ring buffer is closed")

    def close(self) -> None:
        """Free the consumer, then the shared map fds.  Safe to repeat."""
        if self._closed:
            return
        self._closed = True
        if self._ring is not None:
            libbpf.ring_buffer_free(self._ring)
            self._ring = None
            self._keepalive = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._handlers.clear()
