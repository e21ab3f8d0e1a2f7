"""soap_fault: the ESB's verdict on a message, read from the reply body."""

from __future__ import annotations

import pytest

from knack311.esb import soap_fault

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
