"""A throwaway PKI for tests: the ESB's CA, its server and our client, plus a rogue CA.

Everything is made at run time with trustme, so no key ever lives in the repository and
no certificate can expire between test runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import trustme

# The identity the program presents to the ESB; the simulator reports it as client_subject.
CLIENT_NAME = "knack-311-client"
ROGUE_CLIENT_NAME = "rogue-client"
# The simulators listen on loopback; clients may use either name for it.
SERVER_NAMES = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class PKIFiles:
    ca_bundle: Path  # CA that signed the ESB server cert (give to the client as ESB_CA_BUNDLE)
    server_cert: Path  # server cert chain PEM for 127.0.0.1 / localhost
    server_key: Path
    client_ca_bundle: Path  # CA the server uses to verify client certs
    client_cert: Path  # the program's client cert (the file deployed as esb.cert)
    client_key: Path  # its private key (the file deployed as esb.pem)
    rogue_ca_bundle: Path  # an unrelated CA
    rogue_server_cert: Path  # a 127.0.0.1 server cert signed by the rogue CA
    rogue_server_key: Path
    rogue_client_cert: Path  # a client cert signed by the rogue CA (the ESB does not trust it)
    rogue_client_key: Path


def make_pki(directory: Path) -> PKIFiles:
    """Write a fresh set of PEM files into `directory` and return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    # One CA for both sides, as the city runs it: it signs the ESB's server certificate
    # and the client certificates the ESB accepts.
    ca = trustme.CA(organization_name="City ESB test CA")
    rogue_ca = trustme.CA(organization_name="Rogue test CA")

    server = ca.issue_cert(*SERVER_NAMES, common_name="esb.test")
    client = ca.issue_cert(CLIENT_NAME, common_name=CLIENT_NAME)
    rogue_server = rogue_ca.issue_cert(*SERVER_NAMES, common_name="rogue-esb.test")
    rogue_client = rogue_ca.issue_cert(ROGUE_CLIENT_NAME, common_name=ROGUE_CLIENT_NAME)

    def cert_file(name: str, blobs) -> Path:
        path = directory / name
        path.write_bytes(b"".join(blob.bytes() for blob in blobs))
        return path

    def key_file(name: str, leaf: trustme.LeafCert) -> Path:
        # Created 0600 from the start so the key is never readable by others, even briefly;
        # fchmod covers a file left over from an earlier run with looser permissions.
        path = directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(leaf.private_key_pem.bytes())
        return path

    ca_bundle = cert_file("esb-ca.pem", [ca.cert_pem])
    return PKIFiles(
        ca_bundle=ca_bundle,
        server_cert=cert_file("esb-server.pem", server.cert_chain_pems),
        server_key=key_file("esb-server-key.pem", server),
        client_ca_bundle=ca_bundle,
        # Named like the deployed files so a test's settings read like production's.
        client_cert=cert_file("esb.cert", client.cert_chain_pems),
        client_key=key_file("esb.pem", client),
        rogue_ca_bundle=cert_file("rogue-ca.pem", [rogue_ca.cert_pem]),
        rogue_server_cert=cert_file("rogue-server.pem", rogue_server.cert_chain_pems),
        rogue_server_key=key_file("rogue-server-key.pem", rogue_server),
        rogue_client_cert=cert_file("rogue-client.cert", rogue_client.cert_chain_pems),
        rogue_client_key=key_file("rogue-client.pem", rogue_client),
    )
