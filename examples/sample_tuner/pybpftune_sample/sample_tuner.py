"""sample tuner: an outside pybpftune tuner with its own BPF object.

The BPF side (sample_tuner.bpf.c, compiled next to this file as
sample_tuner.bpf.o and sample_tuner.bpf.legacy.o) sends an event when a task
takes a name starting with "sample"; the rules below log it.  It changes
nothing: it shows the parts every tuner has (a BPF object found next to the
module, declared scenarios, rules, a summary line) and how it is installed:

* as a package: ``pip install`` this directory; the ``pybpftune.tuners``
  entry point names the class;
* as a plugin file: this file and the two objects in a root-owned plugin
  directory (``bpftune -l DIR``), where a running daemon picks it up.

It imports nothing but pybpftune, so the same file works both ways.
"""

from __future__ import annotations

from pathlib import Path

from pybpftune.events import Event
from pybpftune.tuner import NOTHING, Decision, Scenario, Tuner

RENAMED = 0  # SAMPLE_SCENARIO_RENAMED in sample_tuner.bpf.c


class SampleTuner(Tuner):
    name = "sample"
    description = "sample outside tuner: logs tasks that take a name starting with 'sample'"
    bpf_name = "sample_tuner"
    bpf_dir = Path(__file__).parent
    scenarios = (Scenario(RENAMED, "task renamed", "A task took a name starting with 'sample'."),)

    def start(self) -> None:
        self.renames = 0

    def decide(self, event: Event) -> Decision:
        if event.scenario_id == RENAMED:
            self.renames += 1
            self.log.info("sample: pid %d renamed a task to '%s'", event.pid, event.text)
        return NOTHING

    def summary_lines(self) -> list[str]:
        return [f"# sample: {self.renames} rename event(s) seen"]


TUNER = SampleTuner
