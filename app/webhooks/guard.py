"""The SSRF guard: which webhook URLs may be registered, and which address a delivery connects to.

A URL is checked twice: when it is registered and again before every attempt. The host is
resolved and every address it resolves to must be public (or inside an allow-listed network);
the sender then connects to the address that was checked, never resolving the name again, so a
DNS answer that changes between check and connect (rebinding) cannot reach an internal host.
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

MAX_URL_LENGTH = 2048

# Ranges no webhook may reach unless allow-listed, beyond what ``ipaddress`` calls private,
# loopback, link-local (169.254.169.254, the cloud metadata address, among them), multicast,
# reserved and unspecified: shared address space (RFC 6598), and the IPv6 prefixes that embed
# an IPv4 address (NAT64, RFC 6052 and 8215), whose embedded address is checked instead.
_SPECIAL_V4 = tuple(ipaddress.ip_network(net) for net in ("100.64.0.0/10", "192.0.0.0/24", "198.18.0.0/15"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Local-use NAT64 prefixes may embed the IPv4 address anywhere (RFC 8215), so which address
# one reaches cannot be told from the address alone: refused unless allow-listed.
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


class UnsafeURL(ValueError):
    """The URL may not be used: its scheme, its form, or an address its host resolves to."""


@dataclass(frozen=True)
class Target:
    """A checked URL: its parts and the one address (checked) to connect to."""

    url: str
    scheme: str
    host: str  # as in the URL, lower case, without brackets
    port: int
    address: str  # an IP address, IPv6 without brackets


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (IPv4 and IPv6), in the system's order.

    Raises UnsafeURL when the name does not resolve.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeURL(f"the host {host!r} does not resolve: {exc}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def blocked_reason(address: Address) -> str | None:
    """Why ``address`` is not a public unicast address, or None when it is.

    An IPv6 address that carries an IPv4 one (IPv4-mapped, 6to4, Teredo, NAT64) is judged by
    the IPv4 address it reaches.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is None and address in _NAT64_LOCAL:
            return "a local-use NAT64 address"
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return blocked_reason(embedded)
    for test, reason in (
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (isinstance(address, ipaddress.IPv6Address) and address in ipaddress.IPv6Network("fc00::/7"), "unique-local"),
        (isinstance(address, ipaddress.IPv6Address) and address.is_site_local, "site-local"),
        (address.is_private, "private"),
        (address.is_reserved, "reserved"),
        (isinstance(address, ipaddress.IPv4Address) and any(address in net for net in _SPECIAL_V4), "special-purpose"),
        (not address.is_global, "not globally routable"),
    ):
        if test:
            return reason
    return None


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """``["10.0.0.0/8", "::1/128"]`` as networks; raises ValueError naming a bad entry."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a network in CIDR notation: {exc}") from None
    return tuple(networks)


class Guard:
    """Checks webhook URLs: scheme ``https`` (and ``http`` when ``allow_http``), no user
    information, a host whose every address is public or inside ``allowed`` networks.

    ``resolver(host, port) -> [address, ...]`` is ``system_resolver`` unless a test gives
    another one.
    """

    def __init__(self, allow_http: bool = False, allowed: tuple[Network, ...] = (), resolver: Resolver = system_resolver):
        self.allow_http = allow_http
        self.allowed = allowed
        self.resolver = resolver

    def check(self, url: str) -> Target:
        """Parse, resolve and check ``url``; return the Target to connect to.

        Raises UnsafeURL naming the reason: a scheme other than https (or http when allowed),
        credentials in the URL, no host, a bad port, a host that does not resolve, or any
        resolved address that is loopback, private, link-local, unique-local, unspecified or
        otherwise not public, and not inside an allowed network.
        """
        scheme, host, port = self.parse(url)
        addresses = self.resolver(host, port)
        if not addresses:
            raise UnsafeURL(f"the host {host!r} resolves to no address")
        for text in addresses:
            address = ipaddress.ip_address(text.split("%", 1)[0])
            if self._allowed(address):
                continue
            reason = blocked_reason(address)
            if reason is not None:
                named = "" if text == host else f" ({host} resolves to {text})"
                raise UnsafeURL(f"the address {text} is {reason}{named}; webhooks go to public addresses only")
        return Target(url=url, scheme=scheme, host=host, port=port, address=addresses[0].split("%", 1)[0])

    def _allowed(self, address: Address) -> bool:
        """Inside an allowed network, an IPv4-mapped IPv6 address judged by its IPv4 address."""
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        candidates = (address, mapped) if mapped is not None else (address,)
        return any(each in net for each in candidates for net in self.allowed if net.version == each.version)

    def parse(self, url: str) -> tuple[str, str, int]:
        """``(scheme, host, port)`` of ``url`` without resolving it; raises UnsafeURL."""
        if len(url) > MAX_URL_LENGTH:
            raise UnsafeURL(f"the URL is longer than {MAX_URL_LENGTH} characters")
        if any(ord(char) <= 0x20 or 0x7F <= ord(char) <= 0x9F for char in url):
            raise UnsafeURL("the URL contains spaces or control characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise UnsafeURL(f"the URL is not valid: {exc}") from None
        schemes = ("https", "http") if self.allow_http else ("https",)
        if parts.scheme not in schemes:
            allowed = " or ".join(schemes)
            raise UnsafeURL(f"the URL's scheme must be {allowed}, not {parts.scheme or 'none'!r}")
        if parts.username is not None or parts.password is not None:
            raise UnsafeURL("the URL must not carry credentials (user:password@)")
        if parts.fragment:
            raise UnsafeURL("the URL must not have a fragment")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise UnsafeURL("the URL has no host")
        if not host.isascii():
            # An internationalised name travels as its ASCII form (IDNA), in DNS, SNI and Host.
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError as exc:
                raise UnsafeURL(f"the host {host!r} is not a valid internationalised name: {exc}") from None
        if port == 0:
            raise UnsafeURL("the URL's port must be 1 to 65535")
        return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)
