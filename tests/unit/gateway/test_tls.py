"""https:// upstreams through the gateway: which certificates it trusts, and its own for mutual TLS.

A test CA, a server certificate for 127.0.0.1 and a client certificate are made in
``tmp_path``; the upstream is Python's ssl module serving HTTP from a thread; the gateway is
the real app (``create_app``) with a route file, driven by its test client. Nothing else runs,
so the tests are not marked ``slow``.
"""
from __future__ import annotations

import json
import warnings

import pytest
from urllib3.exceptions import InsecureRequestWarning

from app.gateway.routefile import RouteFileError
from tests.services import logged, wait_until
from tests.tls_support import make_certificates, serve_https

CA_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(autouse=True)
def default_trust(monkeypatch):
    """No CA bundle named in the environment: the default is certifi's, which does not know the test CA."""
    for name in CA_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def upstream(certificates):
    with serve_https(certificates) as server:
        yield server


@pytest.fixture
def mtls_upstream(certificates):
    with serve_https(certificates, require_client_cert=True) as server:
        yield server


@pytest.fixture
def gateway(make_app):
    """``gateway(target, tls_yaml)``: the test client of an app whose route /secure goes to
    ``target`` with ``tls: <tls_yaml>`` (the upstream answers HTTP/1.0: no connection stays open)."""

    def build(target: str, tls: str | None = None):
        routes = f"""
            upstreams:
              secure:
                targets: ["{target}"]
                timeout: {{connect: 2, read: 2}}
                {f"tls: {tls}" if tls else ""}
            routes:
              - path: /secure
                upstream: secure
                strip_prefix: true
            """
        return make_app(routes=routes).test_client()

    return build


def get(client, path: str = "/secure/hello"):
    response = client.get(path)
    try:
        return response.status_code, response.headers["Content-Type"], response.get_data()
    finally:
        response.close()


def handshake_failed(upstream) -> None:
    # The server's thread counts it after the alert went out, maybe after the gateway answered.
    wait_until(lambda: upstream.failed_handshakes == 1, 2, "the upstream counted one failed TLS handshake", interval=0.01)


def flow(value: object) -> str:
    """A YAML flow mapping (JSON is YAML) for the route file's ``tls:``."""
    return json.dumps(value)


def test_an_upstream_signed_by_the_named_ca_is_reached(gateway, upstream, certificates):
    client = gateway(upstream.url, flow({"ca_file": str(certificates.ca)}))

    status, _, body = get(client)

    assert (status, body) == (200, b"hello over TLS")
    assert upstream.paths == ["/hello"]


def test_without_the_ca_the_upstream_is_refused(gateway, upstream):
    client = gateway(upstream.url)  # certifi's bundle: the test CA is not in it

    status, content_type, body = get(client)

    assert (status, content_type) == (502, "application/problem+json")
    assert json.loads(body)["detail"] == "The TLS handshake with the upstream failed"
    assert upstream.paths == []  # no request reached it
    handshake_failed(upstream)


def test_the_ca_bundle_of_the_environment_is_trusted(gateway, upstream, certificates, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificates.ca))
    client = gateway(upstream.url)

    status, _, body = get(client)

    assert (status, body) == (200, b"hello over TLS")


def test_verify_false_accepts_any_certificate_without_a_warning_per_request(gateway, upstream):
    with logged("frontdoor.forward") as records:
        client = gateway(upstream.url, flow({"verify": False}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [get(client) for _ in range(2)]

    assert [(status, body) for status, _, body in results] == [(200, b"hello over TLS")] * 2
    assert [w for w in caught if issubclass(w.category, InsecureRequestWarning)] == []
    [record] = records.records  # said once, when the upstream was built
    assert record.getMessage() == f"upstream secure: TLS certificates of {upstream.url.removeprefix('https://')} are not verified (tls.verify: false)"


def test_an_upstream_requiring_a_client_certificate_refuses_the_gateway_without_one(gateway, mtls_upstream, certificates):
    client = gateway(mtls_upstream.url, flow({"ca_file": str(certificates.ca)}))

    status, content_type, _ = get(client)

    assert (status, content_type) == (502, "application/problem+json")
    assert mtls_upstream.paths == []
    handshake_failed(mtls_upstream)


@pytest.mark.parametrize("key_apart", [True, False], ids=["key-file", "key-in-cert-file"])
def test_an_upstream_requiring_a_client_certificate_gets_the_gateways(gateway, mtls_upstream, certificates, key_apart):
    tls = {"ca_file": str(certificates.ca)}
    if key_apart:
        tls |= {"client_cert": str(certificates.client_cert), "client_key": str(certificates.client_key)}
    else:
        tls |= {"client_cert": str(certificates.client_combined)}
    client = gateway(mtls_upstream.url, flow(tls))

    status, _, body = get(client)

    assert (status, body) == (200, b"hello over TLS")
    assert mtls_upstream.client_subjects == [(("organizationName", "Frontdoor tests"), ("commonName", certificates.client_name))]


@pytest.mark.parametrize(
    ("tls", "problem"),
    [
        ({"ca_file": "{missing}"}, "ca_file: no such file: {missing}"),
        ({"client_cert": "{missing}"}, "client_cert: no such file: {missing}"),
        ({"client_key": "{ca}"}, "client_key needs client_cert"),
    ],
    ids=["ca_file", "client_cert", "client_key-alone"],
)
def test_tls_files_that_cannot_be_used_are_rejected_when_the_route_file_loads(gateway, certificates, tmp_path, tls, problem):
    names = {"missing": str(tmp_path / "no-such-file.pem"), "ca": str(certificates.ca)}

    with pytest.raises(RouteFileError) as caught:
        gateway("https://127.0.0.1:9", flow({key: value.format(**names) for key, value in tls.items()}))

    message = str(caught.value)
    assert "upstreams.secure.tls" in message
    assert problem.format(**names) in message
