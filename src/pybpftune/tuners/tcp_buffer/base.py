"""What tcp_buffer's rules read besides the event: sysctls, the time of the
tuner's last change, tcp_mem, and the BPF side's memory flags and latency
correlation.  The rule modules take a :class:`TcpBufferBase`; the tuner
(tuner.py) derives from it and wires them together."""

from __future__ import annotations

from ...bindings import TcpBufferTunable
from ...corr import CorrSums, corr_key, read_corr
from ...declarations import MapUpdate, Values
from ...errors import PybpftuneError
from ...hostmem import PAGE_SIZE
from ...sysctl import SysctlMissing
from ...tuner import Tuner, TunerContext

CORR_MAP = "bpftune_corr"


class TcpBufferBase(Tuner):
    def __init__(self, ctx: TunerContext, tuner_id: int) -> None:
        super().__init__(ctx, tuner_id)
        self.page_size = PAGE_SIZE
        self.last_change: dict[tuple[int, int], float] = {}
        self.tcp_mem_cache: tuple[float, Values | None] | None = None

    @property
    def near_pressure(self) -> bool:
        """The BPF side saw TCP memory near tcp_mem[1] (its global flag)."""
        return self.loaded is not None and bool(self.loaded.get_global("near_memory_pressure"))

    @property
    def near_exhaustion(self) -> bool:
        """The BPF side saw TCP memory near tcp_mem[2]."""
        return self.loaded is not None and bool(self.loaded.get_global("near_memory_exhaustion"))

    def corr(self, tunable_id: int, cookie: int) -> CorrSums:
        """The latency (or, for the SYN backlog, connections established)
        correlation the BPF side keeps for a tunable in a namespace."""
        if self.loaded is None:
            return CorrSums()
        return read_corr(self.loaded.map(CORR_MAP), self.id, tunable_id, cookie)

    def reset_corr(self, tunable_id: int, cookie: int) -> MapUpdate:
        """Start the correlation over (after acting on it)."""
        return MapUpdate(CORR_MAP, corr_key(self.id, tunable_id, cookie), None)

    def read(self, tunable_id: int, cookie: int) -> Values | None:
        """A tunable's values; None when it cannot be read (gone, missing)."""
        try:
            return self.current(tunable_id, cookie)
        except (SysctlMissing, PybpftuneError, OSError):
            return None

    def tcp_mem(self) -> Values | None:
        """tcp_mem (global), read at most once a second for the buffer cap."""
        now = self.clock()
        if self.tcp_mem_cache is None or now - self.tcp_mem_cache[0] >= 1.0:
            self.tcp_mem_cache = (now, self.read(TcpBufferTunable.TCP_MEM, self.ctx.namespaces.global_cookie))
        return self.tcp_mem_cache[1]

    def cooling(self, cookie: int, tunable_id: int, seconds: float) -> bool:
        last = self.last_change.get((cookie, tunable_id))
        return last is not None and self.clock() - last < seconds

    def initial(self, tunable_id: int, cookie: int, current: Values) -> Values:
        """The namespace's value before we first changed it."""
        original = self.ctx.store.original(self, tunable_id, cookie, initial=False)
        return current if original is None else original
