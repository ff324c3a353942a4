"""The generated bindings of the shared header: current, and true to the C layout."""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import cast

import pytest

from pybpftune import bindings, libbpf
from pybpftune.objects import Layout

ROOT = Path(__file__).resolve().parents[2]


def _build_ffi() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_ffi_for_test", ROOT / "build_ffi.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bindings_are_current() -> None:
    """`make` regenerates it when src/bpf/bpftune_shared.h changes."""
    if not (ROOT / "build_ffi.py").exists():
        pytest.skip("not a source checkout")
    rendered = _build_ffi().render_bindings()
    assert rendered == (ROOT / "src" / "pybpftune" / "bindings.py").read_text(), "run `make bindings`"


def _structs() -> list[type[Layout]]:
    return [
        cast(type[Layout], c) for c in vars(bindings).values() if isinstance(c, type) and dataclasses.is_dataclass(c)
    ]


def test_every_struct_matches_its_c_size_and_fields() -> None:
    structs = _structs()
    assert len(structs) >= 20
    for cls in structs:
        c_type = cls.C_TYPE
        assert libbpf.struct_size(c_type) == cls.SIZE
        assert bindings.field_names(cls) == tuple(libbpf.struct_field_names(c_type))
        blank = cls()
        assert blank.pack() == bytes(cls.SIZE)


def test_values_round_trip_through_the_layout() -> None:
    key = bindings.TcpBufferHoldKey(netns_cookie=2**63 + 5, tunable=3, conn=7)
    assert bindings.TcpBufferHoldKey.unpack(key.pack()) == key
    stats = bindings.NeighTableStats(family=10, entries=512, dev="veth-long-name-x", netns_inum=4026531840)
    back = bindings.NeighTableStats.unpack(stats.pack())
    assert back.dev == "veth-long-name-"  # 16 bytes with its NUL, as the kernel's IFNAMSIZ
    assert (back.family, back.entries, back.netns_inum) == (10, 512, 4026531840)
    host = bindings.TcpConnHostKey(netns_cookie=9, addr=bytes(range(16)))
    assert bindings.TcpConnHostKey.unpack(host.pack()).addr == bytes(range(16))
    counts = bindings.TcpConnCounts(chosen=((1, 2, 3, 4), (5, 6, 7, 8)), connections=3)
    assert bindings.TcpConnCounts.unpack(counts.pack()).chosen == ((1, 2, 3, 4), (5, 6, 7, 8), (0, 0, 0, 0))
    event = bindings.TcpBufferEvent(
        update=bindings.BpftunableUpdate(id=1, old=(1, 2, 3), new=(4, 5, 6)),
        conn=bindings.TcpBufferConn(flags=bindings.TcpBufferConnFlag.F_RCV, bytes=1 << 40),
    )
    assert bindings.TcpBufferEvent.unpack(event.pack()) == event


def test_a_short_record_reads_as_zeros_not_past_its_end() -> None:
    obs = bindings.NetBufferObs.unpack(b"\x07\x00\x00\x00")
    assert obs.cpu == 7 and obs.drops == 0


def test_enums_come_from_the_header() -> None:
    members = libbpf.enum_members("enum tcp_buffer_tunable")
    assert {m.name: int(m) for m in bindings.TcpBufferTunable} == {
        k.removeprefix("TCP_BUFFER_"): v for k, v in members.items() if "NUM_" not in k
    }
    assert len(bindings.TcpBufferTunable) == bindings.TCP_BUFFER_NUM_TUNABLES
    assert issubclass(bindings.TcpBufferConnFlag, enum.IntFlag)
    assert [m.name for m in bindings.TcpConnAlg] == ["CUBIC", "BBR", "HTCP", "DCTCP", "OTHER"]
    assert bindings.NETNS_UNKNOWN == 2**64 - 1


def test_members_of_a_union_do_not_overwrite_each_other() -> None:
    """struct bpftune_event's update, str and raw_data share their bytes:
    packing one leaves it as set (the others are written only when set)."""
    update = bindings.BpftunableUpdate(id=7, old=(1, 2, 3), new=(4, 5, 6))
    event = bindings.BpftuneEvent(tuner_id=3, update=(update,))
    assert bindings.BpftuneEvent.unpack(event.pack()).update[0] == update
    assert bindings.BpftuneEvent.unpack(bindings.BpftuneEvent(str="hello").pack()).str == "hello"
