"""The SSRF guard: which webhook URLs are refused, and which address a delivery connects to."""
from __future__ import annotations

import ipaddress

import pytest

from app.webhooks.guard import (
    MAX_URL_LENGTH,
    Guard,
    Target,
    UnsafeURL,
    parse_networks,
    system_resolver,
)


class FakeResolver:
    """A resolver whose answers the test sets per host (``answers[host]``), recording each call."""

    def __init__(self, **answers: list[str]):
        self.answers = {host.replace("_", "."): addresses for host, addresses in answers.items()}
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        return list(self.answers[host])


def public(host: str = "receiver.example") -> FakeResolver:
    return FakeResolver(**{host: ["93.184.215.14"]})


# -- addresses that are not public -------------------------------------------------------------

# Real resolution (the system resolver): numeric host forms are read by getaddrinfo the way a
# browser or curl would read them, so each of these reaches loopback or worse.
REFUSED_SYSTEM = {
    "https://127.0.0.1/": "loopback",
    "https://[::1]/": "loopback",
    "https://10.0.0.1/": "private",
    "https://172.16.5.4/": "private",
    "https://192.168.1.1/": "private",
    "https://169.254.169.254/latest/meta-data/": "link-local",
    "https://localhost/": "loopback",
    "https://localhost./": "loopback",
    "https://LOCALHOST:8443/": "loopback",
    "https://2130706433/": "loopback",  # decimal
    "https://0177.0.0.1/": "loopback",  # octal
    "https://017700000001/": "loopback",  # octal, one number
    "https://0x7f.0.0.1/": "loopback",  # hex
    "https://0x7f000001/": "loopback",  # hex, one number
    "https://127.1/": "loopback",  # short form
    "https://[::ffff:127.0.0.1]/": "loopback",  # IPv4-mapped IPv6
    "https://[::ffff:7f00:1]/": "loopback",  # the same, hex
    "https://[::ffff:10.1.2.3]/": "private",
    "https://[fd00::1]/": "unique-local",
    "https://[fd12:3456:789a::1]/": "unique-local",
    "https://[fe80::1]/": "link-local",
    "https://0.0.0.0/": "unspecified",
    "https://0/": "unspecified",
    "https://[::]/": "unspecified",
    "https://100.64.0.1/": "special-purpose",  # shared address space, RFC 6598
    "https://100.127.255.254/": "special-purpose",
    "https://[64:ff9b::10.0.0.1]/": "private",  # NAT64 (RFC 6052) of a private v4 address
    "https://[64:ff9b::127.0.0.1]/": "loopback",
    "https://[2002:a00:1::]/": "private",  # 6to4 of 10.0.0.1
    "https://224.0.0.1/": "multicast",
    "https://[ff02::1]/": "multicast",
}


@pytest.mark.parametrize(("url", "reason"), REFUSED_SYSTEM.items(), ids=list(REFUSED_SYSTEM))
def test_non_public_addresses_are_refused(url, reason):
    with pytest.raises(UnsafeURL, match=f"is {reason}") as refused:
        Guard().check(url)
    assert "public addresses only" in str(refused.value)


@pytest.mark.parametrize("url", ["https://2130706433/", "https://0177.0.0.1/", "https://0x7f000001/", "https://localhost/"])
def test_a_refusal_names_the_address_the_host_resolves_to(url):
    with pytest.raises(UnsafeURL) as refused:
        Guard().check(url)
    host = url.split("/")[2]
    assert f"{host} resolves to 127.0.0.1" in str(refused.value)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("https://8.8.8.8/hook", "8.8.8.8"),
        ("https://[2001:4860:4860::8888]/hook", "2001:4860:4860::8888"),
        ("https://[64:ff9b::8.8.8.8]/", "64:ff9b::808:808"),  # NAT64 of a public address
        ("https://[::ffff:8.8.8.8]/", "::ffff:8.8.8.8"),
    ],
)
def test_public_addresses_are_allowed(url, address):
    assert Guard().check(url).address == address


def test_site_local_ipv6_is_refused():
    with pytest.raises(UnsafeURL):
        Guard().check("https://[fec0::1]/")


def test_a_scoped_ipv6_literal_is_refused():
    with pytest.raises(UnsafeURL):
        Guard().check("https://[fe80::1%25eth0]/")


def test_the_cloud_metadata_address_is_refused_behind_a_name():
    guard = Guard(resolver=FakeResolver(metadata_example=["169.254.169.254"]))
    with pytest.raises(UnsafeURL, match=r"169\.254\.169\.254 is link-local \(metadata\.example resolves to 169\.254\.169\.254\)"):
        guard.check("https://metadata.example/")


@pytest.mark.parametrize(
    "answer",
    [
        ["93.184.215.14", "10.0.0.5"],
        ["10.0.0.5", "93.184.215.14"],
        ["2606:2800:21f:cb07:6820:80da:af6b:8b2c", "::1"],
        ["93.184.215.14", "fe80::1%eth0"],  # a scoped link-local answer
    ],
)
def test_a_host_with_any_private_address_among_public_ones_is_refused(answer):
    guard = Guard(resolver=FakeResolver(mixed_example=answer))
    with pytest.raises(UnsafeURL, match="mixed.example resolves to"):
        guard.check("https://mixed.example/hook")


def test_a_host_that_resolves_to_nothing_is_refused():
    with pytest.raises(UnsafeURL, match="resolves to no address"):
        Guard(resolver=FakeResolver(empty_example=[])).check("https://empty.example/")


def test_a_host_that_does_not_resolve_is_refused():
    with pytest.raises(UnsafeURL, match="does not resolve"):
        Guard().check("https://no-such-host.invalid/")


def test_the_system_resolver_gives_each_address_once():
    addresses = system_resolver("localhost", 443)
    assert "127.0.0.1" in addresses
    assert len(addresses) == len(set(addresses))


# -- the URL's form ----------------------------------------------------------------------------

REFUSED_FORM = {
    "http://receiver.example/": "scheme must be https, not 'http'",
    "ftp://receiver.example/": "scheme must be https, not 'ftp'",
    "receiver.example/hook": "scheme must be https, not 'none'",
    "//receiver.example/hook": "scheme must be https, not 'none'",
    "https://user@receiver.example/": "must not carry credentials",
    "https://user:pw@receiver.example/": "must not carry credentials",
    "https://:pw@receiver.example/": "must not carry credentials",
    "https://@receiver.example/": "must not carry credentials",
    "https://receiver.example\\@127.0.0.1/": "must not carry credentials",
    "https://receiver.example/hook#top": "must not have a fragment",
    "https:///hook": "has no host",
    "https://:443/hook": "has no host",
    "https://./hook": "has no host",
    "https://receiver.example:0/": "port must be 1 to 65535",
    "https://receiver.example:65536/": "not valid",
    "https://receiver.example:+443/": "not valid",
    "https://receiver.example:44x/": "not valid",
    "https://[::1/": "not valid",
    "https://receiver.example/a b": "spaces or control characters",
    "https://receiver.example/a\tb": "spaces or control characters",
    "https://receiver.example/\r\nX-Injected: 1": "spaces or control characters",
    "https://receiver.example\x00.evil/": "spaces or control characters",
    "https://receiver.example/\x7f": "spaces or control characters",
    " https://receiver.example/": "spaces or control characters",
}


@pytest.mark.parametrize(("url", "message"), REFUSED_FORM.items(), ids=[repr(url) for url in REFUSED_FORM])
def test_malformed_urls_are_refused_before_resolving(url, message):
    resolver = public()
    with pytest.raises(UnsafeURL, match=message.replace("+", r"\+")):
        Guard(resolver=resolver).check(url)
    assert resolver.calls == []


def test_an_over_long_url_is_refused():
    base = "https://receiver.example/"
    longest = base + "a" * (MAX_URL_LENGTH - len(base))
    assert Guard(resolver=public()).check(longest).url == longest
    with pytest.raises(UnsafeURL, match=f"longer than {MAX_URL_LENGTH}"):
        Guard(resolver=public()).check(longest + "a")


def test_http_is_allowed_only_when_allow_http():
    resolver = public()
    with pytest.raises(UnsafeURL, match="scheme must be https"):
        Guard(resolver=resolver).check("http://receiver.example/hook")
    target = Guard(allow_http=True, resolver=resolver).check("http://receiver.example/hook")
    assert (target.scheme, target.port) == ("http", 80)
    with pytest.raises(UnsafeURL, match="scheme must be https or http, not 'ftp'"):
        Guard(allow_http=True, resolver=resolver).check("ftp://receiver.example/")


def test_http_is_still_held_to_public_addresses():
    with pytest.raises(UnsafeURL, match="is loopback"):
        Guard(allow_http=True).check("http://127.0.0.1:8080/")


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("https://Receiver.Example/hook", "receiver.example", 443),
        ("https://receiver.example./hook", "receiver.example", 443),
        ("https://receiver.example:8443/hook?x=1", "receiver.example", 8443),
        ("HTTPS://receiver.example/", "receiver.example", 443),
    ],
)
def test_the_target_names_the_host_and_port(url, host, port):
    resolver = FakeResolver(**{host: ["93.184.215.14"]})
    target = Guard(resolver=resolver).check(url)
    assert target == Target(url=url, scheme="https", host=host, port=port, address="93.184.215.14")
    assert resolver.calls == [(host, port)]


def test_an_ipv6_target_has_no_brackets_and_no_zone():
    target = Guard(resolver=FakeResolver(v6_example=["2606:2800:21f:cb07:6820:80da:af6b:8b2c"])).check("https://v6.example/")
    assert target.address == "2606:2800:21f:cb07:6820:80da:af6b:8b2c"
    literal = Guard().check("https://[2001:4860:4860::8888]:8443/")
    assert (literal.host, literal.port, literal.address) == ("2001:4860:4860::8888", 8443, "2001:4860:4860::8888")


# -- the allow-list ------------------------------------------------------------------------------


def test_an_allow_listed_network_is_allowed():
    guard = Guard(allow_http=True, allowed=parse_networks(["127.0.0.0/8"]))
    target = guard.check("http://127.0.0.1:8080/hook")
    assert (target.address, target.port) == ("127.0.0.1", 8080)
    with pytest.raises(UnsafeURL, match="is loopback"):
        Guard(allow_http=True).check("http://127.0.0.1:8080/hook")


def test_the_allow_list_covers_only_its_networks():
    guard = Guard(allowed=parse_networks(["10.0.0.0/8", "::1/128"]))
    assert guard.check("https://10.20.30.40/").address == "10.20.30.40"
    assert guard.check("https://[::1]/").address == "::1"
    for url in ("https://127.0.0.1/", "https://192.168.1.1/", "https://[fd00::1]/"):
        with pytest.raises(UnsafeURL):
            guard.check(url)


def test_allow_listing_one_address_of_a_host_does_not_allow_the_others():
    guard = Guard(allowed=parse_networks(["10.0.0.0/8"]), resolver=FakeResolver(mixed_example=["10.0.0.5", "127.0.0.1"]))
    with pytest.raises(UnsafeURL, match="127.0.0.1 is loopback"):
        guard.check("https://mixed.example/")


def test_localhost_needs_every_loopback_network_it_resolves_to_allow_listed():
    resolver = FakeResolver(localhost=["127.0.0.1", "::1"])
    both = Guard(allow_http=True, allowed=parse_networks(["127.0.0.0/8", "::1/128"]), resolver=resolver)
    assert both.check("http://localhost:8080/").address == "127.0.0.1"
    v4_only = Guard(allow_http=True, allowed=parse_networks(["127.0.0.0/8"]), resolver=resolver)
    with pytest.raises(UnsafeURL, match="::1 is loopback"):
        v4_only.check("http://localhost:8080/")


# -- the address to connect to, and DNS rebinding ------------------------------------------------


def test_the_target_address_is_the_address_that_was_checked():
    resolver = FakeResolver(receiver_example=["93.184.215.14", "93.184.215.15"])
    target = Guard(resolver=resolver).check("https://receiver.example/hook")
    assert target.address == "93.184.215.14"
    assert resolver.calls == [("receiver.example", 443)]


def test_the_resolver_is_consulted_on_every_check_so_rebinding_is_caught():
    """A DNS answer that turns private after registration (rebinding) is refused at the next check."""
    resolver = FakeResolver(rebind_example=["93.184.215.14"])
    guard = Guard(resolver=resolver)
    first = guard.check("https://rebind.example/hook")
    assert first.address == "93.184.215.14"

    resolver.answers["rebind.example"] = ["127.0.0.1"]
    with pytest.raises(UnsafeURL, match=r"127\.0\.0\.1 is loopback \(rebind\.example resolves to 127\.0\.0\.1\)"):
        guard.check("https://rebind.example/hook")

    resolver.answers["rebind.example"] = ["93.184.215.99"]
    assert guard.check("https://rebind.example/hook").address == "93.184.215.99"
    assert resolver.calls == [("rebind.example", 443)] * 3


# -- parse_networks ------------------------------------------------------------------------------


def test_parse_networks_reads_cidr_and_single_addresses():
    assert parse_networks([" 10.0.0.0/8", "::1/128 ", "192.168.1.7", "10.1.2.3/8"]) == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("192.168.1.7/32"),
        ipaddress.ip_network("10.0.0.0/8"),  # host bits are dropped, not an error
    )
    assert parse_networks([]) == ()


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "not-a-network", "", "10.0.0.0/8/8", "fd00::/129", "localhost"])
def test_parse_networks_names_the_bad_entry(bad):
    with pytest.raises(ValueError, match=f"{bad!r} is not a network in CIDR notation"):
        parse_networks(["10.0.0.0/8", bad])


def test_a_local_use_nat64_address_is_refused_whatever_it_embeds():
    # RFC 8215 lets 64:ff9b:1::/48 carry the IPv4 address at several offsets; this one reads as
    # 8.8.8.8 in the low bits but 10.0.0.1 in the /48 layout.
    with pytest.raises(UnsafeURL, match="local-use NAT64"):
        Guard().check("https://[64:ff9b:1:a00:0:100:808:808]/")
    assert Guard().check("https://[64:ff9b::808:808]/").address == "64:ff9b::808:808"  # well-known prefix: 8.8.8.8


def test_an_ipv4_mapped_address_is_allowed_by_its_ipv4_network():
    guard = Guard(allowed=parse_networks(["127.0.0.0/8"]))
    assert guard.check("https://[::ffff:127.0.0.1]/").address == "::ffff:127.0.0.1"
    with pytest.raises(UnsafeURL, match="loopback"):
        Guard().check("https://[::ffff:127.0.0.1]/")


@pytest.mark.parametrize("char", ["\x7f", "\x85", "\x9f"])
def test_c1_control_characters_are_refused(char):
    with pytest.raises(UnsafeURL, match="control characters"):
        Guard(resolver=public()).check(f"https://receiver.example/{char}")
