"""JWT bearer tokens over HTTP: HS256 with a shared secret, RS256/ES256 from a JWKS URL, and scopes."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from app.auth.jwt import scopes_of
from app.extensions import db
from tests.factories import Identity
from tests.unit.auth.support import ROUTES, database_down, received

SECRET = "a-shared-secret-long-enough-for-hs512-" + "x" * 32  # RFC 7518 section 3.2: at least the hash size


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(sub: str = "acme", lifetime: float = 60, **more: object) -> dict:
    return {"sub": sub, "exp": int(time.time() + lifetime), **more}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def challenge_error(response) -> str:
    return response.headers["WWW-Authenticate"].split(", ")[1]


@pytest.fixture
def hs256(make_app):
    """An app that accepts HS256 tokens signed with SECRET, with a consumer ``acme``; returns (app, acme's id)."""

    built = []

    def build(**config):
        app = make_app(routes=ROUTES, JWT_SECRET=SECRET, **config)
        built.append(app)
        return app, Identity(app).consumer("acme")

    yield build
    for app in built:  # close its connections before a database of the test's own is dropped
        with app.app_context():
            db.engine.dispose()


def test_a_valid_hs256_token_identifies_its_consumer_to_the_upstream(hs256, upstream):
    app, acme = hs256()

    response = app.test_client().get("/private", headers=bearer(jwt.encode(claims(), SECRET)))

    assert response.status_code == 200
    assert received(upstream)["X-Consumer-ID"] == acme
    assert received(upstream)["X-Consumer-Username"] == "acme"


def test_the_subject_may_be_the_consumer_id(hs256, upstream):
    app, acme = hs256()

    response = app.test_client().get("/private", headers=bearer(jwt.encode(claims(sub=acme), SECRET)))

    assert response.status_code == 200
    assert received(upstream)["X-Consumer-ID"] == acme


def test_an_expired_token_is_a_401_that_says_so(hs256, upstream):
    app, _ = hs256()

    response = app.test_client().get("/private", headers=bearer(jwt.encode(claims(lifetime=-30), SECRET)))

    assert response.status_code == 401
    assert challenge_error(response) == 'error="invalid_token"'
    assert 'error_description="The token has expired"' in response.headers["WWW-Authenticate"]
    assert response.json["detail"] == "The token has expired"
    assert len(upstream.calls) == 0


def test_a_token_within_the_leeway_is_accepted(hs256, upstream):
    app, _ = hs256(JWT_LEEWAY=60)

    response = app.test_client().get("/private", headers=bearer(jwt.encode(claims(lifetime=-30), SECRET)))

    assert response.status_code == 200


def test_an_unsigned_alg_none_token_is_refused(hs256, upstream):
    app, _ = hs256()
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims()).encode())

    response = app.test_client().get("/private", headers=bearer(f"{header}.{payload}."))

    assert response.status_code == 401
    assert challenge_error(response) == 'error="invalid_token"'
    assert response.json["detail"] == "The token's algorithm is not accepted"
    assert len(upstream.calls) == 0


BAD_TOKENS = {
    "wrong secret": lambda: jwt.encode(claims(), "another-secret-" + "y" * 64),
    "no sub": lambda: jwt.encode({"exp": int(time.time() + 60)}, SECRET),
    "no exp": lambda: jwt.encode({"sub": "acme"}, SECRET),
    "not valid yet": lambda: jwt.encode(claims(nbf=int(time.time() + 3600)), SECRET),
    "HS512": lambda: jwt.encode(claims(), SECRET, algorithm="HS512"),
    "not a JWT": lambda: "abc.def.ghi",
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_a_token_that_fails_verification_is_a_401(hs256, upstream, case):
    app, _ = hs256()

    response = app.test_client().get("/private", headers=bearer(BAD_TOKENS[case]()))

    assert response.status_code == 401
    assert challenge_error(response) == 'error="invalid_token"'
    assert len(upstream.calls) == 0


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ({"aud": "frontdoor-api", "iss": "https://idp.test"}, 200),
        ({"aud": ["other", "frontdoor-api"], "iss": "https://idp.test"}, 200),
        ({"iss": "https://idp.test"}, 401),
        ({"aud": "frontdoor-api"}, 401),
        ({"aud": "other-api", "iss": "https://idp.test"}, 401),
        ({"aud": "frontdoor-api", "iss": "https://evil.test"}, 401),
    ],
)
def test_audience_and_issuer_are_required_when_configured(hs256, upstream, extra, status):
    app, _ = hs256(JWT_AUDIENCE="frontdoor-api", JWT_ISSUER="https://idp.test")

    response = app.test_client().get("/private", headers=bearer(jwt.encode(claims(**extra), SECRET)))

    assert response.status_code == status


@pytest.mark.parametrize("sub", ["nobody", "disabled"])
def test_a_subject_that_is_not_an_enabled_consumer_is_a_401(hs256, upstream, sub):
    app, _ = hs256()
    Identity(app).consumer("disabled", disabled=True)

    response = app.test_client().get("/private", headers=bearer(jwt.encode(claims(sub=sub), SECRET)))

    assert response.status_code == 401
    assert response.json["detail"] == "The token's subject is not an enabled consumer"


@pytest.mark.parametrize(
    ("scope_claims", "status"),
    [
        ({"scope": "profile orders:read"}, 200),
        ({"scp": ["orders:read"]}, 200),
        ({"scope": "orders:write"}, 403),
        ({}, 403),
    ],
)
def test_scopes_in_the_token_satisfy_the_route(hs256, upstream, scope_claims, status):
    app, _ = hs256()

    response = app.test_client().get("/orders", headers=bearer(jwt.encode(claims(**scope_claims), SECRET)))

    assert response.status_code == status
    if status == 200:
        assert "orders:read" in received(upstream)["X-Consumer-Scopes"].split()
    else:
        assert 'scope="orders:read"' in response.headers["WWW-Authenticate"]


def test_tokens_are_refused_when_no_secret_or_jwks_is_configured(make_app, upstream):
    app = make_app(routes=ROUTES)
    Identity(app).consumer("acme")

    response = app.test_client().get("/private", headers=bearer(jwt.encode(claims(), SECRET)))

    assert response.status_code == 401
    assert response.json["detail"] == "The credentials are not valid"


@pytest.mark.parametrize(
    ("token_claims", "expected"),
    [
        ({"scope": "a b  c"}, {"a", "b", "c"}),
        ({"scp": ["a", "b"]}, {"a", "b"}),
        ({"scp": "a b"}, {"a", "b"}),
        ({"scp": ["a", 7, None]}, {"a"}),
        ({"scope": "a", "scp": ["b"]}, {"a"}),
        ({"scope": 7}, set()),
        ({}, set()),
    ],
)
def test_scopes_of_reads_scope_or_scp(token_claims, expected):
    assert scopes_of(token_claims) == frozenset(expected)


# --- RS256 / ES256 from a JWKS URL ---


class JWKSServer:
    """A JWKS endpoint on 127.0.0.1: set ``key_set`` (a dict, or raw bytes) to change what it serves."""

    def __init__(self):
        self.key_set: dict | bytes = {"keys": []}
        self.fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.fetches += 1
                served = server.key_set
                body = served if isinstance(served, bytes) else json.dumps(served).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()


@pytest.fixture
def jwks():
    server = JWKSServer()
    yield server
    server.stop()


class Signer:
    """A private key, its ``kid``, and the public JWK an identity provider would publish."""

    def __init__(self, kid: str, private_key, algorithm: str):
        self.kid, self.private_key, self.algorithm = kid, private_key, algorithm
        to_jwk = RSAAlgorithm.to_jwk if algorithm == "RS256" else ECAlgorithm.to_jwk
        self.jwk = {**to_jwk(private_key.public_key(), as_dict=True), "kid": kid, "use": "sig"}

    def sign(self, payload: dict, kid: str | None = None) -> str:
        return jwt.encode(payload, self.private_key, algorithm=self.algorithm, headers={"kid": kid or self.kid})


@pytest.fixture(scope="module")
def signers() -> dict[str, Signer]:
    return {
        "rsa-1": Signer("rsa-1", rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        "rsa-2": Signer("rsa-2", rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        "ec-1": Signer("ec-1", ec.generate_private_key(ec.SECP256R1()), "ES256"),
    }


@pytest.fixture
def jwks_app(make_app, jwks):
    """An app whose tokens are checked against ``jwks``, with a consumer ``acme``: (app, acme's id)."""

    def build(**config):
        app = make_app(routes=ROUTES, JWT_JWKS_URL=jwks.url, **config)
        return app, Identity(app).consumer("acme")

    return build


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1"])
def test_rs256_and_es256_tokens_from_the_jwks_are_accepted(jwks, jwks_app, signers, upstream, kid):
    jwks.key_set = {"keys": [signers["rsa-1"].jwk, signers["ec-1"].jwk]}
    app, acme = jwks_app()

    response = app.test_client().get("/private", headers=bearer(signers[kid].sign(claims())))

    assert response.status_code == 200
    assert received(upstream)["X-Consumer-ID"] == acme


def test_a_rotated_signing_key_is_fetched_when_a_token_names_it(jwks, jwks_app, signers, upstream):
    jwks.key_set = {"keys": [signers["rsa-1"].jwk]}
    app, _ = jwks_app(JWKS_REFRESH_COOLDOWN=0)
    client = app.test_client()
    assert client.get("/private", headers=bearer(signers["rsa-1"].sign(claims()))).status_code == 200

    jwks.key_set = {"keys": [signers["rsa-2"].jwk]}
    response = client.get("/private", headers=bearer(signers["rsa-2"].sign(claims())))

    assert response.status_code == 200
    assert jwks.fetches == 2


def test_a_kid_in_no_key_set_is_a_401(jwks, jwks_app, signers, upstream):
    jwks.key_set = {"keys": [signers["rsa-1"].jwk]}
    app, _ = jwks_app(JWKS_REFRESH_COOLDOWN=0)

    response = app.test_client().get("/private", headers=bearer(signers["rsa-2"].sign(claims())))

    assert response.status_code == 401
    assert response.json["detail"] == "The token is signed with an unknown key"


def test_a_token_signed_by_another_key_under_a_known_kid_is_a_401(jwks, jwks_app, signers, upstream):
    jwks.key_set = {"keys": [signers["rsa-1"].jwk]}
    app, _ = jwks_app()

    response = app.test_client().get("/private", headers=bearer(signers["rsa-2"].sign(claims(), kid="rsa-1")))

    assert response.status_code == 401
    assert challenge_error(response) == 'error="invalid_token"'


def test_an_hs256_token_is_refused_when_only_a_jwks_is_configured(jwks, jwks_app, signers, upstream):
    # Algorithm confusion (RFC 8725 section 2.1): an HMAC made with the *public* key as the secret.
    jwks.key_set = {"keys": [signers["rsa-1"].jwk]}
    app, _ = jwks_app()
    public_pem = signers["rsa-1"].private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = ".".join(
        (b64url(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode()), b64url(json.dumps(claims()).encode()))
    )
    signature = b64url(hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest())

    response = app.test_client().get("/private", headers=bearer(f"{signing_input}.{signature}"))

    assert response.status_code == 401
    assert response.json["detail"] == "The token's algorithm is not accepted"
    assert len(upstream.calls) == 0


def test_while_the_jwks_url_is_down_known_kids_still_work_and_new_ones_are_refused(jwks, jwks_app, signers, upstream):
    jwks.key_set = {"keys": [signers["rsa-1"].jwk]}
    # a lifespan of 0: every request finds the set stale and wants to fetch it again
    app, _ = jwks_app(JWKS_REFRESH_COOLDOWN=0, JWKS_CACHE_SECONDS=1e-9)
    client = app.test_client()
    assert client.get("/private", headers=bearer(signers["rsa-1"].sign(claims()))).status_code == 200

    jwks.stop()
    new_kid = client.get("/private", headers=bearer(signers["rsa-2"].sign(claims())))
    known_kid = client.get("/private", headers=bearer(signers["rsa-1"].sign(claims())))

    assert new_kid.status_code == 401
    assert new_kid.json["detail"] == "The token is signed with an unknown key"
    assert known_kid.status_code == 200  # the last good key set is kept when a fetch fails


def test_a_jwks_url_that_never_answered_is_a_503(jwks, jwks_app, signers, upstream):
    jwks.stop()
    app, _ = jwks_app()

    response = app.test_client().get("/private", headers=bearer(signers["rsa-1"].sign(claims())))

    assert response.status_code == 503
    assert response.content_type == "application/problem+json"
    assert response.json["type"] == "/_gateway/problems/identity-unavailable"
    assert response.headers["Retry-After"] == "5"
    assert len(upstream.calls) == 0


def test_a_token_whose_alg_does_not_match_its_key_is_refused_not_a_500(jwks, jwks_app, signers, upstream):
    jwks.key_set = {"keys": [signers["rsa-1"].jwk, signers["ec-1"].jwk]}
    app, _ = jwks_app()
    header = b64url(json.dumps({"alg": "RS256", "kid": signers["ec-1"].jwk["kid"], "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims()).encode())

    response = app.test_client().get("/private", headers=bearer(f"{header}.{payload}.c2ln"))

    assert response.status_code == 401
    assert response.json["detail"] == "The token's algorithm does not match its key"
    assert len(upstream.calls) == 0


@pytest.mark.parametrize("alg", [["HS256"], {"x": 1}, "HS256\u00e9"], ids=["list", "object", "not latin-1"])
def test_an_alg_that_is_not_a_known_name_is_a_401_that_does_not_echo_it(hs256, upstream, alg):
    app, _ = hs256()
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims()).encode())

    response = app.test_client().get("/private", headers=bearer(f"{header}.{payload}.c2ln"))

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].isascii()
    assert "HS256" not in response.headers["WWW-Authenticate"]


def test_error_descriptions_carry_no_quotes_or_backslashes(hs256, upstream):
    app, _ = hs256()
    token = jwt.encode({"sub": "acme"}, SECRET, algorithm="HS256")  # no exp

    response = app.test_client().get("/private", headers=bearer(token))

    assert response.status_code == 401
    description = response.headers["WWW-Authenticate"].split('error_description="', 1)[1].rsplit('"', 1)[0]
    assert '"' not in description and "\\" not in description  # RFC 6750 section 3: %x20-21 / %x23-5B / %x5D-7E


@pytest.mark.parametrize("served", [{"keys": []}, b"<html>502 Bad Gateway</html>"], ids=["no keys", "not JSON"])
def test_a_jwks_answer_without_usable_keys_is_not_a_500(jwks, jwks_app, signers, upstream, served):
    jwks.key_set = served
    app, _ = jwks_app()

    response = app.test_client().get("/private", headers=bearer(signers["rsa-1"].sign(claims())))

    assert response.status_code in {401, 503}


def test_a_short_hs256_secret_stops_the_app_at_start_up(make_app):
    with pytest.raises(ValueError, match="JWT_SECRET must be at least 32 bytes"):
        make_app(routes=ROUTES, JWT_SECRET="too-short")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request) -> dict:
    """The app config for each database the gateway runs on: SQLite (the default), PostgreSQL."""
    if request.param == "sqlite":
        return {}
    return {"SQLALCHEMY_DATABASE_URI": request.getfixturevalue("postgres_database")}


@pytest.mark.parametrize(
    ("sub", "detail"),
    [
        ("ac\x00me", "The token's subject (sub) contains a NUL character"),
        ("\x00", "The token's subject (sub) contains a NUL character"),
        ("ac\ud800me", "The token's subject (sub) is not valid Unicode text"),
    ],
    ids=["NUL inside", "only NUL", "lone surrogate"],
)
def test_a_subject_no_consumer_can_have_is_a_401_naming_the_problem(database, hs256, upstream, sub, detail):
    app, _ = hs256(**database)

    response = app.test_client().get("/private", headers=bearer(jwt.encode(claims(sub=sub), SECRET)))

    assert response.status_code == 401
    assert response.json["detail"] == detail
    assert challenge_error(response) == 'error="invalid_token"'
    assert len(upstream.calls) == 0


def test_while_the_database_is_down_a_tokens_consumer_verified_before_is_served_from_the_cache(hs256, upstream, clock):
    app, acme = hs256(AUTH_CACHE_TTL=5, AUTH_CACHE_STALE=60)
    client = app.test_client()
    token = jwt.encode(claims(lifetime=600), SECRET)
    assert client.get("/private", headers=bearer(token)).status_code == 200

    with database_down(app):
        clock.advance(30)
        within = client.get("/private", headers=bearer(token))
        clock.advance(30)
        past = client.get("/private", headers=bearer(token))

    assert within.status_code == 200
    assert received(upstream)["X-Consumer-ID"] == acme
    assert past.status_code == 503
    assert past.json["type"] == "/_gateway/problems/database-unavailable"
