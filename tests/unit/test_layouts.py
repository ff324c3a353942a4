"""Layouts read from the shared header: Python names a type, never its fields."""

from __future__ import annotations

import pytest

from pybpftune import bindings, libbpf
from pybpftune._libbpf import ffi, lib
from pybpftune.bpf import object_path
from pybpftune.errors import LayoutError
from pybpftune.objects import OpenObject, TypedMap
from pybpftune.testing import SyntheticMap

SHARED_TYPES = [
    "struct bpftune_event",
    "struct bpftunable_update",
    "struct bpftune_sample",
    "struct corr_key",
    "struct corr",
    "struct tcp_conn_host",
    "struct tcp_buffer_hold",
    "__u32",
    "__s64",
]


@pytest.mark.parametrize("type_name", SHARED_TYPES)
def test_sizes_are_clangs(type_name: str) -> None:
    assert libbpf.struct_size(type_name) == ffi.sizeof(type_name)


def test_unknown_types_are_named() -> None:
    with pytest.raises(LayoutError, match="struct nope"):
        libbpf.struct_size("struct nope")
    with pytest.raises(LayoutError, match="not an enum"):
        libbpf.enum_members("struct corr")
    with pytest.raises(LayoutError, match="not a struct"):
        libbpf.struct_field_names("__u32")
    assert issubclass(LayoutError, ValueError)


def test_field_names_are_the_headers() -> None:
    assert libbpf.struct_field_names("struct corr_key") == ["tuner_id", "id", "netns_cookie"]


def test_an_events_union_members_are_fields() -> None:
    """The anonymous payload union of struct bpftune_event reads as fields
    (all at one offset)."""
    raw = bindings.BpftuneEvent(tuner_id=2, scenario_id=5, str="net.ipv4.tcp_rmem").pack()
    event = bindings.BpftuneEvent.unpack(raw)
    assert (event.tuner_id, event.scenario_id, event.str) == (2, 5, "net.ipv4.tcp_rmem")
    assert event.raw_data[:3] == b"net"


def test_enum_members_are_the_headers() -> None:
    algs = libbpf.enum_members("enum tcp_conn_alg")
    assert algs["TCP_CONN_ALG_BBR"] == lib.TCP_CONN_ALG_BBR
    assert algs["TCP_CONN_ALG_OTHER"] == lib.TCP_CONN_ALG_OTHER
    assert list(algs.values()) == sorted(algs.values())


def _c_bytes(c_type: str, **fields: int) -> bytes:
    """The C layout of a struct, laid out by cffi (not by the bindings under test)."""
    return bytes(ffi.buffer(ffi.new(f"{c_type} *", fields)))


def test_typed_map_packs_keys_and_values() -> None:
    raw = SyntheticMap("bpftune_test", bindings.CorrKey, bindings.Corr)
    corr = TypedMap(raw, bindings.CorrKey, bindings.Corr)
    key = bindings.CorrKey(tuner_id=1, id=2, netns_cookie=3)
    corr[key] = bindings.Corr(n=4, sum_x=5)
    assert raw.data == {
        _c_bytes("struct corr_key", tuner_id=1, id=2, netns_cookie=3): _c_bytes("struct corr", n=4, sum_x=5)
    }
    assert corr[key].n == 4 and corr[key].sum_xy == 0
    assert list(corr) == [key] and len(corr) == 1
    del corr[key]
    assert not raw.data


def test_typed_map_sizes_must_match_the_map() -> None:
    raw = SyntheticMap("bpftune_test", bindings.CorrKey, bindings.Corr)
    with pytest.raises(LayoutError, match="value is 48 bytes, BpftuneSample is 24"):
        TypedMap(raw, bindings.CorrKey, bindings.BpftuneSample)


def test_struct_globals_read_through_the_header() -> None:
    with OpenObject.from_path(object_path("ip_frag_tuner")) as obj:
        assert obj.global_struct("rx_sample", bindings.BpftuneSample) == bindings.BpftuneSample(count=0, ts=0, rate=0)
        with pytest.raises(LayoutError, match="global rx_sample is 24 bytes, CorrKey is 16"):
            obj.global_struct("rx_sample", bindings.CorrKey)
