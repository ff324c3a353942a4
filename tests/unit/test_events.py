"""The event layout Python reads is the one the shared header defines."""

from __future__ import annotations

from pybpftune import libbpf
from pybpftune.events import HEADER_SIZE, MAX_COOKIE, Event, Update, cookie_text


def test_event_is_bpftune_compatible_size() -> None:
    assert libbpf.EVENT_SIZE == 248
    assert HEADER_SIZE == 24
    assert libbpf.struct_size("struct bpftunable_update") == 56


def test_synthetic_event_round_trips() -> None:
    upd = Update(1, (4096, 131072, 6291456), (4096, 131072, 7864320))
    ev = Event.build(tuner_id=3, scenario_id=0, netns_cookie=4097, pid=42, updates=[upd])
    assert (ev.tuner_id, ev.scenario_id, ev.netns_cookie, ev.pid) == (3, 0, 4097, 42)
    assert ev.update(0) == upd
    assert len(ev.data) == libbpf.EVENT_SIZE


def test_text_payload_is_nul_terminated() -> None:
    ev = Event.build(tuner_id=0, scenario_id=0, text="ipv4/tcp_rmem")
    assert ev.text == "ipv4/tcp_rmem"


def test_short_record_is_padded_not_misread() -> None:
    ev = Event(bytes([5, 0, 0, 0]))
    assert ev.tuner_id == 5
    assert ev.scenario_id == 0


def test_payload_views_shared_struct() -> None:
    raw = (7).to_bytes(8, "little") + (0xABC).to_bytes(8, "little") + (9).to_bytes(8, "little")
    ev = Event.build(tuner_id=1, scenario_id=7, raw=raw)
    payload = ev.payload("struct pybpftune_test_payload")
    assert (payload.seq, payload.magic, payload.value) == (7, 0xABC, 9)


def test_a_kernel_address_is_never_a_cookie() -> None:
    """A BPF form that reads a cookie from the wrong memory (once the sysctl
    tuner, for sysctls of no namespace) must not pass a kernel address on:
    the event says unknown, and so does its log text."""
    for bad in (18446744071607420768, 0xFFFF000000000000, MAX_COOKIE):
        ev = Event.build(tuner_id=0, scenario_id=0, netns_cookie=bad)
        assert ev.netns_cookie == libbpf.NETNS_UNKNOWN
        assert cookie_text(ev.netns_cookie) == "unknown" == cookie_text(bad)
    for good in (0, 1, 4097, MAX_COOKIE - 1):
        assert Event.build(tuner_id=0, scenario_id=0, netns_cookie=good).netns_cookie == good
        assert cookie_text(good) == str(good)
