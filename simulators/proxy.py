"""A loopback HTTP CONNECT proxy, as a city network puts in front of the ESB: it opens a TCP tunnel to the host
and port a client names and then only copies bytes, so TLS (and the client certificate) run end to end through
it. It records every CONNECT it was asked for, can demand credentials (407) and can refuse every tunnel (403),
so tests can assert that a message went through the proxy, or that none went past a refusing one.
"""

from __future__ import annotations

import base64
import selectors
import socket
import socketserver
import threading
from dataclasses import dataclass

from simulators.serving import ServedInBackground

HEAD_LIMIT = 16 * 1024  # bytes of a CONNECT request's head; a real one is a few hundred
IDLE_TIMEOUT = 30.0     # seconds a tunnel may carry nothing before the proxy closes it
KEEP_BYTES = 256 * 1024  # of what clients sent through the tunnels, for tests to look at


@dataclass(frozen=True)
class Connect:
    target: str                # host:port as the client asked for it
    authorization: str         # the Proxy-Authorization header, "" if none
    status: int                # what the proxy answered: 200 tunnel, 403 refused, 407 credentials wanted...


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        proxy = self.server.proxy
        client: socket.socket = self.request
        client.settimeout(IDLE_TIMEOUT)
        head = _read_head(client)
        if head is None:
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if len(parts) != 3 or parts[0] != "CONNECT":
            _answer(client, 405, "Method Not Allowed")
            return
        target = parts[1]
        authorization = headers.get("proxy-authorization", "")
        status = proxy._verdict(authorization)
        proxy._record(Connect(target, authorization, status))
        if status != 200:
            _answer(client, status, {403: "Forbidden", 407: "Proxy Authentication Required"}.get(status, "Refused"),
                    extra="Proxy-Authenticate: Basic realm=\"esb\"\r\n" if status == 407 else "")
            return
        host, _, port = target.rpartition(":")
        try:
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
        except (OSError, ValueError):
            _answer(client, 502, "Bad Gateway")
            return
        with upstream:
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            proxy._tunnel_opened()
            _pump(client, upstream, proxy)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, proxy: ConnectProxy):
        self.proxy = proxy
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hung up mid-tunnel; never a traceback in the test output


def _read_head(sock: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(4096)
        except OSError:
            return None
        if not chunk or len(data) + len(chunk) > HEAD_LIMIT:
            return None
        data += chunk
    return data.split(b"\r\n\r\n", 1)[0]


def _answer(sock: socket.socket, status: int, reason: str, extra: str = "") -> None:
    try:
        sock.sendall(f"HTTP/1.1 {status} {reason}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
                     .encode())
    except OSError:
        pass


def _pump(client: socket.socket, upstream: socket.socket, proxy: ConnectProxy) -> None:
    """Copy bytes both ways until either side closes, the tunnel idles out or the proxy stops."""
    selector = selectors.DefaultSelector()
    selector.register(client, selectors.EVENT_READ, upstream)
    selector.register(upstream, selectors.EVENT_READ, client)
    idle = 0.0
    try:
        while not proxy._stopping.is_set() and idle < IDLE_TIMEOUT:
            events = selector.select(timeout=0.2)
            if not events:
                idle += 0.2
                continue
            idle = 0.0
            for key, _ in events:
                try:
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    if key.fileobj is client:
                        proxy._carried(data)
                    key.data.sendall(data)
                except OSError:
                    return
    finally:
        selector.close()


class ConnectProxy(ServedInBackground):
    """CONNECT proxy on loopback. Bound at construction, so `url` is known before start().

    credentials: ("user", "password") to demand Basic proxy authentication (407 without it or with others).
    refuse: answer every CONNECT with 403, opening no tunnel.
    """

    def __init__(self, *, host: str = "127.0.0.1", credentials: tuple[str, str] | None = None,
                 refuse: bool = False):
        self.refuse = refuse
        self._expected = ("Basic " + base64.b64encode(":".join(credentials).encode()).decode()
                          if credentials else None)
        self._lock = threading.Lock()
        self._connects: list[Connect] = []
        self.tunnels = 0  # tunnels opened (CONNECTs answered 200)
        self._from_clients = bytearray()  # the first KEEP_BYTES clients sent through the tunnels
        self._stopping = threading.Event()
        self._server = _Server((host, 0), self)
        self._thread: threading.Thread | None = None
        bound_host, bound_port = self._server.server_address[:2]
        self.address = f"{bound_host}:{bound_port}"
        self.url = f"http://{self.address}"

    @property
    def connects(self) -> list[Connect]:
        """Every CONNECT asked for, in order (a snapshot)."""
        with self._lock:
            return list(self._connects)

    @property
    def carried(self) -> bytes:
        """The start of what clients sent through the tunnels (all tunnels, in arrival order)."""
        with self._lock:
            return bytes(self._from_clients)

    def _carried(self, data: bytes) -> None:
        with self._lock:
            self._from_clients += data[:max(0, KEEP_BYTES - len(self._from_clients))]

    def _verdict(self, authorization: str) -> int:
        if self.refuse:
            return 403
        if self._expected is not None and authorization != self._expected:
            return 407
        return 200

    def _record(self, connect: Connect) -> None:
        with self._lock:
            self._connects.append(connect)

    def _tunnel_opened(self) -> None:
        with self._lock:
            self.tunnels += 1
