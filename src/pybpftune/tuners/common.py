"""Small helpers shared by the udp_buffer, ip_frag and net_buffer tuners."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..tuner import Tuner


def pearson(samples: list[tuple[float, float]]) -> float:
    """Pearson's r of (x, y) samples; 0 with fewer than two or no variance."""
    n = len(samples)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in samples) / n
    my = sum(y for _, y in samples) / n
    sxy = sum((x - mx) * (y - my) for x, y in samples)
    sxx = sum((x - mx) ** 2 for x, _ in samples)
    syy = sum((y - my) ** 2 for _, y in samples)
    if sxx <= 0 or syy <= 0:
        return 0.0
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def sample_lines(tuner: Tuner, signals: Iterable[str]) -> list[str]:
    """bpftune's "Sample" summary lines for the ``<signal>_sample`` globals
    (struct bpftune_sample {count, ts, rate}) of a tuner's loaded object."""
    lines: list[str] = []
    if tuner.loaded is None:
        return lines
    obj = tuner.loaded.obj
    for signal in signals:
        name = f"{signal}_sample"
        if not obj.has_global(name):
            continue
        raw = obj.get_global(name)
        count, rate = raw & (2**64 - 1), raw >> 128
        if count:
            lines.append(
                f"Sample '{signal}': associated program was called {count} times, "
                f"collected data every {max(rate, 1)} of these."
            )
    return lines
