"""The ESB: POST a message over mutual TLS and decide whether it was accepted.

Accepted means a 2xx reply whose body holds no SOAP Fault. A 4xx or a Fault is a rejection of that message
(no retry: sending it again would be rejected again). 5xx without a Fault and connection failures are
retried with backoff. A read timeout is not retried within the call: the ESB may have the message, and the
journal (see journal.py) decides what the next run does about it.
"""

from __future__ import annotations

from dataclasses import dataclass

import requests
from lxml import etree
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, ReadTimeoutError
from urllib3.util.retry import Retry

from .errors import RecordError
from .stopping import Stop

SOAP11_NS = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12_NS = "http://www.w3.org/2003/05/soap-envelope"


class ESBUnreachable(Exception):
    """The ESB could not be reached (connection refused, TLS failure, timeout) after retries.

    `lasting` marks failures that will not heal within this run (a TLS trust problem): stop at once.
    """

    def __init__(self, message: str, *, lasting: bool = False):
        super().__init__(message)
        self.lasting = lasting


class ESBUncertain(ESBUnreachable):
    """The request may have reached the ESB but no answer came (read timeout, connection dropped)."""


@dataclass(frozen=True)
class Delivery:
    status: int
    attempts: int


def soap_fault(body: bytes) -> str | None:
    """The fault string of a SOAP 1.1/1.2 Fault in body, "" for a Fault without text, None if no Fault."""
    if not body or b"Fault" not in body:
        return None
    try:
        root = etree.fromstring(body, etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False))
    except etree.XMLSyntaxError:
        return None
    for ns in (SOAP11_NS, SOAP12_NS):
        fault = root.find(f".//{{{ns}}}Fault")
        if fault is not None:
            text = fault.findtext("faultstring") or fault.findtext(f".//{{{SOAP12_NS}}}Text") or ""
            return " ".join(text.split())[:200]
    return None


class ESBClient:
    def __init__(self, endpoint: str, *, cert: str, key: str, verify: bool | str, timeout: float,
                 attempts: int = 3, backoff: float = 0.5, stop: Stop | None = None):
        self._endpoint = endpoint
        self._stop = stop
        self._timeout = (min(10.0, timeout), timeout)
        self._attempts = attempts
        self._backoff = backoff
        self._session = requests.Session()
        # Only our own settings decide TLS trust and routing to the ESB: without this, requests lets
        # REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE silently replace ESB_CA_BUNDLE and proxies reroute the POST.
        self._session.trust_env = False
        self._session.cert = (cert, key)
        self._session.verify = verify
        self._session.headers.update({"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'})
        # Connection failures before the request was sent are retried by urllib3; a request that may have
        # arrived (read errors) is not retried here.
        self._session.mount("https://", HTTPAdapter(max_retries=Retry(
            total=attempts - 1, connect=attempts - 1, read=0, status=0, other=0, redirect=0,
            backoff_factor=backoff, raise_on_status=False, allowed_methods=None)))

    def close(self) -> None:
        self._session.close()

    def deliver(self, body: bytes) -> Delivery:
        """POST one message; return on acceptance, raise RecordError on rejection, ESBUnreachable on outage.

        5xx answers are retried unless they carry a SOAP Fault (SOAP 1.1 servers answer a Fault with 500,
        and a Fault is a verdict on the message, not a passing trouble). urllib3's Retry cannot see the body,
        so this loop asks a Retry object for the budget and the backoff.
        """
        retry = Retry(total=self._attempts - 1, backoff_factor=self._backoff, status_forcelist=range(500, 600),
                      allowed_methods=None, raise_on_status=False)
        attempts = 0
        while True:
            attempts += 1
            try:
                reply = self._session.post(self._endpoint, data=body, timeout=self._timeout, allow_redirects=False,
                                           verify=self._session.verify)
            except requests.exceptions.SSLError as exc:
                raise ESBUnreachable(f"TLS handshake with the ESB failed: {_tls_reason(exc)}", lasting=True) from None
            except requests.ConnectionError as exc:
                if _never_sent(exc):
                    raise ESBUnreachable("cannot connect to the ESB") from None
                raise _uncertain(exc) from None
            except (requests.exceptions.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                raise _uncertain(exc) from None
            except requests.RequestException as exc:
                raise ESBUncertain(f"ESB request failed ({type(exc).__name__}); it may have the message") from None
            fault = soap_fault(reply.content)
            if fault is not None:
                raise RecordError(f"ESB answered a SOAP Fault (HTTP {reply.status_code}): {fault or 'no faultstring'}")
            if 200 <= reply.status_code < 300:
                return Delivery(status=reply.status_code, attempts=attempts)
            if retry.is_retry("POST", reply.status_code):
                try:
                    retry = retry.increment("POST", self._endpoint)
                except MaxRetryError:
                    raise ESBUnreachable(f"ESB answered HTTP {reply.status_code} {attempts} times") from None
                retry.sleep()
                continue
            raise RecordError(f"ESB rejected the message: HTTP {reply.status_code} {reply.reason or ''}".rstrip())


def _never_sent(exc: requests.ConnectionError) -> bool:
    """True when the request certainly did not reach the ESB: no connection was ever made.

    requests reports a read timeout as ConnectionError too once urllib3's Retry is mounted, so the cause has
    to be read off the wrapped urllib3 error; anything not known to be a failed connect counts as "maybe sent".
    """
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    reason = exc.args[0] if exc.args else None
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    # NewConnectionError (refused, unreachable, name not resolved) is a ConnectTimeoutError in urllib3
    return isinstance(reason, ConnectTimeoutError)


def _uncertain(exc: requests.RequestException) -> ESBUncertain:
    return ESBUncertain(f"no answer from the ESB ({_transport_reason(exc)}); it may have the message")


def _transport_reason(exc: requests.RequestException) -> str:
    reason = exc.args[0] if exc.args else None
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    if isinstance(exc, requests.exceptions.ReadTimeout) or isinstance(reason, ReadTimeoutError):
        return "timed out waiting for the answer"
    return "the connection broke before the answer"


def _tls_reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "unknown ca", "UNKNOWN_CA",
                   "certificate required", "CERTIFICATE_REQUIRED", "bad certificate", "BAD_CERTIFICATE",
                   "hostname mismatch", "WRONG_VERSION_NUMBER"):
        if marker in text:
            return marker.lower().replace("_", " ")
    return "handshake error"
