"""``bpftune --restore``: put back every original value the journal holds.

For an operator cleaning up after a crash (or before removing pybpftune):
it takes the state directory's lock (refused while a daemon runs: stop that
one with -R instead), reads the journal with the same checks as a daemon,
restores each original whose value is still the one we wrote, leaves values
someone else changed since, and rewrites the journal to hold only what could
not be restored.  No BPF is loaded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from .errors import PybpftuneError
from .log import setup_logging
from .netns import Namespaces
from .registry import Trust, select
from .state import StateDir
from .store import TunableStore
from .sysctl import ProcSysctl
from .tuner import Tuner, known_tunables

log = logging.getLogger("pybpftune")


def restore_journaled(state_dir: Path, libdirs: Iterable[str] = (), debug: bool = False) -> int:
    """Restore what the journal in ``state_dir`` holds; the exit code (0:
    nothing is left journaled, 1: something could not be restored)."""
    if os.geteuid() != 0:
        raise PybpftuneError("restoring needs root (it writes sysctls in every network namespace)")
    setup_logging(True, debug)
    state = StateDir(state_dir)
    state.lock("restore")
    try:
        classes: list[type[Tuner]] = []
        select((), libdirs, Trust(), classes)
        known = known_tunables(classes)
        namespaces = Namespaces()
        store = TunableStore(ProcSysctl(namespaces), namespaces, state)
        pending = store.load_journal(known)
        if not pending:
            store.close()
            log.info("nothing to restore: no original value is journaled in %s", state_dir)
            return 0
        log.info("restoring %d journaled original value(s) from %s", len(pending), state.journal_path)
        restored = store.recover(pending, known.get, restore=True)
        left = store.pending()
        store.close()
        log.info(
            "restored %d value(s)%s",
            restored,
            f"; {len(left)} could not be restored and stay journaled" if left else "",
        )
        return 1 if left else 0
    finally:
        state.unlock()
