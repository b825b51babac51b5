"""A test certificate authority and an HTTPS server on loopback, for tests of https:// upstreams."""
from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Certificates:
    """PEM files: the CA, the server's certificate for 127.0.0.1 and localhost, and a client's."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_combined: Path  # the client's certificate and key in one file
    client_name: str  # the client certificate's common name


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Frontdoor tests"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def make_certificates(directory: Path) -> Certificates:
    """Write a CA, a server certificate (SAN IP:127.0.0.1, DNS:localhost) and a client
    certificate (clientAuth) it signed into ``directory``, as PEM files (EC P-256 keys)."""
    leaf_usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)  # digitalSignature
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue(
        "Frontdoor test CA",
        ca_key,
        None,
        [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (x509.KeyUsage(True, False, False, False, False, True, True, False, False), True),  # + keyCertSign, cRLSign
        ],
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(
        "127.0.0.1",
        server_key,
        (ca, ca_key),
        [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (leaf_usage, True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), False),
        ],
    )
    client_name = "frontdoor-gateway"
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue(
        client_name,
        client_key,
        (ca, ca_key),
        [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (leaf_usage, True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
        ],
    )

    def write(name: str, data: bytes) -> Path:
        path = directory / name
        path.write_bytes(data)
        return path

    client_pem = client.public_bytes(serialization.Encoding.PEM)
    return Certificates(
        ca=write("ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
        server_cert=write("server.pem", server.public_bytes(serialization.Encoding.PEM)),
        server_key=write("server.key", _key_pem(server_key)),
        client_cert=write("client.pem", client_pem),
        client_key=write("client.key", _key_pem(client_key)),
        client_combined=write("client-combined.pem", client_pem + _key_pem(client_key)),
        client_name=client_name,
    )


@dataclass
class HTTPSUpstream:
    """An HTTPS server on 127.0.0.1 in a thread: answers every GET with 200 ``body``.

    ``client_subjects`` has the subject of each verified client certificate (a tuple of
    ``(name, value)`` pairs, as ``ssl.SSLSocket.getpeercert`` gives it); ``failed_handshakes``
    counts the TLS handshakes it refused or that failed.
    """

    url: str
    body: bytes
    paths: list[str] = field(default_factory=list)
    client_subjects: list[tuple] = field(default_factory=list)
    failed_handshakes: int = 0


class _TLSServer(ThreadingHTTPServer):
    """Does each TLS handshake in the connection's own thread, not the one that accepts."""

    daemon_threads = True

    def __init__(self, context: ssl.SSLContext, record: HTTPSUpstream, handler: type[BaseHTTPRequestHandler]):
        super().__init__(("127.0.0.1", 0), handler)
        self.context = context
        self.record = record

    def finish_request(self, request, client_address) -> None:
        try:
            connection = self.context.wrap_socket(request, server_side=True)
        except OSError:  # ssl.SSLError included: the client did not trust us, or we it
            self.record.failed_handshakes += 1
            return
        try:
            self.RequestHandlerClass(connection, client_address, self)
        finally:
            connection.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: nothing is left open at shutdown

    def do_GET(self) -> None:
        record: HTTPSUpstream = self.server.record  # type: ignore[attr-defined]
        record.paths.append(self.path)
        peer = self.connection.getpeercert()
        if peer:
            record.client_subjects.append(tuple(pair for rdn in peer["subject"] for pair in rdn))
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(record.body)))
        self.end_headers()
        self.wfile.write(record.body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serve_https(certificates: Certificates, require_client_cert: bool = False, body: bytes = b"hello over TLS") -> Iterator[HTTPSUpstream]:
    """An HTTPSUpstream serving the server certificate while the block runs; with
    ``require_client_cert`` it refuses a client without a certificate the test CA signed (mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.server_cert, certificates.server_key)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(certificates.ca)
    record = HTTPSUpstream("", body)
    server = _TLSServer(context, record, _Handler)
    record.url = f"https://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield record
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
