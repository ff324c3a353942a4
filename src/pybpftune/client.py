"""`bpftune -q REQUEST`: ask a running daemon, print its reply.

Deliberately light (socket and the protocol constants only): a monitoring
agent may run it every few seconds.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from .errors import PybpftuneError
from .query import JSON_PREFIX, Reply, classify, parse_request

TIMEOUT_S = 10.0
# Far beyond any reply (10,000 changes as JSON are ~4 MiB): bounds a broken peer.
MAX_REPLY = 64 * 1024 * 1024


class NoDaemon(PybpftuneError):
    """Nothing answers where the daemon would listen."""


def request_bytes(request: str, as_json: bool) -> bytes:
    name = request.strip()
    if as_json and not name.startswith(JSON_PREFIX):
        name = JSON_PREFIX + name
    return name.encode("utf-8", errors="replace") + b"\0"


def query(request: str, *, socket_path: Path, port: int | None = None, as_json: bool = False) -> Reply:
    """Send one request (over loopback TCP when ``port`` is given, else the
    Unix socket) and return the reply."""
    data = request_bytes(request, as_json)
    sock = _connect_tcp(port) if port is not None else _connect_unix(socket_path)
    with sock:
        try:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    raise
                # The daemon refused us before reading: its reason is still there to read.
            reply = _receive(sock)
        except TimeoutError:
            raise PybpftuneError(f"the daemon did not answer within {TIMEOUT_S:.0f} s") from None
        except OSError as exc:
            raise PybpftuneError(f"the connection to the daemon failed: {exc.strerror or exc}") from None
    text = reply.rstrip(b"\0").decode("utf-8", errors="replace")
    if not text:
        raise PybpftuneError("the daemon closed the connection without a reply")
    return classify(text, parse_request(data).json)


def _receive(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            if chunks:
                break
            raise

        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_REPLY:
            raise PybpftuneError(f"the reply exceeds {MAX_REPLY >> 20} MiB; not a pybpftune daemon?")
        if chunk.endswith(b"\0"):  # bpftune's end of reply (it closes too)
            break
    return b"".join(chunks)


def _connect_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(TIMEOUT_S)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise NoDaemon(f"no pybpftune daemon is running (nothing listens on {path})") from None
    except PermissionError:
        sock.close()
        raise PybpftuneError(f"permission denied on {path}: only root may query the daemon") from None
    except OSError as exc:
        sock.close()
        raise PybpftuneError(f"cannot reach the daemon at {path}: {exc.strerror or exc}") from None
    return sock


def _connect_tcp(port: int) -> socket.socket:
    last: OSError | None = None
    for addr, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError as exc:
            last = exc
            continue
        sock.settimeout(TIMEOUT_S)
        try:
            sock.connect((addr, port))
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    if last is not None and last.errno in (errno.ECONNREFUSED, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        raise NoDaemon(f"no pybpftune daemon is running (nothing listens on loopback port {port})")
    reason = (last.strerror or str(last)) if last is not None else "no loopback address"
    raise PybpftuneError(f"cannot reach the daemon on loopback port {port}: {reason}")
