"""Small helpers shared by the udp_buffer, ip_frag, net_buffer and neigh_table tuners."""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Iterable, Sequence
from typing import TYPE_CHECKING

from .. import bindings
from ..corr import CORR_MIN_SAMPLES, CORR_THRESHOLD

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


def significant_correlation(samples: Sequence[tuple[float, float]]) -> float | None:
    """Pearson's r of a window of (setting, cost) samples when there are
    enough of them and it is above bpftune's threshold (as corr.CorrSums.significant); else None."""
    r = pearson(list(samples))
    return r if len(samples) >= CORR_MIN_SAMPLES and r > CORR_THRESHOLD else None


class SayOnce:
    """Log a line once per key (a tunable, a namespace, a device...), not at
    every event that meets the same limit again."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._said: set[Hashable] = set()

    def info(self, key: Hashable, msg: str, *args: object) -> None:
        if key not in self._said:
            self._said.add(key)
            self._log.info(msg, *args)


def samples(tuner: Tuner, signals: Iterable[str] | None = None) -> list[tuple[str, int, int]]:
    """(signal, calls, current rate) of the ``<signal>_sample`` globals
    (struct bpftune_sample) of a tuner's loaded object; every signal of the
    object when ``signals`` is None."""
    out: list[tuple[str, int, int]] = []
    if tuner.loaded is None or tuner.loaded.closed:
        return out
    obj = tuner.loaded
    for signal in tuner.loaded.choices if signals is None else signals:
        name = f"{signal}_sample"
        if obj.has_global(name):
            sample = obj.global_struct(name, bindings.BpftuneSample)
            out.append((signal, sample.count, sample.rate))
    return out


def sample_lines(tuner: Tuner, signals: Iterable[str]) -> list[str]:
    """bpftune's "Sample" summary lines for the ``<signal>_sample`` globals."""
    return [
        f"Sample '{signal}': associated program was called {count} times, collected data every {max(rate, 1)} of these."
        for signal, count, rate in samples(tuner, signals)
        if count
    ]
