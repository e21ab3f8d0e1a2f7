"""The ESB's answers, read and judged without any I/O: what a body is, what an answer means, and the
one-line excerpt of an answer that a FAILED line quotes.

What each answer means, and why:
- 2xx, empty or SOAP without Fault: accepted, unless the SOAP answer's submitKnackResponse/status (any
  namespace) says anything but success (SUCCESS_STATUSES, case-insensitive): rejected, as a Fault would be, since
  the ESB's service itself said it did not take the message. No status element: accepted (the ESB's full
  contract is not known to us, and its answers without one have always meant success).
- 2xx with anything else (an HTML "Access denied" page, JSON, text, over 1 MB): not the ESB's service speaking,
  but a proxy, a gateway or a login page that may or may not have passed the message on: unknown.
- a SOAP Fault, whatever the status (SOAP 1.1 services answer a Fault with 500, some with 200): rejected.
- 502, 504: a gateway that may have forwarded the message before its upstream failed or timed out: unknown,
  even with a Fault in the body (a gateway's Fault is about its upstream, not about the message).
- 408, 429, 503 (with or without a Fault): the server says it did not handle the request (timed out waiting
  for it, too many requests, unavailable: RFC 9110 15.5.9, RFC 6585 4, RFC 9110 15.6.4). Retried within the
  run, honouring Retry-After, while the run has time; when the tries run out: not taken.
- 4xx otherwise: rejected, with the start of the answer in the line.
- 500 without a Fault: the service failed while handling the message, maybe after passing it on to 311. The
  original script retried it ("retry on 500", in production since 2023), so it is tried again within the run
  (3 tries in all, journalled try by try); if every try gives 500: unknown.
- any other 5xx: the service failed while handling the message, maybe after passing it on to 311: unknown, not
  retried.
- 303 See Other is what a server answers after processing a POST: unknown. Other 3xx (moved, temporary
  redirect): the POST was not processed where it went; ESB_ENDPOINT points at the wrong place, which no
  message will fix: not taken, and the run stops. Redirects are never followed (a POST must not wander).
"""

from __future__ import annotations

import codecs
import enum
import unicodedata

from lxml import etree

SOAP11_NS = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12_NS = "http://www.w3.org/2003/05/soap-envelope"

EXCERPT_CHARS = 300     # of an answer, in a FAILED line
RETRY_STATUSES = frozenset({408, 429, 503})  # the server says it did not handle the request
GATEWAY_STATUSES = frozenset({502, 504})     # a gateway that may have forwarded it
SERVICE_ERROR_STATUS = 500  # retried like the original script, though the ESB may have the message
# What a submitKnackResponse/status that means success says (compared case-insensitively, spaces stripped).
SUCCESS_STATUSES = frozenset({"success", "successful", "ok"})
STATUS_CHARS = 60  # of a status value, in a FAILED line


class Body(enum.Enum):
    EMPTY = "empty"
    SOAP = "soap"    # a SOAP 1.1 or 1.2 envelope without a Fault
    FAULT = "fault"  # a SOAP envelope whose Body holds a Fault
    REFUSED = "refused"  # a SOAP envelope without a Fault whose submitKnackResponse/status is not a success
    OTHER = "other"  # anything else: HTML, JSON, text, XML that is not SOAP, bytes that do not parse


def _parser() -> etree.XMLParser:
    # The answer comes from the network: no entity expansion, no DTD, nothing fetched, no unbounded trees.
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


def read_body(body: bytes) -> tuple[Body, str]:
    """What an ESB answer body is, and for a Fault its text ("" when it has none); for a refusal, its status
    and the text of the answer (never its markup, which a cut could leave mid-tag).

    lxml reads the encoding from a BOM or the XML declaration, so a UTF-16 Fault is found too. A Fault counts
    with or without a namespace of its own, as long as it is a child of a SOAP Body: some services put a bare
    <Fault> there.
    """
    if not body.strip():
        return Body.EMPTY, ""
    root = None
    # Leading whitespace before the XML declaration is an error to lxml; some SOAP stacks emit it anyway.
    for candidate in (body, body.lstrip()):
        try:
            root = etree.fromstring(candidate, _parser())
            break
        except (etree.XMLSyntaxError, ValueError):
            continue
    if root is None or not isinstance(root.tag, str):
        return Body.OTHER, ""
    name = etree.QName(root)
    if name.localname != "Envelope" or name.namespace not in (SOAP11_NS, SOAP12_NS):
        return Body.OTHER, ""
    soap_body = root.find(f"{{{name.namespace}}}Body")
    if soap_body is None:
        return Body.SOAP, ""
    for child in soap_body:
        if isinstance(child.tag, str) and etree.QName(child).localname == "Fault":
            return Body.FAULT, _fault_text(child)
    refusal = _refusal(soap_body)
    if refusal:
        return Body.REFUSED, refusal
    return Body.SOAP, ""


def _refusal(soap_body: etree._Element) -> str:
    """For a submitKnackResponse whose status is not a success: its status and the answer's text; else "".

    Only the status elements directly under submitKnackResponse count (either in any namespace, as SOAP stacks
    differ on qualifying them); one that is not a success is enough. An empty status says no success either.
    """
    statuses = soap_body.xpath("*[local-name()='submitKnackResponse']/*[local-name()='status']")
    refused = [s for s in statuses if "".join(s.itertext()).strip().lower() not in SUCCESS_STATUSES]
    if not refused:
        return ""
    status = one_line("".join(refused[0].itertext()), STATUS_CHARS)
    return f"status {status!r}; the answer says: {answer_text(soap_body)}"


def answer_text(element: etree._Element, limit: int = EXCERPT_CHARS) -> str:
    """The text content of an answer, one line, at most `limit` characters (an ellipsis marks a cut)."""
    text = " ".join(" ".join(element.itertext()).split())
    if len(text) > limit:
        text = text[:limit - 3].rstrip() + "..."
    return one_line(text, limit) or "(no text)"


def _fault_text(fault: etree._Element) -> str:
    # SOAP 1.1: faultstring (unqualified by the spec, qualified by some stacks); SOAP 1.2: Reason/Text.
    for path in (".//*[local-name()='faultstring']", ".//*[local-name()='Reason']/*[local-name()='Text']"):
        found = fault.xpath(path)
        if found:
            return one_line("".join(found[0].itertext()), 200)
    return ""


def soap_fault(body: bytes) -> str | None:
    """The fault text of a SOAP Fault in body, "" for a Fault without text, None if the body holds no Fault."""
    kind, text = read_body(body)
    return text if kind is Body.FAULT else None


def one_line(text: str, limit: int) -> str:
    """Text for a log line: whitespace runs made one space, cut to `limit` characters, control and format
    characters escaped (a newline or an ANSI escape in an answer must not forge or colour a line)."""
    text = " ".join(text.split())[:limit]
    return "".join(ch if unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp") else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def excerpt(body: bytes, charset: str | None = None) -> str:
    """The start of an answer body, one line: EXCERPT_CHARS characters, decoded by BOM, charset or as UTF-8."""
    if not body:
        return "(empty)"
    head = body[:EXCERPT_CHARS * 4]
    encoding = charset or "utf-8"
    for bom, bom_encoding in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                              (codecs.BOM_UTF16_BE, "utf-16")):
        if head.startswith(bom):
            encoding = bom_encoding
            break
    try:
        text = head.decode(encoding, "replace")
    except LookupError:
        text = head.decode("utf-8", "replace")
    return one_line(text, EXCERPT_CHARS)


class Verdict(enum.Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    RETRY = "retry"          # not handled; may be tried again
    UNKNOWN = "unknown"      # may have been processed
    SERVICE_ERROR = "service error"  # 500 without a Fault: may have been processed, yet tried again (3 tries)
    MISDIRECTED = "misdirected"  # not processed, and no message will be: ESB_ENDPOINT is wrong


def judge(status: int, reason: str, body: bytes, *, too_large: bool = False, charset: str | None = None,
          location: str = "") -> tuple[Verdict, str]:
    """The meaning of one ESB answer (see the module docstring for the table), and a line that says it."""
    http = one_line(f"HTTP {status} {reason}", 100)
    start = "(over 1 MB, not read)" if too_large else excerpt(body, charset)
    location = one_line(location, 200) or "?"
    if status in GATEWAY_STATUSES:
        return Verdict.UNKNOWN, f"a gateway answered {http}: it may have forwarded the message; answer: {start}"
    if status in RETRY_STATUSES:
        return Verdict.RETRY, f"ESB answered {http}"
    kind, fault = (Body.OTHER, "") if too_large else read_body(body)
    if kind is Body.FAULT:
        return Verdict.REJECTED, f"ESB answered a SOAP Fault ({http}): {fault or 'no fault text'}; answer: {start}"
    if 200 <= status < 300:
        if kind is Body.REFUSED:
            return Verdict.REJECTED, f"ESB refused the message: {http} with submitKnackResponse {fault}"
        if kind in (Body.EMPTY, Body.SOAP):
            return Verdict.ACCEPTED, http
        return Verdict.UNKNOWN, (f"ESB answered {http}, but not with SOAP (a proxy or gateway page?): it may or may "
                                 f"not have the message; answer: {start}")
    if status == 303:
        return Verdict.UNKNOWN, f"ESB answered {http} (a POST processed elsewhere?) to {location}"
    if 300 <= status < 400:
        return Verdict.MISDIRECTED, (f"ESB_ENDPOINT answered {http} to {location}: the message was not "
                                     "taken there; check ESB_ENDPOINT")
    if 400 <= status < 500:
        return Verdict.REJECTED, f"ESB rejected the message: {http}; answer: {start}"
    if status == SERVICE_ERROR_STATUS:
        return Verdict.SERVICE_ERROR, (f"ESB answered {http} without a SOAP Fault: it may have the message; "
                                       f"answer: {start}")
    return Verdict.UNKNOWN, f"ESB answered {http} without a SOAP Fault: it may have the message; answer: {start}"
