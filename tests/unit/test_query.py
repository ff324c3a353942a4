"""The query protocol: parsing, bpftune's text layouts, valid JSON, and fuzz."""

from __future__ import annotations

import json
import random
import tracemalloc

import pytest

from pybpftune.history import Change, History
from pybpftune.query import (
    REQUESTS,
    DaemonInfo,
    Request,
    RollbackItem,
    SignalState,
    SummaryCount,
    TunableInfo,
    TunableValue,
    TunerState,
    answer,
    classify,
    parse_request,
)
from pybpftune.server import MAX_REQUEST


class FakeView:
    """What a daemon with a tcp_buffer and a tcp_conn tuner would say."""

    def __init__(self, advice: bool = False) -> None:
        self.history = History()
        self.advice = advice
        rmem = ((4096, 131072, 131072), (4096, 131072, 163840))
        cmd = 'ip netns exec blue sysctl -w net.ipv4.tcp_rmem="4096 131072 163840"'
        self.history.record(
            Change(1e9, "tcp_buffer", "net.ipv4.tcp_rmem", "need to increase TCP buffer size(s)", 4097, False, *rmem,
                   "need to increase max buffer size", advice, cmd)
        )  # fmt: skip
        self.history.record(
            Change(1e9 + 1, "tcp_conn", "net.persock.tcp.congestion_control", "specify bbr congestion control", 3,
                   True, ("cubic",), ("bbr",), "loss", advice, None)
        )  # fmt: skip

    def info(self) -> DaemonInfo:
        return DaemonInfo(
            "0.1.0",
            42,
            1e9,
            "legacy",
            "full",
            "pybpftune runs its full variant because tp_btf works",
            True,
            self.advice,
            4,
            None,
            limits="net.ipv4.tcp_rmem: netns floor -, cap 196608",
            events_received=10,
            events_dropped=1,
            events_malformed=2,
            events_unknown=3,
        )

    def tuner_states(self) -> list[TunerState]:
        return [
            TunerState(
                "tcp_buffer",
                "active",
                "",
                (
                    SignalState("rcv_space", "tracepoint", "tp_btf"),
                    SignalState("mem_pressure", "none", None, "fentry: no"),
                ),
                (
                    TunableInfo("net.ipv4.tcp_rmem", "integer", 3, True, True),
                    TunableInfo("net.ipv4.tcp_syncookies", "integer", 1, True, True),
                ),
            ),
            # The last tunable is not a sysctl: bpftune's jstatus breaks here.
            TunerState(
                "tcp_conn",
                "active",
                "",
                (SignalState("conn_tuner", "sockops", "sockops"),),
                (
                    TunableInfo("net.ipv4.tcp_allowed_congestion_control", "string", 1, False, True),
                    TunableInfo("net.persock.tcp.congestion_control", "integer", 1, True, False),
                ),
            ),
            TunerState("udp_buffer", "inactive", "switched off by the configuration"),
        ]

    def tunable_values(self) -> list[TunableValue]:
        return [
            TunableValue("tcp_buffer", "net.ipv4.tcp_rmem", (4096, 131072, 6291456)),
            TunableValue("tcp_buffer", "net.ipv4.tcp_syncookies", (1,)),
            TunableValue("tcp_conn", "net.ipv4.tcp_allowed_congestion_control", ("reno cubic bbr",)),
        ]

    def summary(self) -> tuple[list[str], list[SummaryCount]]:
        return (["# Summary: scenario 'x' occurred 2 times for tunable 'net.ipv4.tcp_rmem' in global ns. X"],
                [SummaryCount("tcp_buffer", "net.ipv4.tcp_rmem", "x", True, 2)])  # fmt: skip

    def rollback_items(self) -> list[RollbackItem]:
        return [
            RollbackItem("tcp_buffer", "net.ipv4.tcp_rmem", 3, True, (4096, 131072, 7864320), (4096, 131072, 6291456),
                         'sysctl -w net.ipv4.tcp_rmem="4096 131072 6291456"'),
            RollbackItem("tcp_buffer", "net.ipv4.tcp_rmem", 9, False, (1,), (2,), None),
        ]  # fmt: skip


def ask(text: str, view: FakeView | None = None) -> str:
    return answer(view or FakeView(), parse_request(text.encode() + b"\0"))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"status\0", Request("status")),
        (b"jstatus", Request("status", json=True)),
        (b"  tuners \n garbage", Request("tuners")),
        (b"summary\0rollback\0", Request("summary")),
        (b"jnope\0", Request("nope", json=True)),
        (b"statusx", Request("statusx")),  # bpftune matched prefixes; we match names
        (b"\xff\xfe\x01", Request("???")),
        (b"a" * 1000, Request("a" * 80 + "...")),
    ],
)
def test_parse_request(data: bytes, expected: Request) -> None:
    assert parse_request(data) == expected


def test_help_is_bpftune_layout() -> None:
    lines = ask("help").splitlines()
    assert len(lines) == len(REQUESTS)
    assert lines[0] == f"{'help':>20} {REQUESTS['help']:>40}"


def test_tuners_and_tunables_layouts() -> None:
    assert ask("tuners").splitlines() == [f"{'tcp_buffer':>20} {'active':>20}", f"{'tcp_conn':>20} {'active':>20}",
                                          f"{'udp_buffer':>20} {'inactive':>20}"]  # fmt: skip
    assert ask("tunables").splitlines()[0] == f"{'tcp_buffer':>16} {'net.ipv4.tcp_rmem':>50} {'integer':>8} {3:>2}"
    assert f"{'tcp_conn':>16} {'net.ipv4.tcp_allowed_congestion_control':>50} {'string':>8} {1:>2}" in ask("tunables")


def test_jtunables_is_bpftune_shape() -> None:
    got = json.loads(ask("jtunables"))
    assert got["tcp_buffer"]["net.ipv4.tcp_rmem"]["type"] == "integer"
    assert got["tcp_buffer"]["net.ipv4.tcp_rmem"]["num_values"] == 3
    assert got["udp_buffer"] == {}


def test_status_text_and_json() -> None:
    text = ask("status").splitlines()
    assert text[0] == f"{'tcp_buffer':>16} {'net.ipv4.tcp_rmem':>50} 4096 131072 6291456"
    assert text[2] == f'{"tcp_conn":>16} {"net.ipv4.tcp_allowed_congestion_control":>50} "reno cubic bbr"'
    assert "# events: 10 received, 1 dropped by the ring buffer, 2 malformed, 3 for an unknown tuner" in text
    assert "# tuner tcp_buffer: active; signals: rcv_space tracepoint, mem_pressure none" in text
    assert "# limits: net.ipv4.tcp_rmem: netns floor -, cap 196608" in text
    assert "# pybpftune 0.1.0 (pid 42), pybpftune runs its full variant because tp_btf works" in text
    got = json.loads(ask("jstatus"))
    # bpftune's shape: one value as a number, several as a list, text as a string ...
    assert got["tcp_buffer"] == {"net.ipv4.tcp_rmem": [4096, 131072, 6291456], "net.ipv4.tcp_syncookies": 1}
    assert got["tcp_conn"] == {"net.ipv4.tcp_allowed_congestion_control": "reno cubic bbr"}
    # ... and ours flat, so bpftune's PCP agent (tuner.sysctl -> number/list/string) reads it all.
    for tuner in got.values():
        assert all(isinstance(v, (int, str, list)) for v in tuner.values())
    own = got["pybpftune"]
    assert (own["events_received"], own["events_dropped"], own["events_malformed"], own["events_unknown"]) == (
        10,
        1,
        2,
        3,
    )
    assert own["tuner.tcp_buffer.signals"] == "rcv_space=tracepoint mem_pressure=none"
    assert own["support_level"] == "legacy" and own["variant"] == "full"


def test_summary_rollback_changes_advice() -> None:
    assert ask("summary").splitlines()[0] == "# Summary of changes made across all tuners:"
    rollback = ask("rollback").splitlines()
    assert rollback[0].startswith("# Summary of rollback operations needed")
    assert rollback[2] == 'sysctl -w net.ipv4.tcp_rmem="4096 131072 6291456"'
    assert rollback[4] == "# (no command: no path to that namespace is known)"
    changes = ask("changes").splitlines()
    assert "tcp_buffer 'need to increase TCP buffer size(s)' in non-global ns (cookie 4097): changed" in changes[0]
    assert changes[0].endswith("(4096 131072 131072) -> (4096 131072 163840) due to need to increase max buffer size")
    assert ask("advice") == "# no advice: the daemon is not in advice mode (see --advise)\n"
    advised = ask("advice", FakeView(advice=True)).splitlines()
    assert advised[1] == 'ip netns exec blue sysctl -w net.ipv4.tcp_rmem="4096 131072 163840"'
    assert advised[3].startswith("# (no command: tcp_conn sets net.persock.tcp.congestion_control itself")


@pytest.mark.parametrize("name", list(REQUESTS))
def test_every_request_has_valid_json(name: str) -> None:
    for view in (FakeView(), FakeView(advice=True)):
        json.loads(ask("j" + name, view))


def test_unknown_requests() -> None:
    text = ask("frobnicate")
    assert text.splitlines()[0] == "unknown request 'frobnicate'; supported requests are:"
    assert classify(text, False).error
    got = json.loads(ask("jfrobnicate"))
    assert got["error"] == "unknown request 'jfrobnicate'" and "status" in got["requests"]
    assert classify(ask("jfrobnicate"), True).error
    assert not classify(ask("status"), False).error


def test_fuzz_request_parser_and_answers() -> None:
    rng = random.Random(7)
    names = [n.encode() for n in REQUESTS] + [b"j" + n.encode() for n in REQUESTS]
    view = FakeView()
    for i in range(3000):
        if i % 2:
            data = rng.randbytes(rng.randint(0, 300))
        else:
            data = rng.choice(names)
            cut = rng.randrange(len(data) + 1)
            data = data[:cut] + rng.randbytes(rng.randint(0, 3)) + data[cut:]
        request = parse_request(data)
        assert len(request.name) <= 83
        reply = answer(view, request)
        if request.json:
            json.loads(reply)
        else:
            assert reply.isprintable() or "\n" in reply


def test_huge_request_costs_bounded_memory() -> None:
    data = b"s" * (64 << 20)
    tracemalloc.start()
    try:
        request = parse_request(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    assert not request.known and len(request.name) <= 83
    assert MAX_REQUEST < 1024
