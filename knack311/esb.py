"""The ESB: POST a message over mutual TLS and decide what its answer means.

Every POST ends in one of four outcomes, each with one meaning for the journal (see run.py):
- accepted (a Delivery): a 2xx whose body is empty or a SOAP envelope (1.1 or 1.2) without a Fault;
- rejected (RecordError): the ESB's verdict on this message, a SOAP Fault, a 4xx or a 2xx whose status says
  failure. Sending it again would be rejected again, so it is not retried; the ESB does not have it;
- outcome unknown (ESBUncertain): the ESB, or a gateway in front of it, may have taken the message; sending it
  again within the run could make a duplicate, so it is not repeated (except a 500, which the original script
  has retried in production since 2023: 3 tries) and the journal keeps it `sending`;
- not taken (ESBUnreachable): the request certainly never reached the ESB's service (no connection, a handshake
  that failed before any byte of the request, an answer that says it was not processed).

What each answer means, and why: see esb_answers.py, which judges an answer without any I/O.

Time: each POST (connect, request, whole answer) runs through Stop.call with a total deadline of ESB_TIMEOUT,
because requests' timeouts bound single socket reads and an answer trickling one byte a second never trips
them. The answer is read up to ANSWER_LIMIT bytes. Connect failures are retried by urllib3 inside the POST
(the request never left), through a Retry that starts nothing after a stop signal or past the run's deadline.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import certifi
import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPSConnectionPool
from urllib3.exceptions import InsecureRequestWarning, MaxRetryError, NameResolutionError, NewConnectionError
from urllib3.exceptions import ProxyError as Urllib3ProxyError
from urllib3.util.retry import Retry
from urllib3.util.ssl_ import create_urllib3_context

from .errors import ConfigError, RecordError
from .esb_answers import Verdict, judge, one_line
from .esb_proxy import TunnelRefused, lasting, open_tunnel, proxy_address, refusal_line, tunnel_refusal
from .http import AnswerTooLarge, RetryStopped, read_capped, with_stop
from .stopping import CutShort, Stop

ANSWER_LIMIT = 1 << 20  # bytes: the ESB's answer to one message is a few hundred

# OpenSSL's names for the alerts a server sends when it refuses the client's certificate. Received alerts read
# "... alert ..." ("tlsv13 alert certificate required"); our own verification of the server never does.
_OUR_CERT_REFUSED = ("ALERT_CERTIFICATE_REQUIRED", "ALERT_UNKNOWN_CA", "ALERT_BAD_CERTIFICATE",
                     "ALERT_CERTIFICATE_UNKNOWN", "ALERT_CERTIFICATE_EXPIRED", "ALERT_CERTIFICATE_REVOKED",
                     "ALERT_UNSUPPORTED_CERTIFICATE", "ALERT_ACCESS_DENIED")
_SERVER_CERT_UNVERIFIED = ("CERTIFICATE_VERIFY_FAILED",)


class ESBUnreachable(Exception):
    """The ESB did not take the message: the request never reached its service. Nothing to fear from resending.

    `lasting` marks failures that will not heal within this run (a certificate problem, a wrong ESB_ENDPOINT):
    stop at once.
    """

    def __init__(self, message: str, *, lasting: bool = False):
        super().__init__(message)
        self.lasting = lasting


class ESBUncertain(ESBUnreachable):
    """The ESB may have the message, but no answer said so (a timeout, a broken connection after the request was
    written, a gateway error, an answer that is not the ESB's). Not repeated within the run.

    `by_signal`: the POST was cut short by a stop signal, which says nothing about the ESB's health.
    """

    def __init__(self, message: str, *, by_signal: bool = False):
        super().__init__(message)
        self.by_signal = by_signal


BeforeTry = Callable[[int, int, str], None]  # (this try's number, tries in all, what the last answer said)


@dataclass(frozen=True)
class Delivery:
    status: int
    attempts: int
    seconds: float = 0.0  # how long the accepted POST waited for its answer


# ----- TLS ----------------------------------------------------------------------------------------------------------

class _KeyNeedsPassword(Exception):
    pass


def tls_context(cert: str, key: str, password: str, verify: bool | str) -> ssl.SSLContext:
    """The client's TLS context: our certificate and key, and the trust that verifies the ESB.

    Built here rather than by urllib3 from file names, because loading an encrypted key without a password
    callback makes OpenSSL prompt for a passphrase on the terminal (or print the prompt and fail without one).
    The callback below never prompts: it hands over ESB_KEY_PASSWORD, or fails. Raises ConfigError.
    """
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)  # urllib3's defaults: TLS 1.2+, no compression
    asked = []

    def key_password() -> bytes:
        asked.append(True)
        if not password:
            raise _KeyNeedsPassword
        return password.encode()

    try:
        context.load_cert_chain(cert, key, password=key_password)
    except _KeyNeedsPassword:
        raise ConfigError(f"ESB_KEY {key} is encrypted and ESB_KEY_PASSWORD is not set") from None
    except (ssl.SSLError, ValueError, OSError) as exc:
        # never echo the files' content or the password: only say which file is unusable
        if asked and "KEY_VALUES_MISMATCH" not in str(exc):
            raise ConfigError(f"ESB_KEY {key} is encrypted and ESB_KEY_PASSWORD does not decrypt it") from None
        raise ConfigError(f"ESB_CERT {cert} and ESB_KEY {key} are not a matching PEM certificate and private "
                          "key") from None
    try:
        if verify is False:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif verify is True:
            context.load_verify_locations(cafile=certifi.where())
        elif os.path.isdir(verify):
            context.load_verify_locations(capath=verify)
        else:
            context.load_verify_locations(cafile=verify)
    except (ssl.SSLError, OSError):
        raise ConfigError(f"ESB_CA_BUNDLE {verify}: no usable CA certificate to verify the ESB with") from None
    return context


@dataclass(frozen=True)
class Handshake:
    """A TLS handshake the ESB completed with our client certificate (esb.handshake)."""

    where: str               # host:port
    tls_version: str         # "TLSv1.3"
    server_certificate: bytes  # DER, as the ESB presented it (empty when it sent none)
    proxy: str = ""          # host:port of ESB_PROXY when the handshake went through its tunnel


HANDSHAKE_SETTLE = 2.0  # seconds to wait for a TLS 1.3 server's verdict on our certificate


def handshake(endpoint: str, *, cert: str, key: str, key_password: str, verify: bool | str, timeout: float,
              settle: float = HANDSHAKE_SETTLE, proxy: str = "") -> Handshake:
    """A TLS handshake with the ESB presenting our client certificate, and no request: the pre-flight's probe.

    With TLS 1.3 the client's side of the handshake is complete before the server has looked at our certificate:
    its refusal comes as an alert just after. So, having sent nothing, this reads: a server that refuses sends
    the alert at once; one that accepts sends its session tickets (which OpenSSL servers send only after checking
    the client's certificate) or nothing until a request. It waits for either at most `settle` seconds.

    Everything within `timeout` (ESB_TIMEOUT). Raises ConfigError when our certificate and key cannot be used,
    ESBUnreachable when the handshake fails, its message naming ESB_CERT, ESB_CA_BUNDLE, ESB_ENDPOINT or ESB_PROXY
    as a POST's failure would. With `proxy` (ESB_PROXY), through its CONNECT tunnel, as every POST goes.
    """
    parsed = urlparse(endpoint)
    try:
        host, port = parsed.hostname or "", parsed.port or 443
    except ValueError:
        raise ConfigError(f"ESB_ENDPOINT {endpoint!r} has a port that is not a number") from None
    where = f"{host}:{port}"
    context = tls_context(cert, key, key_password, verify)

    def shake() -> Handshake:
        started = time.monotonic()
        try:
            raw = (open_tunnel(proxy, host, port, min(10.0, timeout)) if proxy
                   else socket.create_connection((host, port), timeout=min(10.0, timeout)))
        except TunnelRefused as refusal:
            raise ESBUnreachable(refusal_line(proxy, where, refusal)) from None
        except OSError as exc:
            if proxy:
                raise ESBUnreachable(f"cannot connect to ESB_PROXY {proxy_address(proxy)} ({_socket_reason(exc)}), "
                                     f"the proxy on the way to the ESB at {where}: check ESB_PROXY") from None
            raise ESBUnreachable(f"cannot connect to the ESB at {where} ({_socket_reason(exc)}): check ESB_ENDPOINT "
                                 "and the route to it") from None
        try:
            raw.settimeout(timeout)
            with context.wrap_socket(raw, server_hostname=host) as tls:
                version = tls.version() or "?"
                if version == "TLSv1.3" and not _await_verdict(
                        tls, min(settle, max(0.0, timeout - (time.monotonic() - started)))):
                    raise ESBUnreachable(f"the ESB at {where} closed the connection right after the TLS handshake, "
                                         f"without a word: it may not accept our client certificate (ESB_CERT {cert})")
                return Handshake(where, version, tls.getpeercert(binary_form=True) or b"",
                                 proxy_address(proxy) if proxy else "")
        except ssl.SSLError as exc:
            detail = _tls_detail(exc, exc)
            trust_failure = _trust_failure(exc, detail, cert, verify)
            raise ESBUnreachable(trust_failure or f"TLS handshake with the ESB at {where} failed: {detail} (is "
                                 "ESB_ENDPOINT the ESB's TLS port?)") from None
        except OSError as exc:  # reset, or timed out mid-handshake
            raise ESBUnreachable(f"TLS handshake with the ESB at {where} failed ({_socket_reason(exc)}): is "
                                 "ESB_ENDPOINT the ESB's TLS port?") from None
        finally:
            raw.close()

    try:
        return Stop(request_timeout=timeout).call(shake, timeout=timeout, what="ESB TLS handshake")
    except CutShort:
        raise ESBUnreachable(f"no TLS handshake with the ESB at {where} within {timeout:g}s (ESB_TIMEOUT): check "
                             "ESB_ENDPOINT and the route to it") from None


def _await_verdict(tls: ssl.SSLSocket, wait: float) -> bool:
    """After a TLS 1.3 handshake: True once the server shows it accepted our certificate, or when `wait` passes
    without a word from it; False when it hangs up without an alert; ssl.SSLError when it sends one."""
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        tls.settimeout(min(0.05, left))
        try:
            return bool(tls.recv(1))  # a server that speaks first accepted us; b"" is a hang-up
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return False
        except (TimeoutError, ssl.SSLWantReadError):
            session = tls.session
            if session is not None and session.has_ticket:
                return True
    return True


def _socket_reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return "name not resolved"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "network unreachable"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    return one_line(exc.strerror or str(exc), 200)


# ----- knowing whether the request left -----------------------------------------------------------------------------

class _Abandoned(Exception):
    """The caller gave up on this POST before its request was written: it must not be written now."""


class _WriteGate:
    """Whether any byte of one POST's request may have been written, settled once under a lock.

    The connection opens the gate just before writing; the caller closes it when it is done with the POST, or
    gives up on it (a deadline, a stop signal). Whoever comes second sees the other's decision, so a POST the
    caller abandoned as "never sent" cannot start writing afterwards in the abandoned thread.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._written = False
        self._closed = False

    def open(self) -> None:
        with self._lock:
            if self._closed:
                raise _Abandoned
            self._written = True

    def close(self) -> bool:
        """Close the gate; True if the request may have been (partly) written."""
        with self._lock:
            self._closed = True
            return self._written


_current = threading.local()  # the _WriteGate of the POST this thread is making


class _ESBConnection(HTTPSConnection):
    def request(self, *args, **kwargs):
        gate = getattr(_current, "gate", None)
        if gate is not None:
            gate.open()
        return super().request(*args, **kwargs)


class _ESBConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _ESBConnection


class _ESBAdapter(HTTPAdapter):
    """requests' adapter with our own TLS context; requests' cert and verify settings play no part.

    requests would otherwise hand urllib3 the certificate and key file names (OpenSSL would then load the key
    without a password callback) and, with verify=True, certifi's bundle on top of our trust.
    """

    def __init__(self, context: ssl.SSLContext, **kwargs):
        self._context = context
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {**self.poolmanager.pool_classes_by_scheme,
                                                   "https": _ESBConnectionPool}

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        # ESB_PROXY: the pools behind the CONNECT tunnel need our TLS context and connections just as much
        if proxy not in self.proxy_manager:
            manager = super().proxy_manager_for(proxy, ssl_context=self._context, **proxy_kwargs)
            manager.pool_classes_by_scheme = {**manager.pool_classes_by_scheme, "https": _ESBConnectionPool}
        return self.proxy_manager[proxy]

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        host_params, _ = super().build_connection_pool_key_attributes(request, verify, None)
        return host_params, {"cert_reqs": self._context.verify_mode}

    def cert_verify(self, conn, url, verify, cert) -> None:
        conn.cert_reqs = self._context.verify_mode
        conn.ca_certs = conn.ca_cert_dir = conn.cert_file = conn.key_file = None


@dataclass(frozen=True)
class _Reply:
    status: int
    reason: str
    body: bytes
    too_large: bool
    charset: str | None
    location: str
    raw: object  # urllib3's response, for Retry-After


# ----- the client ---------------------------------------------------------------------------------------------------

class ESBClient:
    def __init__(self, endpoint: str, *, cert: str, key: str, verify: bool | str, timeout: float,
                 attempts: int = 3, backoff: float = 0.5, stop: Stop | None = None, key_password: str = "",
                 proxy: str = "", connections: int = 10):
        """proxy: ESB_PROXY, an http:// CONNECT proxy (settings.esb_proxy_setting checked it); "" for none.
        connections: the POSTs that may be in flight at once, each kept a connection for the next (beyond
        requests' 10 a connection would be closed after every POST and the next one pay a new TLS handshake)."""
        self._endpoint = endpoint
        self._proxy = proxy
        parsed = urlparse(endpoint)
        self._where = f"{parsed.hostname}:{parsed.port or 443}"
        self._cert = cert
        self._verify = verify
        self._stop = stop if stop is not None else Stop(request_timeout=timeout)
        self._timeout = timeout
        self._socket_timeouts = (min(10.0, timeout), timeout)
        self._attempts = attempts
        self._backoff = backoff
        context = tls_context(cert, key, key_password, verify)
        if verify is False:
            # run.py warns once per run that verification is off; urllib3 would repeat it for every message
            warnings.filterwarnings("ignore", category=InsecureRequestWarning)
        self._session = requests.Session()
        # Only our own settings decide TLS trust and routing to the ESB: without this, requests lets
        # REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE silently replace ESB_CA_BUNDLE and proxies reroute the POST.
        self._session.trust_env = False
        if proxy:
            self._session.proxies = {"https": proxy}  # explicit, so it holds with trust_env off (NO_PROXY too)
        self._session.headers.update({"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'})
        # urllib3 retries a failed connect (the request never left); nothing that may have reached the ESB.
        connect_retry = Retry(total=attempts - 1, connect=attempts - 1, read=0, status=0, other=0, redirect=0,
                              backoff_factor=backoff, raise_on_status=False, allowed_methods=None)
        self._session.mount("https://", _ESBAdapter(context, max_retries=with_stop(connect_retry, self._stop),
                                                    pool_maxsize=max(10, connections)))

    def close(self) -> None:
        self._session.close()

    def deliver(self, body: bytes, before_try: BeforeTry | None = None, *, timeout: float | None = None) -> Delivery:
        """POST one message: return on acceptance; raise RecordError on rejection, ESBUncertain when the outcome
        is unknown, ESBUnreachable when the ESB certainly did not take it.

        `before_try(number, tries, previous)` is called before every try after the first (`previous`: what the
        last answer said), so the journal can say which try was under way should the run die during it.
        `timeout`: how long each POST waits for its answer, ESB_TIMEOUT unless given (a message in doubt is posted
        again with a longer wait).
        """
        retry = with_stop(Retry(total=self._attempts - 1, status=self._attempts - 1, backoff_factor=self._backoff,
                                allowed_methods=None, raise_on_status=False), self._stop)
        attempts, line = 0, ""
        may_have_it = ""  # an earlier try's 500: from then on, nothing short of acceptance settles the doubt
        while True:
            attempts += 1
            if attempts > 1 and before_try is not None:
                before_try(attempts, self._attempts, line)
            began = time.monotonic()
            try:
                reply = self._post(body, timeout or self._timeout)
            except ESBUncertain:
                raise
            except ESBUnreachable as exc:
                if may_have_it:
                    raise ESBUncertain(f"{exc}; {may_have_it}") from None
                raise
            verdict, line = judge(reply.status, reply.reason, reply.body, too_large=reply.too_large,
                                  charset=reply.charset, location=reply.location)
            if verdict is Verdict.ACCEPTED:
                return Delivery(status=reply.status, attempts=attempts, seconds=time.monotonic() - began)
            if verdict is Verdict.UNKNOWN:
                raise ESBUncertain(line)
            if may_have_it and verdict in (Verdict.REJECTED, Verdict.MISDIRECTED):
                raise ESBUncertain(f"{line}; {may_have_it}")
            if verdict is Verdict.REJECTED:
                raise RecordError(line)
            if verdict is Verdict.MISDIRECTED:
                raise ESBUnreachable(line, lasting=True)
            if verdict is Verdict.SERVICE_ERROR:
                may_have_it = f"try {attempts} of {self._attempts} answered HTTP 500: it may have the message"
            try:
                retry = retry.increment("POST", self._endpoint, response=reply.raw)
                retry.sleep(reply.raw)
            except MaxRetryError as exc:
                why = "the run is stopping" if isinstance(exc.reason, RetryStopped) else f"{attempts} tries"
                raise self._gave_up(verdict, line, why, may_have_it) from None
            except RetryStopped:
                raise self._gave_up(verdict, line, "no time left to try again", may_have_it) from None

    @staticmethod
    def _gave_up(verdict: Verdict, line: str, why: str, may_have_it: str) -> ESBUnreachable:
        """The end of the tries: the ESB did not take it (only "not handled" answers), or it may have it."""
        if verdict is Verdict.SERVICE_ERROR:
            return ESBUncertain(f"{line} ({why})")
        if may_have_it:
            return ESBUncertain(f"{line}, did not take the message ({why}); {may_have_it}")
        return ESBUnreachable(f"{line}, did not take the message ({why})")

    def _post(self, body: bytes, timeout: float) -> _Reply:
        gate = _WriteGate()

        def post() -> _Reply:
            _current.gate = gate
            try:
                reply = self._session.post(self._endpoint, data=body, timeout=(self._socket_timeouts[0], timeout),
                                           allow_redirects=False, stream=True)
                try:
                    content, too_large = read_capped(reply, ANSWER_LIMIT), False
                except AnswerTooLarge:
                    content, too_large = b"", True
                return _Reply(reply.status_code, reply.reason or "", content, too_large,
                              requests.utils.get_encoding_from_headers(reply.headers) if content else None,
                              reply.headers.get("Location", ""), reply.raw)
            finally:
                _current.gate = None

        try:
            reply = self._stop.call(post, timeout=timeout, what="ESB POST", write=True)
        except CutShort as exc:
            if gate.close():
                cause = "a stop signal came" if exc.by_signal else f"no complete answer within {exc.waited:.0f}s"
                raise ESBUncertain(f"POST to the ESB cut short ({cause}); it may have the message",
                                   by_signal=exc.by_signal) from None
            raise ESBUnreachable(f"cannot connect to the ESB at {self._where} (gave up after {exc.waited:.0f}s)"
                                 ) from None
        except RetryStopped:
            gate.close()
            raise ESBUnreachable(f"cannot connect to the ESB at {self._where} (the run is stopping)") from None
        except requests.RequestException as exc:
            raise self._failure(exc, written=gate.close()) from None
        gate.close()
        return reply

    def _failure(self, exc: requests.RequestException, *, written: bool) -> ESBUnreachable:
        """What a failed POST means: not taken (ESBUnreachable) or unknown (ESBUncertain)."""
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, MaxRetryError):
            reason = reason.reason
        if self._proxy and (isinstance(exc, requests.exceptions.ProxyError) or isinstance(reason, Urllib3ProxyError)):
            return self._proxy_failure(reason)
        tls = _ssl_error(reason)
        if tls is not None or isinstance(exc, requests.exceptions.SSLError):
            detail = _tls_detail(tls, reason)
            # The ESB refused our certificate. With TLS 1.3 its alert comes after our side of the handshake
            # finished, i.e. when reading the answer to a request already written; still, a server that refuses
            # the client certificate fails the handshake in its TLS layer and never hands the request to its
            # service (even one that asks for the certificate only after reading the request, through
            # post-handshake authentication, does so in order to decide whether to process it). So the message
            # was not taken, whenever the alert arrives; and no message will be until ESB_CERT changes. Nor
            # while the ESB's certificate cannot be verified.
            trust_failure = _trust_failure(tls, detail, self._cert, self._verify)
            if trust_failure is not None:
                return ESBUnreachable(trust_failure, lasting=True)
            if written:
                return ESBUncertain(f"the TLS connection to the ESB failed after the message was written ({detail}); "
                                    "it may have the message")
            # A handshake cut off (EOF, reset) may be a passing trouble; a protocol mismatch is not.
            passing = isinstance(tls, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or tls is None
            return ESBUnreachable(f"TLS handshake with the ESB at {self._where} failed: {detail}", lasting=not passing)
        if written:
            return ESBUncertain(f"no answer from the ESB ({_transport_reason(exc, reason)}); it may have the message")
        return ESBUnreachable(f"cannot connect to the ESB at {self._where} ({_connect_reason(reason)})")


    def _proxy_failure(self, reason: object) -> ESBUnreachable:
        """ESB_PROXY refused the tunnel or could not be reached: the request never left for the ESB."""
        original = getattr(reason, "original_error", None) or reason
        refused = tunnel_refusal(str(original))
        if refused is not None:
            refusal = TunnelRefused(*refused)
            return ESBUnreachable(refusal_line(self._proxy, self._where, refusal), lasting=lasting(refusal))
        return ESBUnreachable(f"cannot connect to ESB_PROXY {proxy_address(self._proxy)} "
                              f"({_connect_reason(original)}), the proxy on the way to the ESB at {self._where}: "
                              "check ESB_PROXY")


def _trust_failure(tls: ssl.SSLError | None, detail: str, cert: str, verify: bool | str) -> str | None:
    """What a TLS failure says when it is one of trust, naming the setting to fix; None for any other failure."""
    code = (tls.reason or "") if tls is not None else ""
    if code.endswith(_OUR_CERT_REFUSED):
        return f"the ESB did not accept our client certificate (ESB_CERT {cert}): {detail}"
    if code in _SERVER_CERT_UNVERIFIED:
        trust = verify if isinstance(verify, str) else "the system trust store"
        return f"the ESB's certificate could not be verified (ESB_CA_BUNDLE {trust}): {detail}"
    return None


def _ssl_error(reason: object) -> ssl.SSLError | None:
    """The ssl module's error inside urllib3's and requests' wrappers, if the failure was one."""
    seen = 0
    while reason is not None and seen < 5:
        if isinstance(reason, ssl.SSLError):
            return reason
        args = getattr(reason, "args", ())
        reason = args[0] if args and isinstance(args[0], BaseException) else getattr(reason, "__cause__", None)
        seen += 1
    return None


def _tls_detail(tls: ssl.SSLError | None, reason: object) -> str:
    """OpenSSL's own words, e.g. "tlsv13 alert certificate required", without urllib3's and requests' wrapping."""
    if tls is not None and tls.reason:
        text = tls.reason.replace("_", " ").lower()
        verify = getattr(tls, "verify_message", None)
        return f"{text}: {verify}" if verify else text
    return one_line(str(tls if tls is not None else reason), 200)


def _connect_reason(reason: object) -> str:
    if isinstance(reason, NameResolutionError):
        return "name not resolved"
    if isinstance(reason, NewConnectionError):
        text = str(reason).lower()
        if "refused" in text:
            return "connection refused"
        if "unreachable" in text:
            return "network unreachable"
        return one_line(str(reason), 200)
    if isinstance(reason, RetryStopped):
        return "the run is stopping"
    return "timed out" if "timed out" in str(reason).lower() else one_line(str(reason), 200)


def _transport_reason(exc: requests.RequestException, reason: object) -> str:
    if isinstance(exc, requests.exceptions.ReadTimeout) or "timed out" in str(reason).lower():
        return "timed out waiting for the answer"
    return "the connection broke before the whole answer came"
