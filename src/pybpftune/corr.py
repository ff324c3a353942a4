"""Correlation between a tunable's value and a cost (latency), as bpftune's corr.h.

The BPF side adds (x, y) samples to running sums in the shared ``bpftune_corr`` map
(``bpftune_corr_update``); user space computes Pearson's coefficient from
them.  The map is shared by every tuner, so the key names the tuner as well
as the tunable and the namespace (upstream keyed by tunable id only, so
tcp_buffer's tunables 0/1 and ip_frag's 0/1 mixed their samples).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from . import bindings

CORR_MIN_SAMPLES = 10
CORR_THRESHOLD = 0.75


@dataclass(frozen=True)
class CorrSums(bindings.Corr):
    """The running sums of ``struct corr`` (its fields: n, sum_x, ...), with
    the coefficient computed from them."""

    @classmethod
    def of(cls, samples: list[tuple[int, int]]) -> CorrSums:
        """Sums of a list of (x, y) samples, as the BPF side would keep them."""
        return cls(
            len(samples),
            sum(x for x, _ in samples),
            sum(x * x for x, _ in samples),
            sum(y for _, y in samples),
            sum(y * y for _, y in samples),
            sum(x * y for x, y in samples),
        )

    def coefficient(self) -> float:
        """Pearson's r; 0 with fewer than two samples or no variance."""
        n = self.n
        if n < 2:
            return 0.0
        cov = n * self.sum_xy - self.sum_x * self.sum_y
        var_x = n * self.sum_x_sq - self.sum_x * self.sum_x
        var_y = n * self.sum_y_sq - self.sum_y * self.sum_y
        if var_x <= 0 or var_y <= 0:
            return 0.0
        return max(-1.0, min(1.0, cov / math.sqrt(var_x * var_y)))

    def significant(self, threshold: float = CORR_THRESHOLD) -> bool:
        """Enough samples and a coefficient above the threshold."""
        return self.n >= CORR_MIN_SAMPLES and self.coefficient() > threshold


def corr_key(tuner_id: int, tunable_id: int, netns_cookie: int) -> bytes:
    """The bytes of ``struct corr_key`` for one tuner, tunable and namespace."""
    return bindings.CorrKey(tuner_id=tuner_id, id=tunable_id, netns_cookie=netns_cookie).pack()


def parse_corr(data: bytes) -> CorrSums:
    return CorrSums.unpack(data)


def corr_value(sums: CorrSums) -> bytes:
    """The bytes of ``struct corr`` holding ``sums`` (tests, replays)."""
    return sums.pack()


def read_corr(corr_map: Mapping[bytes, bytes], tuner_id: int, tunable_id: int, netns_cookie: int) -> CorrSums:
    """Sums for (tuner, tunable, namespace); empty sums when there are none."""
    try:
        data = corr_map[corr_key(tuner_id, tunable_id, netns_cookie)]
    except KeyError:
        return CorrSums()
    return parse_corr(data)
