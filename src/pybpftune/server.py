"""The query server: the daemon's Unix socket and optional loopback TCP port.

Driven by the daemon's event loop with non-blocking sockets, so serving can
never stall tuning: a request is at most ``MAX_REQUEST`` bytes (more is
neither read nor buffered), every client has a deadline (a loop timer), at
most ``max_clients`` are served at once (others are closed on arrival), one
wake-up accepts at most ``ACCEPT_BATCH`` connections, and a reply is written
as the client takes it.  A client that connects and sends nothing, or sends
a megabyte, costs one socket until its deadline.

Only root may ask: on the Unix socket (mode 0600) the kernel's SO_PEERCRED
says who connected; on TCP, where the kernel records no peer credentials,
the client socket's owner is looked up with sock_diag (one exact-match
netlink request, no scan), and a peer that cannot be identified is refused.
Nothing here needs a capability once the sockets are bound.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import PybpftuneError
from .eventloop import EventLoop, Timer
from .resource import Resource

log = logging.getLogger("pybpftune.server")

# Defined here, not in query.py (which renders the replies and is imported
# only when the first request arrives): the daemon binds its socket before
# it loads anything, and the renderers need not be in memory by then.
# bpftune reads at most 80 bytes of a request; the longest name is far shorter.
MAX_REQUEST = 128
# The start of the reply to a client that may not ask.
REFUSED = "permission denied"

CLIENT_TIMEOUT_S = 5.0
MAX_CLIENTS = 16
ACCEPT_BATCH = 16
LISTEN_BACKLOG = 16
SEND_CHUNK = 64 * 1024
LOOPBACK = (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6))

Handler = Callable[[bytes], bytes]
Bind = Callable[[], socket.socket]


@dataclass
class _Client:
    sock: socket.socket
    transport: str
    inbuf: bytearray = field(default_factory=bytearray)
    out: memoryview | None = None
    timer: Timer | None = None


@dataclass
class Counters:
    served: int = 0
    refused: int = 0  # not root, or not identifiable
    busy: int = 0  # closed on arrival: max_clients were being served
    timed_out: int = 0


class QueryServer(Resource):
    """Listening sockets and their clients, all on one event loop."""

    def __init__(
        self,
        loop: EventLoop,
        handler: Handler,
        *,
        max_clients: int = MAX_CLIENTS,
        timeout: float = CLIENT_TIMEOUT_S,
        allowed_uids: frozenset[int] = frozenset({0}),
    ) -> None:
        self.loop = loop
        self.handler = handler
        self.max_clients = max_clients
        self.timeout = timeout
        self.allowed_uids = allowed_uids  # root; tests that run unprivileged add their own uid
        self.counters = Counters()
        self._listeners: dict[int, tuple[socket.socket, str, str]] = {}  # fd -> socket, transport, endpoint
        self._endpoints: dict[str, list[str]] = {}  # endpoint key -> addresses
        self._clients: dict[int, _Client] = {}
        self._closed = False

    # --- listening ---------------------------------------------------------------

    def listen_unix(self, bind: Bind, path: str) -> str:
        """Serve on a Unix socket that ``bind`` creates (the state directory's
        owner creates it: mode 0600, stale sockets removed); the endpoint's key."""
        key = f"unix:{path}"
        sock = bind()
        self._listen(sock, "unix", key)
        self._endpoints[key] = [path]
        return key

    def listen_tcp(self, port: int) -> str:
        """Serve on ``port`` of 127.0.0.1 and ::1 (where IPv6 exists), never
        on any other address; the endpoint's key."""
        key = f"tcp:{port}"
        bound: list[str] = []
        for addr, family in LOOPBACK:
            try:
                sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            except OSError as exc:  # no IPv6 in this kernel
                if exc.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
                    continue
                raise
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((addr, port))
            except OSError as exc:
                sock.close()
                if family == socket.AF_INET6 and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    continue  # IPv6 disabled, or ::1 not configured
                self.stop_listening(key)
                raise PybpftuneError(f"cannot serve queries on {addr} port {port}: {exc.strerror}") from None
            self._listen(sock, "tcp", key)
            bound.append(f"[{addr}]:{port}" if family == socket.AF_INET6 else f"{addr}:{port}")
        if not bound:
            raise PybpftuneError(f"cannot serve queries on port {port}: no loopback address")
        self._endpoints[key] = bound
        return key

    def _listen(self, sock: socket.socket, transport: str, key: str) -> None:
        sock.setblocking(False)
        sock.listen(LISTEN_BACKLOG)
        self._listeners[sock.fileno()] = (sock, transport, key)
        self.loop.add_reader(sock.fileno(), lambda: self._accept(sock, transport), f"query {transport} listener")

    def stop_listening(self, key: str) -> None:
        """Close one endpoint's listeners (clients being served finish)."""
        for fd, (sock, _transport, k) in list(self._listeners.items()):
            if k == key:
                self.loop.remove_reader(fd)
                sock.close()
                del self._listeners[fd]
        self._endpoints.pop(key, None)

    @property
    def addresses(self) -> list[str]:
        """What we listen on, for the log and status."""
        return [a for addrs in self._endpoints.values() for a in addrs]

    # --- clients -------------------------------------------------------------------

    def _accept(self, listener: socket.socket, transport: str) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ECONNABORTED, EMFILE, ...: the listener stays
                log.debug("accepting a query connection failed: %s", exc)
                return
            sock.setblocking(False)
            if len(self._clients) >= self.max_clients:
                self.counters.busy += 1
                sock.close()
                continue
            uid = peer_uid(sock, transport)
            if uid not in self.allowed_uids:
                self.counters.refused += 1
                who = "an unidentified peer" if uid is None else f"uid {uid}"
                log.debug("refusing a query from %s over %s", who, transport)
                _refuse(sock, f"{REFUSED}: only root may query this daemon\0".encode())
                continue
            client = _Client(sock, transport)
            self._clients[sock.fileno()] = client
            client.timer = self.loop.call_later(self.timeout, functools.partial(self._expire, client), "query deadline")
            self.loop.add_reader(sock.fileno(), functools.partial(self._read, client), "query client")

    def _read(self, c: _Client) -> None:
        try:
            data = c.sock.recv(MAX_REQUEST + 1 - len(c.inbuf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(c)
            return
        c.inbuf += data
        complete = not data or b"\0" in c.inbuf or b"\n" in c.inbuf or len(c.inbuf) > MAX_REQUEST
        if not complete:
            return
        self.loop.remove_reader(c.sock.fileno())
        try:
            reply = self.handler(bytes(c.inbuf))
        except Exception as exc:  # a bug in a renderer must not take the daemon down
            log.error("answering a query failed: %r", exc)
            reply = f"error: {exc!r}\n".encode()
        self.counters.served += 1
        c.out = memoryview(reply + b"\0")
        self.loop.add_writer(c.sock.fileno(), functools.partial(self._write, c), "query client")

    def _write(self, c: _Client) -> None:
        assert c.out is not None
        try:
            sent = c.sock.send(c.out[:SEND_CHUNK])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(c)
            return
        c.out = c.out[sent:]
        if not len(c.out):
            self._drop(c)

    def _expire(self, c: _Client) -> None:
        if c.sock.fileno() in self._clients:
            self.counters.timed_out += 1
            log.debug("query client over %s timed out after %.0f s", c.transport, self.timeout)
            self._drop(c, cancel=False)

    def _drop(self, c: _Client, cancel: bool = True) -> None:
        fd = c.sock.fileno()
        if fd < 0 or self._clients.get(fd) is not c:
            return
        del self._clients[fd]
        self.loop.remove_reader(fd)
        if cancel and c.timer is not None:
            c.timer.cancel()
        c.sock.close()

    @property
    def clients(self) -> int:
        return len(self._clients)

    # --- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close every client and listener.  Safe to repeat."""
        if self._closed:
            return
        self._closed = True
        for c in list(self._clients.values()):
            self._drop(c)
        for key in list(self._endpoints):
            self.stop_listening(key)


def _refuse(sock: socket.socket, why: bytes) -> None:
    """Say why and close.  The request already queued is read first (at most
    MAX_REQUEST bytes, without waiting): closing over unread bytes would
    reset the connection and could take the reason with it."""
    try:
        sock.send(why)
        sock.recv(MAX_REQUEST + 1)
    except OSError:
        pass
    sock.close()


# --- who is asking --------------------------------------------------------------------------

_UCRED = struct.Struct("iII")  # pid, uid, gid


def peer_uid(sock: socket.socket, transport: str) -> int | None:
    """The uid of the process at the other end, or None if unknown."""
    try:
        if transport == "unix":
            _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            return int(uid)
        return tcp_peer_uid(sock)
    except OSError:
        return None


NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid:
# sport, dport (network order), src[16], dst[16], if, cookie[2]
_REQ_HEAD = struct.Struct("=BBBxI")
_PORTS = struct.Struct(">HH")
_REQ_TAIL = struct.Struct("=III")
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires,
# rqueue, wqueue, uid, inode
_MSG_UID_OFFSET = 4 + 48 + 12


def _addr_bytes(family: int, addr: str) -> bytes:
    packed = socket.inet_pton(family, addr)
    return packed.ljust(16, b"\0")


def tcp_peer_uid(sock: socket.socket) -> int | None:
    """Owner of the client end of an accepted loopback TCP connection.

    One exact-match sock_diag request (SOCK_DIAG_BY_FAMILY without dump)
    for the client's socket (its address and port as source, ours as
    destination): the kernel looks it up by hash and answers with its uid."""
    family = sock.family
    peer_addr, peer_port = sock.getpeername()[:2]
    our_addr, our_port = sock.getsockname()[:2]
    req = (
        _REQ_HEAD.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF)  # any state
        + _PORTS.pack(peer_port, our_port)
        + _addr_bytes(family, peer_addr)
        + _addr_bytes(family, our_addr)
        + _REQ_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )
    msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + req
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(0.5)
        nl.send(msg)
        data = nl.recv(8192)
    if len(data) < _NLMSGHDR.size:
        return None
    _length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data)
    if mtype != SOCK_DIAG_BY_FAMILY:
        if mtype == NLMSG_ERROR and len(data) >= _NLMSGHDR.size + 4:
            err = -struct.unpack_from("=i", data, _NLMSGHDR.size)[0]
            log.debug("sock_diag cannot find the query peer: %s", os.strerror(err))
        return None
    offset = _NLMSGHDR.size + _MSG_UID_OFFSET
    if len(data) < offset + 4:
        return None
    return int(struct.unpack_from("=I", data, offset)[0])
