"""An activity -> the ESB message: the 311 rules (pure) and the XML (template render, escaping, parse check)."""

from __future__ import annotations

import re
import threading
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

# The most text one value of a message may hold, in bytes of UTF-8: far above any activity staff type (a long
# note is a few kB), and a tenth of what lxml parses in one text node without huge_tree (10,000,000 bytes), so a
# message never needs that switch, whatever the characters. A longer value is bad data, not a message to build.
MAX_VALUE_BYTES = 1_000_000

# XML 1.0 allows tab, newline, carriage return and everything from U+0020 except surrogates, U+FFFE and U+FFFF.
_FORBIDDEN_IN_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True)
class Activity:
    """One Knack activity record, its values already formatted as strings.

    The attributes are the keys of config.py `fields` (the record id, "id" there, is `record_id` here).
    """

    record_id: str
    atd_activity_id: str
    emi_id: str
    sr_number: str
    issue_status_code_snapshot: str
    activity_name: str
    activity_datetime: str
    activity_details: str
    csr_activity_id: str = ""
    csr_activity_code: str = ""


class NotFor311(Exception):
    """The activity is internal: 311 does not want it (the record is set DO_NOT_SEND)."""


def activity_type_code(activity: Activity, activity_codes: dict[str, str | None]) -> str:
    """The 311 activity code: the record's own csr_activity_code (paging activities), else config.py's lookup.

    A name mapped to None raises NotFor311; a name missing from activity_codes is a RecordError.
    """
    if activity.csr_activity_code:
        return activity.csr_activity_code
    if activity.activity_name not in activity_codes:
        raise RecordError(f"activity {activity.activity_name!r} has no 311 code in config.py activity_codes")
    code = activity_codes[activity.activity_name]
    if code is None:
        raise NotFor311(activity.activity_name)
    return code


def closed_duplicate_as_resolved(issue_status_code_snapshot: str) -> str:
    """The issue status 311 gets: closed_duplicate is sent as closed_resolved, anything else as it is."""
    if issue_status_code_snapshot.strip().lower() == "closed_duplicate":
        # 311 closes duplicates as resolved; Knack keeps its own value
        return "closed_resolved"
    return issue_status_code_snapshot


def message_values(activity: Activity, activity_codes: dict[str, str | None]) -> dict[str, str]:
    """The template's variables: the activity's fields under their config.py names, plus activity_type_code.

    The code is looked up here, before anything is rendered, so that an activity 311 does not want (NotFor311)
    or cannot take (RecordError) is known before the run journals or sends anything.
    """
    values = {
        "id": activity.record_id,
        "emi_id": activity.emi_id,
        "csr_activity_id": activity.csr_activity_id,
        "sr_number": activity.sr_number,
        "issue_status_code_snapshot": activity.issue_status_code_snapshot,
        "activity_type_code": activity_type_code(activity, activity_codes),
        "activity_details": activity.activity_details,
        "activity_datetime": activity.activity_datetime,
    }
    for name, value in values.items():
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_VALUE_BYTES:
            raise RecordError(f"{name} is {size / 1e6:.1f} MB ({size:,} bytes of UTF-8); a 311 message takes at most "
                              f"{MAX_VALUE_BYTES / 1e6:g} MB ({MAX_VALUE_BYTES:,} bytes) per value: shorten it in "
                              "Knack")
    return values


def loses_characters_in_xml(text: str) -> bool:
    """True when the message would carry `text` without some of its characters (those XML 1.0 forbids)."""
    return _FORBIDDEN_IN_XML.search(text) is not None


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
_environment.filters["closed_duplicate_as_resolved"] = closed_duplicate_as_resolved


def render_message(values: dict[str, str], publication_time: str) -> bytes:
    """Render, serialize as plain ASCII (non-ASCII text as character references) and check with lxml.

    `values` come from message_values; `publication_time` (now, ISO 8601 with the app's offset) fills the
    header's timestamp.
    """
    text = _environment.get_template(TEMPLATE_NAME).render(publication_time=publication_time, **values)
    body = text.encode("ascii", "xmlcharrefreplace")
    check_message(body)
    return body


# One parser per thread: lxml parsers must not be shared between threads (the run renders in its main thread and
# in the delivery workers at once; a shared parser crashed the process with "double free or corruption").
_parsers = threading.local()


def _parser() -> etree.XMLParser:
    parser = getattr(_parsers, "parser", None)
    if parser is None:
        parser = _parsers.parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                                                   huge_tree=False)
    return parser


def check_message(body: bytes) -> etree._Element:
    """Parse a rendered message; anything but a well-formed message of the expected shape is a RecordError."""
    try:
        root = etree.fromstring(body, _parser())
    except etree.XMLSyntaxError as exc:
        raise RecordError(f"rendered message is not well-formed XML: {exc}") from None
    names = tuple(etree.QName(el).localname for el in root.iter(etree.Element))
    if root.tag != f"{{{SOAP_NS}}}Envelope" or names != MESSAGE_ELEMENTS:
        raise RecordError("rendered message does not have the expected SOAP structure")
    return root
