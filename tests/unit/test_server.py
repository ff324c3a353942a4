"""The query server on real sockets (no root needed): limits, deadlines, peers.

The event loop runs in a thread, as the daemon's would run its one loop;
clients are plain sockets in the test's thread.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pybpftune.client import NoDaemon, query
from pybpftune.errors import PybpftuneError
from pybpftune.eventloop import EventLoop
from pybpftune.server import QueryServer
from pybpftune.state import StateDir

ME = frozenset({os.getuid()})


def echo(data: bytes) -> bytes:
    return b"you said " + data.split(b"\0")[0]


@contextmanager
def serving(tmp_path: Path, **kwargs: object) -> Iterator[tuple[QueryServer, Path, list[bytes]]]:
    state = StateDir(tmp_path / "state")
    path = state.default_socket
    seen: list[bytes] = []

    def handler(data: bytes) -> bytes:
        seen.append(data)
        return echo(data)

    loop = EventLoop()
    server = QueryServer(loop, handler, allowed_uids=kwargs.pop("allowed_uids", ME), **kwargs)  # type: ignore[arg-type]
    server.listen_unix(lambda: state.bind_socket(path), str(path))
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        yield server, path, seen
    finally:
        loop.call_later(0, loop.stop)
        loop.stop()
        thread.join(5)
        server.close()
        state.remove_socket(path)
        loop.close()


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything until end of stream, or until a reset (a server that closes
    with our unread bytes still queued resets the connection after its reply)."""
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def test_a_request_gets_its_reply_and_the_socket_is_private(tmp_path: Path) -> None:
    with serving(tmp_path) as (_server, path, _seen):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        reply = query("status", socket_path=path)
        assert reply.text == "you said status" and not reply.error
        assert query("status", socket_path=path, as_json=True).text == "you said jstatus"
    assert not path.exists(), "the socket is removed on close"


def test_a_silent_client_costs_nothing_and_is_cut_off(tmp_path: Path) -> None:
    with serving(tmp_path, timeout=0.5) as (server, path, _seen):
        silent = connect(path)
        t0 = time.monotonic()
        assert query("tuners", socket_path=path).text == "you said tuners"
        assert time.monotonic() - t0 < 0.4, "a silent client delays nobody"
        assert read_all(silent) == b"", "closed at its deadline, with no reply"
        assert 0.4 < time.monotonic() - t0 < 3
        assert server.counters.timed_out == 1
        silent.close()


def test_a_megabyte_is_neither_read_nor_buffered(tmp_path: Path) -> None:
    with serving(tmp_path) as (_server, path, seen):
        s = connect(path)
        try:
            s.sendall(b"x" * (1 << 20))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending
        reply = read_all(s)
        s.close()
        assert reply.startswith(b"you said xxx")
        assert len(seen) == 1 and len(seen[0]) <= 129


def test_more_clients_than_the_cap_are_closed_on_arrival(tmp_path: Path) -> None:
    with serving(tmp_path, max_clients=2, timeout=2) as (server, path, _seen):
        held = [connect(path), connect(path)]
        time.sleep(0.2)
        extra = connect(path)
        assert read_all(extra) == b""
        assert server.counters.busy == 1
        for s in held:
            s.sendall(b"help\0")
            assert read_all(s) == b"you said help\0"
            s.close()
        assert query("help", socket_path=path).text == "you said help", "slots free up again"


def test_a_peer_that_is_not_allowed_is_refused(tmp_path: Path) -> None:
    with serving(tmp_path, allowed_uids=frozenset({os.getuid() + 1})) as (server, path, seen):
        reply = query("status", socket_path=path)
        assert reply.error and reply.text == "permission denied: only root may query this daemon"
        assert seen == [] and server.counters.refused == 1


def test_a_second_server_does_not_take_over_a_live_socket(tmp_path: Path) -> None:
    with serving(tmp_path) as (_server, path, _seen):
        with pytest.raises(PybpftuneError, match="another pybpftune daemon is serving queries"):
            StateDir(tmp_path / "state").bind_socket(path)
        assert query("help", socket_path=path).text == "you said help"


def test_a_stale_socket_is_replaced_and_a_missing_daemon_is_one_line(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(state.default_socket))
    stale.close()  # the file stays, nobody listens: a daemon that was killed
    with pytest.raises(NoDaemon, match="no pybpftune daemon is running"):
        query("status", socket_path=state.default_socket)
    state.bind_socket(state.default_socket).close()
    state.remove_socket(state.default_socket)
    assert not state.default_socket.exists()
    with pytest.raises(NoDaemon, match="no pybpftune daemon is running"):
        query("status", socket_path=state.default_socket)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_listens_on_loopback_only_and_checks_the_peer(tmp_path: Path) -> None:
    port = free_port()
    with serving(tmp_path) as (server, _path, _seen):
        key = server.listen_tcp(port)
        listeners = [sock.getsockname()[0] for sock, _t, k in server._listeners.values() if k == key]
        assert set(listeners) <= {"127.0.0.1", "::1"} and "127.0.0.1" in listeners
        assert query("tuners", socket_path=Path("/nonexistent"), port=port).text == "you said tuners"
        server.stop_listening(key)
        with pytest.raises(NoDaemon, match=f"nothing listens on loopback port {port}"):
            query("tuners", socket_path=Path("/nonexistent"), port=port)
