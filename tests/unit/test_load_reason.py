"""Why a form was refused at load: the verifier's words, not libbpf's last line."""

from __future__ import annotations

from pybpftune.errors import BpfLoadError
from pybpftune.loader import load_reason


def test_reason_is_the_verifier_complaint() -> None:
    tail = [
        "libbpf: prog 'squeeze__tp_btf': BPF program load failed: No such file or directory",
        "libbpf: prog 'squeeze__tp_btf': -- BEGIN PROG LOAD LOG --\n"
        "ldimm64 failed to find the address for kernel symbol 'softnet_data'.\n"
        "processed 0 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0\n"
        "-- END PROG LOAD LOG --",
        "libbpf: prog 'squeeze__tp_btf': failed to load: -2",
        "libbpf: failed to load object 'nb'",
    ]
    exc = BpfLoadError("nb", -2, tail, "squeeze__tp_btf")
    assert load_reason(exc) == "ldimm64 failed to find the address for kernel symbol 'softnet_data'."


def test_without_a_verifier_log_the_last_line_or_errno() -> None:
    assert load_reason(BpfLoadError("x", -22, ["libbpf: something", ""], None)) == "libbpf: something"
    assert load_reason(BpfLoadError("x", -22, [], None)) == "Invalid argument (EINVAL)"
