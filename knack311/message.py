"""An activity -> the ESB message: the 311 rules (pure) and the XML (template render, escaping, parse check)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
from lxml import etree
from markupsafe import Markup, escape

from .errors import RecordError

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
TEMPLATE_NAME = "esb_message.xml.j2"

SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
ACC_NS = "http://www.austintexas.gov/AcceptKnack/"

# The elements of a message, in document order; the parse check holds every rendered message to this.
MESSAGE_ELEMENTS = (
    "Envelope", "Header", "Body", "submitKnack",
    "header", "emi", "timestamp", "source", "target", "data_type", "event",
    "data", "csr", "id", "csr_activity_id", "sr_number", "issue_status_code", "activity_type_code",
    "activity_details", "outcome_code", "activity_date",
)

# XML 1.0 allows tab, newline, carriage return and everything from U+0020 except surrogates, U+FFFE and U+FFFF.
_FORBIDDEN_IN_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True)
class Activity:
    """One Knack activity record, its values already formatted as strings."""

    record_id: str
    atd_activity_id: str
    emi_id: str
    sr_number: str
    issue_status_code: str
    activity_name: str
    activity_date: str
    activity_details: str
    csr_activity_id: str = ""
    csr_activity_code: str = ""


class NotFor311(Exception):
    """The activity is internal: 311 does not want it (the record is set DO_NOT_SEND)."""


def message_values(activity: Activity, activity_codes: dict[str, str | None]) -> dict[str, str]:
    """The template variables for one activity, applying the rules the 311 side relies on."""
    code = activity.csr_activity_code
    if not code:
        if activity.activity_name not in activity_codes:
            raise RecordError(f"activity {activity.activity_name!r} has no 311 code in config.py activity_codes")
        code = activity_codes[activity.activity_name]
        if code is None:
            raise NotFor311(activity.activity_name)
    status = activity.issue_status_code
    if status.strip().lower() == "closed_duplicate":
        # 311 closes duplicates as resolved; Knack keeps its own value
        status = "closed_resolved"
    return {
        "id": activity.record_id,
        "emi_id": activity.emi_id,
        "csr_activity_id": activity.csr_activity_id,
        "sr_number": activity.sr_number,
        "issue_status_code": status,
        "activity_type_code": code,
        "activity_details": activity.activity_details,
        "activity_date": activity.activity_date,
    }


def xml_text(value: object) -> Markup:
    """Every template value: forbidden characters removed, then escaped for XML.

    A bare carriage return is written as a character reference, because a parser turns a literal one into a
    newline and 311 should see the text as typed.
    """
    text = "" if value is None else str(value)
    text = _FORBIDDEN_IN_XML.sub("", text)
    return Markup(str(escape(text)).replace("\r", "&#13;"))


_environment = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
    autoescape=True,
    finalize=xml_text,
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)


def render_message(values: dict[str, str], timestamp: str) -> bytes:
    """Render, serialize as plain ASCII (non-ASCII text as character references) and check with lxml."""
    text = _environment.get_template(TEMPLATE_NAME).render(timestamp=timestamp, **values)
    body = text.encode("ascii", "xmlcharrefreplace")
    check_message(body)
    return body


_parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


def check_message(body: bytes) -> etree._Element:
    """Parse a rendered message; anything but a well-formed message of the expected shape is a RecordError."""
    try:
        root = etree.fromstring(body, _parser)
    except etree.XMLSyntaxError as exc:
        raise RecordError(f"rendered message is not well-formed XML: {exc}") from None
    names = tuple(etree.QName(el).localname for el in root.iter(etree.Element))
    if root.tag != f"{{{SOAP_NS}}}Envelope" or names != MESSAGE_ELEMENTS:
        raise RecordError("rendered message does not have the expected SOAP structure")
    return root
