"""Reading the ESB's answer: soap_fault and read_body (what the body is), judge (what an answer means), and
the one-line excerpt of an answer for a FAILED line."""

from __future__ import annotations

import pytest

from knack311.esb_answers import EXCERPT_CHARS, Body, Verdict, excerpt, judge, one_line, read_body, soap_fault

SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"

SOAP11_FAULT = f"""<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="{SOAP11}">
  <soapenv:Body>
    <soapenv:Fault>
      <faultcode>soapenv:Client</faultcode>
      <faultstring>Invalid sr_number: 24-00012345 not found</faultstring>
      <detail><code>E1042</code></detail>
    </soapenv:Fault>
  </soapenv:Body>
</soapenv:Envelope>""".encode()

SOAP12_FAULT = f"""<?xml version="1.0" encoding="UTF-8"?>
<env:Envelope xmlns:env="{SOAP12}">
  <env:Body>
    <env:Fault>
      <env:Code><env:Value>env:Sender</env:Value></env:Code>
      <env:Reason><env:Text xml:lang="en">Unknown activity type code</env:Text></env:Reason>
    </env:Fault>
  </env:Body>
</env:Envelope>""".encode()

SUCCESS = f"""<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="{SOAP11}" xmlns:acc="http://www.austintexas.gov/AcceptKnack/">
  <soapenv:Body>
    <acc:submitKnackResponse><status>OK</status></acc:submitKnackResponse>
  </soapenv:Body>
</soapenv:Envelope>""".encode()


def test_soap11_fault_gives_its_faultstring():
    assert soap_fault(SOAP11_FAULT) == "Invalid sr_number: 24-00012345 not found"


def test_soap12_fault_gives_its_text():
    assert soap_fault(SOAP12_FAULT) == "Unknown activity type code"


def test_success_envelope_is_none():
    assert soap_fault(SUCCESS) is None


def test_success_that_mentions_fault_is_none():
    body = SUCCESS.replace(b"<status>OK</status>", b"<status>OK</status><note>no Fault found</note>")
    assert soap_fault(body) is None


@pytest.mark.parametrize("body", [
    b"",
    b"Fault",
    b"Internal Server Error: Fault in backend",
    b"<html><body><h1>502 Bad Gateway</h1><p>Fault<br></p></body></html>",
    b"<soapenv:Fault>unclosed",
    b"\x00\xff\xfeFault",
    b'{"Fault": "json, not xml"}',
])
def test_empty_or_non_xml_is_none(body):
    assert soap_fault(body) is None


def test_fault_without_text_is_empty_string():
    body = (f'<e:Envelope xmlns:e="{SOAP11}"><e:Body><e:Fault><faultcode>e:Server</faultcode></e:Fault>'
            '</e:Body></e:Envelope>')
    assert soap_fault(body.encode()) == ""


def test_fault_text_whitespace_is_collapsed_and_length_capped():
    text = "line one\n   line two\t" + "x" * 500
    body = (f'<e:Envelope xmlns:e="{SOAP11}"><e:Body><e:Fault><faultcode>e:Server</faultcode>'
            f"<faultstring>{text}</faultstring></e:Fault></e:Body></e:Envelope>").encode()
    result = soap_fault(body)
    assert result.startswith("line one line two xxx")
    assert len(result) == 200


def test_fault_of_another_namespace_is_not_a_soap_fault():
    body = b'<Envelope><Body><Fault><faultstring>not SOAP</faultstring></Fault></Body></Envelope>'
    assert soap_fault(body) is None


def test_non_ascii_fault_text():
    body = (f'<?xml version="1.0" encoding="UTF-8"?><e:Envelope xmlns:e="{SOAP11}"><e:Body><e:Fault>'
            "<faultcode>e:Client</faultcode><faultstring>Caf\u00e9 &#26085; &amp; co</faultstring>"
            "</e:Fault></e:Body></e:Envelope>").encode()
    assert soap_fault(body) == "Caf\u00e9 \u65e5 & co"


def test_external_entity_is_not_resolved(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-VALUE")
    body = (f'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x SYSTEM "file://{secret}">]>'
            f'<e:Envelope xmlns:e="{SOAP11}"><e:Body><e:Fault><faultcode>e:Server</faultcode>'
            "<faultstring>leak: &x;</faultstring></e:Fault></e:Body></e:Envelope>").encode()
    result = soap_fault(body)
    assert result is not None and result.startswith("leak:")
    assert "TOP-SECRET-VALUE" not in result


# ----- what an answer is, and what it means (issue 7§3, 7§4) -------------------------------------------------------

def utf16(text: str) -> bytes:
    return text.replace('encoding="UTF-8"', 'encoding="UTF-16"').encode("utf-16")  # with a BOM


def test_a_utf16_fault_with_bom_and_declaration_is_found():
    body = utf16(SOAP11_FAULT.decode())
    assert b"Fault" not in body  # what the old byte shortcut looked for
    assert soap_fault(body) == "Invalid sr_number: 24-00012345 not found"


def test_a_utf16_soap12_fault_is_found():
    assert soap_fault(utf16(SOAP12_FAULT.decode())) == "Unknown activity type code"


def test_a_bare_fault_in_a_soap_body_is_a_fault():
    body = (f'<e:Envelope xmlns:e="{SOAP11}"><e:Body><Fault><faultcode>Client</faultcode>'
            "<faultstring>bare</faultstring></Fault></e:Body></e:Envelope>").encode()
    assert soap_fault(body) == "bare"


def test_a_fault_of_a_foreign_namespace_in_a_soap_body_is_a_fault():
    body = (f'<e:Envelope xmlns:e="{SOAP11}"><e:Body><x:Fault xmlns:x="urn:vendor"><x:faultstring>vendor'
            "</x:faultstring></x:Fault></e:Body></e:Envelope>").encode()
    assert soap_fault(body) == "vendor"


def test_leading_whitespace_before_the_declaration_is_tolerated():
    assert soap_fault(b"\n\n  " + SOAP11_FAULT) == "Invalid sr_number: 24-00012345 not found"


@pytest.mark.parametrize("body,kind", [
    (b"", Body.EMPTY),
    (b"  \r\n", Body.EMPTY),
    (SUCCESS, Body.SOAP),
    (f'<e:Envelope xmlns:e="{SOAP12}"><e:Body/></e:Envelope>'.encode(), Body.SOAP),
    (f'<e:Envelope xmlns:e="{SOAP11}"/>'.encode(), Body.SOAP),
    (SOAP11_FAULT, Body.FAULT),
    (SOAP12_FAULT, Body.FAULT),
    (b"<html><body>Access denied</body></html>", Body.OTHER),
    (b'{"status": "ok"}', Body.OTHER),
    (b"OK", Body.OTHER),
    (b"<result>OK</result>", Body.OTHER),
    (b"<Envelope><Body/></Envelope>", Body.OTHER),  # no SOAP namespace: not SOAP
    (b"\xff\xfe\x00garbage", Body.OTHER),
])
def test_read_body_tells_the_kinds_apart(body, kind):
    assert read_body(body)[0] is kind


def test_entities_are_never_expanded():
    declarations = '<!ENTITY a "aaaaaaaaaa">' + "".join(
        f'<!ENTITY {c} "{("&" + p + ";") * 10}">' for p, c in zip("abcdefgh", "bcdefghi", strict=True))

    def fault_with(reference: str) -> bytes:
        return (f'<?xml version="1.0"?><!DOCTYPE e [{declarations}]><e:Envelope xmlns:e="{SOAP11}"><e:Body>'
                f"<e:Fault><faultstring>{reference}</faultstring></e:Fault></e:Body></e:Envelope>").encode()

    assert read_body(fault_with("&b;")) == (Body.FAULT, "&b;")  # left as a reference, not 100 characters
    kind, text = read_body(fault_with("&i;"))  # 10**9 characters if expanded: libxml2 refuses the document
    assert kind is Body.OTHER and text == ""


@pytest.mark.parametrize("status,body,verdict", [
    (200, SUCCESS, Verdict.ACCEPTED),
    (200, b"", Verdict.ACCEPTED),
    (202, b"", Verdict.ACCEPTED),
    (200, SOAP11_FAULT, Verdict.REJECTED),
    (500, SOAP11_FAULT, Verdict.REJECTED),
    (400, b"bad request", Verdict.REJECTED),
    (404, b"", Verdict.REJECTED),
    (200, b"<html>Access denied</html>", Verdict.UNKNOWN),
    (200, b'{"ok": true}', Verdict.UNKNOWN),
    (502, b"", Verdict.UNKNOWN),
    (504, SOAP11_FAULT, Verdict.UNKNOWN),  # a gateway's Fault is about its upstream
    (500, b"Internal Server Error", Verdict.SERVICE_ERROR),  # tried again, like the original script
    (500, SUCCESS, Verdict.SERVICE_ERROR),
    (501, b"", Verdict.UNKNOWN),
    (303, b"", Verdict.UNKNOWN),
    (503, b"", Verdict.RETRY),
    (503, SOAP11_FAULT, Verdict.RETRY),
    (429, b"", Verdict.RETRY),
    (408, b"", Verdict.RETRY),
    (301, b"", Verdict.MISDIRECTED),
    (307, b"", Verdict.MISDIRECTED),
])
def test_judge(status, body, verdict):
    assert judge(status, "Reason", body)[0] is verdict


def test_an_oversize_2xx_is_unknown_and_an_oversize_4xx_still_a_rejection():
    assert judge(200, "OK", b"", too_large=True)[0] is Verdict.UNKNOWN
    verdict, line = judge(400, "Bad Request", b"", too_large=True)
    assert verdict is Verdict.REJECTED and "over 1 MB" in line


def test_a_rejection_line_carries_the_start_of_the_answer_on_one_line():
    body = "<html>\n<h1>Denied \x1b[2J\x00</h1>\u202e\r\n".encode() + b"y" * 1000
    verdict, line = judge(403, "Forbidden", body, charset="utf-8")
    assert verdict is Verdict.REJECTED
    assert "\n" not in line and "\x1b" not in line and "\x00" not in line and "\u202e" not in line
    assert line.startswith("ESB rejected the message: HTTP 403 Forbidden; answer: "
                           "<html> <h1>Denied \\x1b[2J\\x00</h1>\\u202e yyy")
    shown = "<html> <h1>Denied \x1b[2J\x00</h1>\u202e "
    assert line.count("y") == EXCERPT_CHARS - len(shown)


def test_the_excerpt_decodes_utf16_and_the_declared_charset():
    assert excerpt("<a>Caf\u00e9</a>".encode("utf-16")) == "<a>Caf\u00e9</a>"
    assert excerpt("Caf\u00e9".encode("latin-1"), "iso-8859-1") == "Caf\u00e9"
    assert excerpt("Caf\u00e9".encode("latin-1"), "no-such-charset") == "Caf\ufffd"
    assert excerpt(b"") == "(empty)"


def test_one_line_escapes_control_and_format_characters():
    assert one_line("a\tb\r\nc\x07d\u202ee\x85", 100) == "a b c\\x07d\\u202ee"
    assert one_line("x" * 500, 300) == "x" * 300
