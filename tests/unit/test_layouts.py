"""Layouts read from the shared header: Python names a type, never its fields."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pybpftune import bindings, libbpf
from pybpftune._libbpf import ffi, lib
from pybpftune.bpf import object_path
from pybpftune.errors import LayoutError
from pybpftune.objects import MapView, OpenObject, TypedMap

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
    assert libbpf.sizeof(type_name) == ffi.sizeof(type_name)
    assert libbpf.struct_size(type_name) == libbpf.sizeof(type_name)


def test_unknown_types_are_named() -> None:
    with pytest.raises(LayoutError, match="struct nope"):
        libbpf.sizeof("struct nope")
    with pytest.raises(LayoutError, match="not an enum"):
        libbpf.enum_members("struct corr")
    with pytest.raises(LayoutError, match="not a struct"):
        libbpf.struct_field_names("__u32")


def test_pack_and_unpack_round_trip() -> None:
    key = libbpf.pack("struct corr_key", tuner_id=3, id=1, netns_cookie=2**64 - 1)
    assert len(key) == libbpf.sizeof("struct corr_key")
    assert libbpf.unpack("struct corr_key", key) == {"tuner_id": 3, "id": 1, "netns_cookie": 2**64 - 1}
    assert libbpf.struct_field_names("struct corr_key") == ["tuner_id", "id", "netns_cookie"]


def test_nested_arrays_are_sequences() -> None:
    values = [-1, 2, 3]
    raw = libbpf.pack("struct bpftunable_update", id=7, old=values, new=[4])
    got = libbpf.unpack("struct bpftunable_update", raw)
    pad = [0] * (libbpf.MAX_VALUES - 3)
    assert got == {"id": 7, "pad": 0, "old": [*values, *pad], "new": [4, 0, 0, *pad]}
    assert libbpf.pack("struct bpftunable_update", **got) == raw


def test_an_events_union_members_are_fields() -> None:
    """The anonymous payload union of struct bpftune_event reads as fields
    (all at one offset); char arrays read as bytes up to their NUL."""
    raw = libbpf.pack("struct bpftune_event", tuner_id=2, scenario_id=5, str=b"net.ipv4.tcp_rmem")
    event = libbpf.unpack("struct bpftune_event", raw)
    assert (event["tuner_id"], event["scenario_id"], event["str"]) == (2, 5, b"net.ipv4.tcp_rmem")
    assert bytes(event["raw_data"][:3]) == b"net"


def test_scalars_and_arrays_encode_too() -> None:
    assert libbpf.encode("__u32", 5) == (5).to_bytes(4, "little")
    assert libbpf.decode("__u32", (5).to_bytes(4, "little")) == 5
    assert libbpf.decode("__s64[2]", libbpf.encode("__s64[2]", [-1, 1])) == [-1, 1]


@pytest.mark.parametrize("size_delta", [-1, 1])
def test_bad_sizes_are_refused(size_delta: int) -> None:
    size = libbpf.sizeof("struct bpftune_sample")
    with pytest.raises(LayoutError, match=f"24 bytes, got {size + size_delta}"):
        libbpf.unpack("struct bpftune_sample", bytes(size + size_delta))


def test_bad_values_are_refused() -> None:
    with pytest.raises(LayoutError, match="no field 'nope'"):
        libbpf.pack("struct corr_key", nope=1)
    with pytest.raises(LayoutError, match="does not fit"):
        libbpf.pack("struct corr_key", tuner_id=2**32)
    with pytest.raises(LayoutError, match="does not fit"):
        libbpf.pack("struct bpftunable_update", old=[0] * (libbpf.MAX_VALUES + 1))
    assert issubclass(LayoutError, ValueError)


def test_enum_members_are_the_headers() -> None:
    algs = libbpf.enum_members("enum tcp_conn_alg")
    assert algs["TCP_CONN_ALG_BBR"] == lib.TCP_CONN_ALG_BBR
    assert algs["TCP_CONN_ALG_OTHER"] == lib.TCP_CONN_ALG_OTHER
    assert list(algs.values()) == sorted(algs.values())


class DictMap(MapView):
    """A MapView over a dict: what TypedMap does, without a kernel map."""

    def __init__(self, key_size: int, value_size: int) -> None:
        super().__init__("bpftune_test", -1, key_size, value_size)
        self.data: dict[bytes, bytes] = {}

    def __getitem__(self, key: bytes) -> bytes:
        return self.data[self._key(key)]

    def __setitem__(self, key: bytes, value: bytes) -> None:
        assert len(value) == self.value_size
        self.data[self._key(key)] = value

    def __delitem__(self, key: bytes) -> None:
        del self.data[self._key(key)]

    def __iter__(self) -> Iterator[bytes]:
        return iter(list(self.data))


def test_typed_map_packs_keys_and_values() -> None:
    raw = DictMap(bindings.CorrKey.SIZE, bindings.Corr.SIZE)
    corr = TypedMap(raw, bindings.CorrKey, bindings.Corr)
    key = bindings.CorrKey(tuner_id=1, id=2, netns_cookie=3)
    corr[key] = bindings.Corr(n=4, sum_x=5)
    assert raw.data == {
        libbpf.pack("struct corr_key", tuner_id=1, id=2, netns_cookie=3): libbpf.pack("struct corr", n=4, sum_x=5)
    }
    assert corr[key].n == 4 and corr[key].sum_xy == 0
    assert list(corr) == [key] and len(corr) == 1
    del corr[key]
    assert not raw.data


def test_typed_map_sizes_must_match_the_map() -> None:
    raw = DictMap(bindings.CorrKey.SIZE, bindings.Corr.SIZE)
    with pytest.raises(LayoutError, match="value is 48 bytes, BpftuneSample is 24"):
        TypedMap(raw, bindings.CorrKey, bindings.BpftuneSample)


def test_struct_globals_read_through_the_header() -> None:
    with OpenObject.from_path(object_path("ip_frag_tuner")) as obj:
        assert obj.global_struct("rx_sample", bindings.BpftuneSample) == bindings.BpftuneSample(count=0, ts=0, rate=0)
        with pytest.raises(LayoutError, match="global rx_sample is 24 bytes, CorrKey is 16"):
            obj.global_struct("rx_sample", bindings.CorrKey)
