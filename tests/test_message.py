"""The message: the 311 rules (message_values) and the XML (render_message), including hostile text."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import jinja2.meta
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from config import CONFIG
from knack311.errors import RecordError
from knack311.message import (
    MAX_VALUE_BYTES,
    MESSAGE_ELEMENTS,
    TEMPLATE_NAME,
    TEMPLATES_DIR,
    Activity,
    NotFor311,
    closed_duplicate_as_resolved,
    message_values,
    render_message,
)
from knack311.settings import TEMPLATE_FIELDS

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
ACC = "http://www.austintexas.gov/AcceptKnack/"
TIMESTAMP = "2024-05-01T10:00:00-05:00"

# the whole document, in order: (namespace, local name)
EXPECTED_TAGS = [
    (SOAP, "Envelope"), (SOAP, "Header"), (SOAP, "Body"), (ACC, "submitKnack"),
    (None, "header"), (None, "emi"), (None, "timestamp"), (None, "source"), (None, "target"), (None, "data_type"),
    (None, "event"),
    (None, "data"), (None, "csr"), (None, "id"), (None, "csr_activity_id"), (None, "sr_number"),
    (None, "issue_status_code"), (None, "activity_type_code"), (None, "activity_details"), (None, "outcome_code"),
    (None, "activity_date"),
]

CODES = {"Dispatch Technician": "DISPTECH", "Close Issue (Duplicate)": "CLOIS001", "Post Tweet": None}

ACTIVITY = Activity(
    record_id="5d7964422d7159001659b27a",
    atd_activity_id="ACT-000123",
    emi_id="EMI-42",
    sr_number="24-00012345",
    issue_status_code_snapshot="in_progress",
    activity_name="Dispatch Technician",
    activity_datetime="2018-07-03T10:26:00-05:00",
    activity_details="Crew dispatched",
    csr_activity_id="",
    csr_activity_code="",
)

# our own reference, from the XML 1.0 Char production:
#   #x9 | #xA | #xD | [#x20-#xD7FF] | [#xE000-#xFFFD] | [#x10000-#x10FFFF]


def xml_char(c: str) -> bool:
    cp = ord(c)
    return (cp in (0x9, 0xA, 0xD) or 0x20 <= cp <= 0xD7FF or 0xE000 <= cp <= 0xFFFD
            or 0x10000 <= cp <= 0x10FFFF)


def xml_allowed(text: str) -> str:
    return "".join(c for c in text if xml_char(c))


def parse(body: bytes) -> etree._Element:
    # a strict parser of our own: no entity expansion, no DTD, no network
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    return etree.fromstring(body, parser)


def assert_structure(body: bytes) -> etree._Element:
    """Well-formed, ASCII, exactly the expected elements in order, and nothing else in the tree."""
    assert isinstance(body, bytes)
    body.decode("ascii")  # raises on any byte >= 0x80
    root = parse(body)
    assert root.getroottree().docinfo.doctype == ""
    nodes = list(root.iter())
    assert all(isinstance(n.tag, str) for n in nodes), "comment, PI or entity node in the message"
    tags = [(etree.QName(n).namespace, etree.QName(n).localname) for n in nodes]
    assert tags == EXPECTED_TAGS
    assert tuple(name for _, name in tags) == MESSAGE_ELEMENTS
    # every element is a leaf except the containers
    containers = {"Envelope", "Body", "submitKnack", "header", "data", "csr"}
    for n in nodes:
        if etree.QName(n).localname not in containers:
            assert len(n) == 0
    return root


def text_of(root: etree._Element, name: str) -> str:
    found = [n for n in root.iter() if etree.QName(n).localname == name]
    assert len(found) == 1, name
    return found[0].text or ""


def render(activity: Activity, codes=CODES, timestamp=TIMESTAMP) -> bytes:
    return render_message(message_values(activity, codes), timestamp)


# --- message_values: the 311 rules -------------------------------------------------------------------------

def test_csr_activity_code_wins_over_the_lookup():
    activity = dataclasses.replace(ACTIVITY, csr_activity_code="REMORESU")
    assert message_values(activity, CODES)["activity_type_code"] == "REMORESU"


def test_csr_activity_code_wins_even_for_internal_or_unknown_names():
    for name in ("Post Tweet", "No Such Activity"):
        activity = dataclasses.replace(ACTIVITY, activity_name=name, csr_activity_code="311FEEDB")
        assert message_values(activity, CODES)["activity_type_code"] == "311FEEDB"


def test_name_is_looked_up():
    assert message_values(ACTIVITY, CODES)["activity_type_code"] == "DISPTECH"


def test_name_mapped_to_none_is_not_for_311():
    with pytest.raises(NotFor311):
        message_values(dataclasses.replace(ACTIVITY, activity_name="Post Tweet"), CODES)


@pytest.mark.parametrize("name", ["Fly to the Moon", "", "dispatch technician"])
def test_name_missing_from_the_map_is_a_record_error(name):
    with pytest.raises(RecordError) as err:
        message_values(dataclasses.replace(ACTIVITY, activity_name=name), CODES)
    assert repr(name) in str(err.value)


@pytest.mark.parametrize("status, expected", [
    ("closed_duplicate", "closed_resolved"),
    ("closed_resolved", "closed_resolved"),
    ("in_progress", "in_progress"),
    ("closed_no_action", "closed_no_action"),
    ("", ""),
])
def test_issue_status_override(status, expected):
    assert closed_duplicate_as_resolved(status) == expected
    root = assert_structure(render(dataclasses.replace(ACTIVITY, issue_status_code_snapshot=status)))
    assert text_of(root, "issue_status_code") == expected


def test_message_values_carry_the_activity():
    activity = dataclasses.replace(ACTIVITY, csr_activity_id="CSR-9")
    assert message_values(activity, CODES) == {
        "id": ACTIVITY.record_id,
        "emi_id": "EMI-42",
        "csr_activity_id": "CSR-9",
        "sr_number": "24-00012345",
        "issue_status_code_snapshot": "in_progress",
        "activity_type_code": "DISPTECH",
        "activity_details": "Crew dispatched",
        "activity_datetime": "2018-07-03T10:26:00-05:00",
    }


def test_template_variables_are_named_after_config_fields():
    # a reader of the template sees which Knack field fills which element: every variable is a key of
    # config.py `fields`, except the publication time and the one value 311's rule derives
    source = (TEMPLATES_DIR / TEMPLATE_NAME).read_text()
    environment = jinja2.Environment()
    environment.filters["closed_duplicate_as_resolved"] = closed_duplicate_as_resolved
    variables = jinja2.meta.find_undeclared_variables(environment.parse(source))
    derived = {"publication_time", "activity_type_code"}
    assert variables - derived <= set(TEMPLATE_FIELDS)
    for app in CONFIG.values():
        assert variables - derived <= set(app["fields"])
    assert set(message_values(ACTIVITY, CODES)) == variables - {"publication_time"}


# --- render_message ----------------------------------------------------------------------------------------

def test_rendered_message_shape_and_values():
    body = render(dataclasses.replace(ACTIVITY, issue_status_code_snapshot="closed_duplicate"))
    root = assert_structure(body)
    assert root.nsmap == {"soapenv": SOAP, "acc": ACC}
    assert root.tag == f"{{{SOAP}}}Envelope"
    expected = {
        "emi": "EMI-42", "timestamp": TIMESTAMP, "source": "KNACK", "target": "CSR", "data_type": "CSR",
        "event": "UPDATE", "id": "5d7964422d7159001659b27a", "csr_activity_id": "", "sr_number": "24-00012345",
        "issue_status_code": "closed_resolved", "activity_type_code": "DISPTECH",
        "activity_details": "Crew dispatched", "outcome_code": "COMPLET1",
        "activity_date": "2018-07-03T10:26:00-05:00",
    }
    for name, value in expected.items():
        assert text_of(root, name) == value, name


def test_empty_csr_activity_id_is_an_empty_element():
    root = assert_structure(render(ACTIVITY))
    (el,) = [n for n in root.iter() if etree.QName(n).localname == "csr_activity_id"]
    assert el.text is None and len(el) == 0


AWKWARD = [
    "Tom & Jerry <b>bold</b> a > b",
    "end of CDATA ]]> here",
    "quotes \" and ' and `",
    "café, naïve, Zoë é",
    "日本語のテキスト",
    "emoji 🚦🚧👷‍♀️ done",
    "tab\there\tand\tthere",
    "windows\r\nline\r\nbreaks\r\n",
    "bare\rcarriage return",
    "unix\nnewline",
    "  leading and trailing spaces  ",
    "&amp; &lt; &#233; &#x1F6A6; &unknown;",
    "<![CDATA[not cdata]]>",
    "<?pi data?><!-- comment -->",
    "\u00a0nbsp\u2028line sep\u0085nel\ufeffbom",
]


@pytest.mark.parametrize("text", AWKWARD)
@pytest.mark.parametrize("field", ["activity_details", "sr_number", "emi_id", "record_id", "csr_activity_id"])
def test_awkward_text_round_trips(field, text):
    root = assert_structure(render(dataclasses.replace(ACTIVITY, **{field: text})))
    element = {"activity_details": "activity_details", "sr_number": "sr_number", "emi_id": "emi",
               "record_id": "id", "csr_activity_id": "csr_activity_id"}[field]
    assert text_of(root, element) == text


@pytest.mark.parametrize("text", AWKWARD)
def test_awkward_csr_activity_code_round_trips(text):
    root = assert_structure(render(dataclasses.replace(ACTIVITY, csr_activity_code=text)))
    assert text_of(root, "activity_type_code") == text


def test_non_ascii_is_sent_as_character_references():
    body = render(dataclasses.replace(ACTIVITY, activity_details="é 日 🚦"))
    assert b"&#233;" in body and b"&#26085;" in body and b"&#128678;" in body


@pytest.mark.parametrize("details", [
    "</activity_details><sr_number>X</sr_number>",
    "</activity_details><sr_number>X</sr_number><activity_details>",
    "<!DOCTYPE x [<!ENTITY e 'boom'>]>&e;",
    "]]></activity_details></csr></data></acc:submitKnack></soapenv:Body></soapenv:Envelope><x>",
    "<!ENTITY xxe SYSTEM 'file:///etc/passwd'>&xxe;",
])
def test_xml_injection_in_details_is_plain_text(details):
    root = assert_structure(render(dataclasses.replace(ACTIVITY, activity_details=details)))
    assert text_of(root, "sr_number") == "24-00012345"
    assert text_of(root, "activity_details") == details


def test_xml_injection_in_sr_number():
    sr = "24-1</sr_number><issue_status_code>closed_resolved</issue_status_code><sr_number>"
    root = assert_structure(render(dataclasses.replace(ACTIVITY, sr_number=sr)))
    assert text_of(root, "sr_number") == sr
    assert text_of(root, "issue_status_code") == "in_progress"


def test_forbidden_characters_are_dropped():
    details = "a\x00b\x01c\x08d\x0be\x0cf\x1fg\ufffeh\uffffi\ud800j"
    root = assert_structure(render(dataclasses.replace(ACTIVITY, activity_details=details)))
    assert text_of(root, "activity_details") == "abcdefghij"


def test_timestamp_is_rendered():
    root = assert_structure(render(ACTIVITY, timestamp="2024-11-03T01:30:00-06:00"))
    assert text_of(root, "timestamp") == "2024-11-03T01:30:00-06:00"


# --- property-based: any text in any field -----------------------------------------------------------------

ANY_TEXT = st.one_of(
    st.text(),                                                        # all of Unicode except surrogates
    st.text(alphabet=st.characters(blacklist_categories=())),         # surrogates and controls too
    st.text(alphabet=st.sampled_from("<>&'\"]\r\n\t\x00\x0b\x1f;#x!-[?/ae\u00e9\ufffe\uffff\ud800\U0001F6A6")),
)

# field of Activity -> element of the message that shows it
SHOWN_AS = {
    "activity_details": "activity_details",
    "sr_number": "sr_number",
    "emi_id": "emi",
    "record_id": "id",
    "csr_activity_id": "csr_activity_id",
    "activity_datetime": "activity_date",
    "issue_status_code_snapshot": "issue_status_code",
    "csr_activity_code": "activity_type_code",
}

FIXED = {
    "emi": "EMI-42", "source": "KNACK", "target": "CSR", "data_type": "CSR", "event": "UPDATE",
    "outcome_code": "COMPLET1", "timestamp": TIMESTAMP,
}

PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, database=None,
                             suppress_health_check=[HealthCheck.too_slow])


def expected_text(field: str, text: str) -> str:
    if field == "issue_status_code_snapshot" and text.strip().lower() == "closed_duplicate":
        return "closed_resolved"
    if field == "csr_activity_code" and not text:
        return CODES[ACTIVITY.activity_name]
    return xml_allowed(text)


@PROPERTY_SETTINGS
@given(field=st.sampled_from(sorted(SHOWN_AS)), text=ANY_TEXT)
def test_any_text_in_any_field(field, text):
    body = render(dataclasses.replace(ACTIVITY, **{field: text}))
    root = assert_structure(body)
    assert text_of(root, SHOWN_AS[field]) == expected_text(field, text)
    # the other fields are untouched
    for name, value in FIXED.items():
        if name != SHOWN_AS[field]:
            assert text_of(root, name) == value


@PROPERTY_SETTINGS
@given(text=ANY_TEXT)
def test_any_text_in_every_field_at_once(text):
    activity = dataclasses.replace(ACTIVITY, **{field: text for field in SHOWN_AS})
    root = assert_structure(render(activity))
    for field, element in SHOWN_AS.items():
        assert text_of(root, element) == expected_text(field, text), field


@PROPERTY_SETTINGS
@given(text=ANY_TEXT)
def test_any_text_as_timestamp(text):
    root = assert_structure(render(ACTIVITY, timestamp=text))
    assert text_of(root, "timestamp") == xml_allowed(text)


@PROPERTY_SETTINGS
@given(name=ANY_TEXT, code=ANY_TEXT.filter(lambda s: s.strip()))
def test_any_activity_name_and_config_code(name, code):
    # the name only selects the code; the code (from config.py) is what 311 sees
    root = assert_structure(render(dataclasses.replace(ACTIVITY, activity_name=name), codes={name: code}))
    assert text_of(root, "activity_type_code") == xml_allowed(code)


def test_reference_filter_agrees_with_the_production():
    # guards our own reference: the boundaries of each range of the Char production
    allowed = [0x9, 0xA, 0xD, 0x20, 0xD7FF, 0xE000, 0xFFFD, 0x10000, 0x10FFFF]
    forbidden = [0x0, 0x8, 0xB, 0xC, 0xE, 0x1F, 0xD800, 0xDFFF, 0xFFFE, 0xFFFF]
    assert all(xml_char(chr(cp)) for cp in allowed)
    assert not any(xml_char(chr(cp)) for cp in forbidden)


def test_messages_render_and_check_from_many_threads_at_once():
    # The run renders in its main thread and in the delivery workers at the same time; an lxml parser shared
    # between threads crashed the process ("double free or corruption"). Each thread must get the same bytes.
    activities = [dataclasses.replace(ACTIVITY, activity_details=f"detail {n} <&> caf\u00e9 " * (n % 7 + 1))
                  for n in range(400)]
    expected = [render(a) for a in activities]

    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            assert list(pool.map(render, activities)) == expected


# --- how long a value may be -----------------------------------------------------------------------------------

@pytest.mark.parametrize("character", ["a", "\u00e9", "\u4e2d", "\U0001F6A6", "\r"],
                         ids=["ascii", "2-byte", "3-byte", "4-byte", "bare-CR"])
def test_a_value_at_the_limit_renders_and_parses_without_huge_tree(character):
    # the most each character costs: 4 bytes of UTF-8 and a 10-byte character reference on the wire (&#128678;),
    # or a 5-byte reference for a 1-byte CR; lxml parses a text node of at most 10,000,000 bytes without huge_tree
    text = character * (MAX_VALUE_BYTES // len(character.encode("utf-8")))
    root = assert_structure(render(dataclasses.replace(ACTIVITY, activity_details=text)))
    assert text_of(root, "activity_details") == text


@pytest.mark.parametrize("field", ["activity_details", "sr_number", "emi_id", "csr_activity_id"])
def test_a_value_one_byte_over_the_limit_is_bad_data_naming_the_field_and_size(field):
    too_long = "\u00e9" * (MAX_VALUE_BYTES // 2) + "x"
    with pytest.raises(RecordError) as refused:
        message_values(dataclasses.replace(ACTIVITY, **{field: too_long}), CODES)
    assert str(refused.value).startswith(f"{field} is 1.0 MB (1,000,001 bytes of UTF-8); a 311 message takes at most "
                                         "1 MB (1,000,000 bytes) per value")
