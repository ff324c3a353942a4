"""tcp_conn rules: the cost function and its companions, ids, the allowed list."""

from __future__ import annotations

import logging
from typing import ClassVar

import pytest

from pybpftune.bindings import TcpConnAlg, TcpConnEvent, TcpConnNsKey, TcpConnReason, TcpConnScenario
from pybpftune.events import Event
from pybpftune.store import TunableStore
from pybpftune.sysctl import MemorySysctl
from pybpftune.testing import TunerHarness
from pybpftune.tuner import MapUpdate
from pybpftune.tuners import tcp_conn as tc
from pybpftune.tuners.tcp_conn import TcpConnTuner

M = tc.COST_SCALE


def test_algorithms_are_named_as_the_kernel_names_them() -> None:
    assert tc.ALGS == ("cubic", "bbr", "htcp", "dctcp")
    assert tc.MODULES["bbr"] == "tcp_bbr"


@pytest.mark.parametrize(
    ("retrans", "segs", "exceeded"),
    [
        (0, 0, False),
        (1, 0, False),
        (1, 14, False),
        (2, 63, True),
        (2, 128, False),
        (3, 128, True),
        (15, 1000, False),
        (16, 1000, True),
    ],
)
def test_loss_rule_is_more_than_one_in_64(retrans: int, segs: int, exceeded: bool) -> None:
    assert tc.loss_exceeded(retrans, segs) is exceeded


def test_cost_is_zero_for_the_hosts_best_connection() -> None:
    assert tc.cost(1000, 1000, 5_000_000, 5_000_000) == 0


def test_cost_rtt_term_is_relative_excess_over_the_minimum() -> None:
    assert tc.cost(2000, 1000, 10, 10) == M  # twice the best RTT: one unit
    assert tc.cost(1500, 1000, 10, 10) == M // 2


def test_cost_rate_term_is_relative_shortfall_from_the_best_rate() -> None:
    assert tc.cost(1000, 1000, 250, 1000) == 3 * M // 4
    assert tc.cost(1000, 1000, 0, 1000) == M


def test_cost_terms_add_and_the_rtt_term_is_capped() -> None:
    assert tc.cost(3000, 1000, 500, 1000) == 2 * M + M // 2
    assert tc.cost(10**9, 1, 1000, 1000) == tc.RTT_TERM_MAX


def test_cost_without_host_history_is_zero() -> None:
    assert tc.cost(5000, 0, 100, 0) == 0


def test_cost_uses_the_connections_own_rate_not_the_algorithms_best() -> None:
    """bpftune PR #139: an algorithm whose best connection matched the host's
    best would cost 0 forever under a per-algorithm maximum; with the
    connection's own rate a slow connection costs what it cost."""
    host_best = 1_000_000
    slow_connection = 100_000
    assert tc.cost(1000, 1000, slow_connection, host_best) == 900_000


def test_rl_update_takes_the_first_sample_then_steps_a_quarter() -> None:
    assert tc.rl_update(0, 0, 800, 2) == 800
    assert tc.rl_update(800, 1, 0, 2) == 600
    assert tc.rl_update(600, 2, 1000, 2) == 700
    assert tc.rl_update(700, 3, 700, 2) == 700


def test_delivery_rate_in_bytes_per_second() -> None:
    assert tc.delivery_rate(10, 1448, 1000) == 14_480_000
    assert tc.delivery_rate(10, 1448, 0) == 0


def test_pick_prefers_never_measured_then_lowest_metric() -> None:
    mask = 0b11  # cubic, bbr
    assert tc.pick([500, 0, 0, 0], [3, 0, 0, 0], mask, 0) == 1  # bbr untried counts as 0
    assert tc.pick([500, 300, 0, 0], [3, 3, 0, 0], mask, 0) == 1
    assert tc.pick([200, 300, 0, 0], [3, 3, 0, 0], mask, 1) == 0
    assert tc.pick([200, 300, 0, 0], [3, 3, 0, 0], 0b10, 0) == 1  # only bbr available
    assert tc.pick([0, 0, 0, 0], [0, 0, 0, 0], 0, 0) is None


def test_pick_breaks_ties_from_the_start_index() -> None:
    for start in range(4):
        assert tc.pick([7, 7, 7, 7], [1, 1, 1, 1], 0b1111, start) == start


def test_allowed_list_keeps_order_and_appends_missing() -> None:
    assert tc.allowed_with("reno bbr", ["cubic", "bbr"]) == "reno bbr cubic"
    assert tc.allowed_with("reno cubic bbr", ["cubic", "bbr"]) == "reno cubic bbr"
    assert tc.algorithm_mask(["bbr", "cubic", "reno"]) == 0b11
    assert tc.algorithm_mask(["reno", "bbr", "cubic", "htcp", "dctcp"]) == 0b1111


def test_choice_table_lists_algorithms_with_choices() -> None:
    chosen = [[0, 12, 0, 0], [3, 1, 0, 0], [1, 0, 0, 0]]
    lines = tc.choice_table(chosen)
    assert lines[0].split() == ["#", "CongAlg", "Loss", "Greedy", "Explore", "Total"]
    assert lines[1].split() == ["#", "cubic", "0", "3", "1", "4"]
    assert lines[2].split() == ["#", "bbr", "12", "1", "0", "13"]
    assert len(lines) == 3


def test_format_address_handles_v4_mapped_and_v6() -> None:
    assert tc.format_address(bytes(10) + b"\xff\xff" + bytes([192, 168, 168, 1])) == "192.168.168.1"
    assert tc.format_address(bytes.fromhex("fd000168000000000000000000000001")) == "fd00:168::1"


def make_tuner(
    allowed: str = "reno bbr", tuner_class: type[TcpConnTuner] = TcpConnTuner
) -> tuple[TcpConnTuner, MemorySysctl, TunableStore]:
    """cubic and bbr are available; no module is loaded (htcp and dctcp stay missing)."""
    loaded: list[str] = []
    h = TunerHarness.build(
        tuner_class,
        {"net.ipv4.tcp_thin_linear_timeouts": (0,)},
        texts={
            "net.ipv4.tcp_allowed_congestion_control": allowed,
            "net.ipv4.tcp_available_congestion_control": "reno bbr cubic",
            "net.ipv4.tcp_congestion_control": "bbr",
        },
        tuner_id=2,
        load_module=loaded.append,
    )
    return h.tuner, h.sysctls, h.store


THIN = {"net.ipv4.tcp_thin_linear_timeouts": (0,)}


def test_missing_algorithms_are_loaded_except_in_advice_mode() -> None:
    texts = {
        "net.ipv4.tcp_allowed_congestion_control": "reno cubic",
        "net.ipv4.tcp_available_congestion_control": "reno cubic",
        "net.ipv4.tcp_congestion_control": "cubic",
    }
    loaded: list[str] = []
    h = TunerHarness.build(TcpConnTuner, THIN, texts=texts, load_module=loaded.append)
    h.tuner.bpf_globals()
    assert loaded == ["tcp_bbr", "tcp_htcp", "tcp_dctcp"]
    assert h.tuner.available == ["cubic"]
    advice: list[str] = []
    h = TunerHarness.build(TcpConnTuner, THIN, texts=texts, load_module=advice.append)
    h.store.advice = True
    h.tuner.bpf_globals()
    assert advice == []


def test_start_allows_the_algorithms_and_stop_restores_the_list(caplog: pytest.LogCaptureFixture) -> None:
    tuner, backend, store = make_tuner()
    caplog.set_level(logging.INFO, logger="pybpftune")
    tuner.start()
    glob = tuner.ctx.namespaces.global_cookie
    assert backend.texts[(glob, "net.ipv4.tcp_allowed_congestion_control")] == "reno bbr cubic"
    assert "change net.ipv4.tcp_allowed_congestion_control from (reno bbr) -> (reno bbr cubic)" in caplog.text
    assert "# sysctl 'net.ipv4.tcp_allowed_congestion_control' changed from (reno bbr) -> (reno bbr cubic)" in (
        store.summary(tuner)
    )
    tuner.stop()
    store.release(tuner)  # the daemon, whenever a tuner stops: restore_on_stop tunables
    assert backend.texts[(glob, "net.ipv4.tcp_allowed_congestion_control")] == "reno bbr"
    assert [w[2] for w in backend.text_writes] == ["reno bbr cubic", "reno bbr"]


def test_start_leaves_a_complete_list_alone() -> None:
    tuner, backend, _store = make_tuner("reno cubic bbr")
    tuner.start()
    tuner.stop()
    assert backend.text_writes == []


def test_bpf_globals_carry_the_available_algorithms() -> None:
    tuner, _backend, _store = make_tuner()
    assert tuner.bpf_globals() == {"conn_algs_available": 0b11, "conn_thin_lto_sysctl": 0, "conn_advise_only": 0}


def test_advice_mode_sets_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """--advise: the sockops program is told to decide without setting, the
    allowed list is only advised, and the choice reported is advice."""
    tuner, backend, store = make_tuner()
    store.advice = True
    assert tuner.bpf_globals()["conn_advise_only"] == 1
    caplog.set_level(logging.INFO, logger="pybpftune")
    tuner.start()
    glob = tuner.ctx.namespaces.global_cookie
    assert backend.texts[(glob, "net.ipv4.tcp_allowed_congestion_control")] == "reno bbr"
    assert backend.text_writes == []
    assert 'Advice: sysctl -w net.ipv4.tcp_allowed_congestion_control="reno bbr cubic"' in caplog.text
    tuner.handle_event(loss_event(glob))
    assert "would change net.persock.tcp.congestion_control from (cubic) -> (bbr)" in caplog.text
    advice = {a.latest.tunable: a for a in store.history.advice()}
    assert advice["net.persock.tcp.congestion_control"].latest.command is None
    assert advice["net.persock.tcp.congestion_control"].latest.new == ("bbr",)


def loss_event(cookie: int) -> Event:
    payload = TcpConnEvent(
        reason=TcpConnReason.LOSS,
        old_alg=TcpConnAlg.CUBIC,
        new_alg=TcpConnAlg.BBR,
        total_retrans=3,
        segs_out=120,
        addr=bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1]),
    )
    return Event.build(2, TcpConnScenario.LOSS, netns_cookie=cookie, raw=payload.pack())


def test_loss_event_is_explained_in_bpftune_words(caplog: pytest.LogCaptureFixture) -> None:
    tuner, _backend, _store = make_tuner()
    caplog.set_level(logging.INFO, logger="pybpftune")
    tuner.handle_event(loss_event(tuner.ctx.namespaces.global_cookie))
    assert "Scenario 'loss rate exceeded threshold' occurred for tunable 'net.persock.tcp.congestion_control'" in (
        caplog.text
    )
    assert (
        "Due to loss rate exceeding 1/64 of segments sent (3 retransmits of 120 segments) on a connection to "
        f"10.0.0.1 (netns cookie {tuner.ctx.namespaces.global_cookie}) change "
        "net.persock.tcp.congestion_control from (cubic) -> (bbr)"
    ) in caplog.text


class SeesDisabled(TcpConnTuner):
    """Records the namespaces the store turns it off in."""

    seen: ClassVar[list[int]] = []

    def netns_disabled(self, netns_cookie: int) -> None:
        self.seen.append(netns_cookie)
        super().netns_disabled(netns_cookie)


def test_admin_write_in_a_namespace_reaches_the_tuner_hook() -> None:
    tuner, _backend, store = make_tuner(tuner_class=SeesDisabled)
    seen = SeesDisabled.seen = []
    store.disable(tuner, 4242, "pid 1, cmd 'sysctl' modified sysctl 'net.ipv4.tcp_congestion_control'")
    store.disable(tuner, 4242, "again")
    assert seen == [4242]
    assert store.netns_state(tuner, 4242) == "manual"
    assert store.netns_state(tuner, tuner.ctx.namespaces.global_cookie) == "active"


def test_a_namespace_turned_off_is_one_map_entry_keyed_by_its_cookie() -> None:
    assert tc.ns_off(4242) == MapUpdate("bpftune_ns_off", TcpConnNsKey(4242).pack(), b"\x01")
