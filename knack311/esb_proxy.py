"""ESB_PROXY: an explicit HTTP CONNECT proxy on the way to the ESB.

The ESB client ignores HTTPS_PROXY and the like on purpose (only our own settings decide whom we trust and where
a message goes), so a network that reaches the ESB only through a proxy names it here. The proxy only opens a
TCP tunnel: TLS, our client certificate and the verification of the ESB's certificate run end to end through
it, and the proxy sees nothing but the ESB's host and port. Its credentials (http://user:password@host:port)
go in the CONNECT request's Proxy-Authorization header and are never printed.
"""

from __future__ import annotations

import base64
import http.client
import re
import socket
from urllib.parse import unquote, urlsplit

from .errors import ConfigError

_WANTED = "ESB_PROXY must be an http://host:port CONNECT proxy (http://user:password@host:port with credentials)"
_TUNNEL_REFUSED = re.compile(r"Tunnel connection failed: (\d{3})\s*(.*)")


def esb_proxy_setting(value: str) -> str:
    """ESB_PROXY as the ESB client takes it ("" when unset); ConfigError for anything else than an http:// URL
    with a host and a port. The value is never echoed when it holds credentials."""
    value = value.strip()
    if not value:
        return ""
    shown = "(not shown: it holds credentials)" if "@" in value else repr(value[:100])
    if any(not c.isprintable() or c.isspace() for c in value):
        raise ConfigError(f"{_WANTED}, without spaces or control characters; ESB_PROXY is {shown}")
    try:
        parts = urlsplit(value)
        port = parts.port  # raises for a port that is not a number or out of range
    except ValueError:
        raise ConfigError(f"{_WANTED}: its port must be a number from 1 to 65535; ESB_PROXY is {shown}") from None
    if parts.scheme != "http":
        scheme = "" if "@" in value else f", not {parts.scheme or 'no'} scheme"  # a user name is no one's business
        raise ConfigError(f"{_WANTED} (the TLS to the ESB runs inside the tunnel, so the proxy itself is "
                          f"reached over plain http://){scheme}; ESB_PROXY is {shown}")
    if not parts.hostname or not port:
        raise ConfigError(f"{_WANTED}: it needs a host and a port; ESB_PROXY is {shown}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{_WANTED}, without a path, query or fragment; ESB_PROXY is {shown}")
    return value


def proxy_address(proxy: str) -> str:
    """host:port of the proxy, for lines and the check: never its credentials."""
    parts = urlsplit(proxy)
    host = parts.hostname or ""
    return f"[{host}]:{parts.port}" if ":" in host else f"{host}:{parts.port}"


def proxy_authorization(proxy: str) -> dict[str, str]:
    """The Proxy-Authorization header for a proxy URL with credentials ({} without)."""
    parts = urlsplit(proxy)
    if parts.username is None:
        return {}
    pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    return {"Proxy-Authorization": "Basic " + base64.b64encode(pair.encode("latin-1", "replace")).decode()}


class TunnelRefused(OSError):
    """The proxy answered the CONNECT with something else than 200."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"HTTP {status} {reason}".strip())
        self.status = status
        self.reason = reason


def open_tunnel(proxy: str, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to host:port through the proxy's CONNECT tunnel, ready for TLS.

    http.client does the CONNECT (and its answer's parsing) as it does for any tunnelling client. Raises
    TunnelRefused when the proxy refuses, OSError when the proxy cannot be reached.
    """
    parts = urlsplit(proxy)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    connection.set_tunnel(host, port, headers=proxy_authorization(proxy))
    try:
        connection.connect()
    except OSError as exc:
        connection.close()
        refused = tunnel_refusal(str(exc))
        if refused is not None:
            raise TunnelRefused(*refused) from None
        raise
    sock, connection.sock = connection.sock, None  # the socket is the caller's now
    return sock


def tunnel_refusal(text: str) -> tuple[int, str] | None:
    """The status and reason of a proxy's refusal quoted in an error text ("Tunnel connection failed: 403
    Forbidden", as http.client words it), else None."""
    found = _TUNNEL_REFUSED.search(text)
    return (int(found.group(1)), found.group(2).strip()[:100]) if found else None


def refusal_line(proxy: str, where: str, refusal: TunnelRefused) -> str:
    """The line for a CONNECT the proxy refused, naming ESB_PROXY and what to check."""
    hint = {407: ": it wants credentials, or others than ESB_PROXY holds",
            403: ": its rules do not let us reach that host and port (ask the network team)"}.get(refusal.status, "")
    return f"ESB_PROXY {proxy_address(proxy)} refused the tunnel to the ESB at {where} ({refusal}){hint}"


def lasting(refusal: TunnelRefused) -> bool:
    """A refusal of the proxy's own (4xx: its rules, its credentials) will not heal within a run; a 5xx (it
    could not reach the ESB) may."""
    return 400 <= refusal.status < 500
