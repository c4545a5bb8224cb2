"""Outbound SSRF guard: decides whether a request's ``fhirServer`` may be called (and sent a token).

CDS Hooks 2.0 §Security: ``fhirServer`` comes from the caller, so it is untrusted input. A URL passes when it
is an http(s) base URL without user information, query or fragment, does not point at a link-local,
reserved or cloud metadata address, uses HTTPS (plain HTTP only for a loopback host with
``fhir_allow_http_loopback``), and falls under an allowlisted prefix: same scheme, host and port, and a path
that starts with the prefix's path segments. An empty allowlist refuses everything, except any loopback host
when ``fhir_allow_http_loopback`` is set (local development). No name is resolved here: a host name is
compared as written, which is why allowlist entries should name the FHIR server exactly.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import NamedTuple
from urllib.parse import unquote
from urllib.parse import urlsplit

from cds_service.errors import BadRequest

_DEFAULT_PORTS = {"http": 80, "https": 443}
_METADATA_HOSTS = frozenset({"metadata.google.internal"})
_METADATA_ADDRESSES = frozenset(ipaddress.ip_address(text) for text in ("169.254.169.254", "fd00:ec2::254"))

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class _Target(NamedTuple):
    scheme: str
    host: str
    port: int
    segments: tuple[str, ...]


def is_loopback_host(host: str) -> bool:
    """Return whether ``host`` (a name, an IP literal, or a bracketed IPv6 literal) is a loopback host.

    Loopback means ``localhost``, 127.0.0.0/8, ``::1`` and their IPv4-mapped IPv6 forms; other names ending in
    ``.localhost`` are not trusted, since only the resolver decides where they go.
    """
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost":
        return True
    address = _ip_address(name)
    return address is not None and address.is_loopback


def check_fhir_server_url(
    url: str,
    allowlist: Sequence[str],
    allow_http_loopback: bool,
    *,
    what: str = "fhirServer",
    allowlist_name: str = "FHIR server allowlist",
) -> None:
    """Return if ``url`` may be used as ``fhirServer``; raise ``BadRequest`` naming the problem otherwise.

    ``what`` and ``allowlist_name`` name the URL and the list in messages (a DICOMweb endpoint is judged by
    the same rules against its own allowlist). The message never repeats the URL, which may carry credentials.
    """
    try:
        target = _parse(url)
    except ValueError as error:
        raise BadRequest(f"{what} {error}") from None
    address = _ip_address(target.host)
    if target.host in _METADATA_HOSTS or address in _METADATA_ADDRESSES:
        raise BadRequest(f"{what} points at a cloud metadata address")
    if address is None and _is_legacy_ipv4(target.host):
        # Resolvers read "2852039166" or "0xa9.0xfe.0xa9.0xfe" as IPv4 addresses; only dotted-quad passes.
        raise BadRequest(f"{what} host is a non-canonical IPv4 address")
    loopback = is_loopback_host(target.host)
    # ::1 is inside the IPv6 reserved block ::/8, so loopback is excluded before the reserved test.
    if address is not None and not loopback and _is_unroutable(address):
        raise BadRequest(f"{what} points at a link-local, multicast, reserved or unspecified address")
    # Plain HTTP only to loopback in development, or to an origin the allowlist names with http:// itself.
    http_allowed = (loopback and allow_http_loopback) or (
        target.scheme == "http" and any(_under_prefix(target, prefix) for prefix in allowlist)
    )
    if target.scheme != "https" and not http_allowed:
        raise BadRequest(f"{what} must use https")
    if not allowlist:
        if loopback and allow_http_loopback:
            return
        raise BadRequest(f"{what} is not allowed: no {allowlist_name} is configured")
    if not any(_under_prefix(target, prefix) for prefix in allowlist):
        raise BadRequest(f"{what} is not on the {allowlist_name}")


def validate_allowlist(allowlist: Sequence[str]) -> None:
    """Return if every allowlist entry is a usable prefix; raise ``ValueError`` naming the first bad one.

    ``check_fhir_server_url`` treats an unreadable entry as matching nothing; calling this at startup turns
    such a typo into a startup error instead.
    """
    for prefix in allowlist:
        try:
            _parse(prefix)
        except ValueError as error:
            raise ValueError(f"FHIR server allowlist entry {prefix!r} {error}") from None


def _parse(url: str) -> _Target:
    """Return the normalised parts of an http(s) base URL; raise ``ValueError`` saying what is wrong."""
    # urlsplit silently drops tabs and newlines and keeps backslashes that other parsers read as "/".
    if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in url) or "\\" in url:
        raise ValueError("contains whitespace, control characters or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("must be an http or https URL")
    if "@" in parts.netloc:
        raise ValueError("must not contain user information")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ValueError("has no host")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError("must be a base URL without query or fragment")
    path = parts.path.removeprefix("/").removesuffix("/")
    segments = tuple(path.split("/")) if path else ()
    if any(unquote(segment) in ("", ".", "..") for segment in segments):
        raise ValueError("path must not contain empty, '.' or '..' segments")
    address = _ip_address(host)
    return _Target(scheme, address.compressed if address else host, port or _DEFAULT_PORTS[scheme], segments)


def _under_prefix(target: _Target, prefix: str) -> bool:
    """Return whether ``target`` has the scheme, host and port of ``prefix`` and a path under its segments."""
    try:
        allowed = _parse(prefix)
    except ValueError:
        return False
    return (target.scheme, target.host, target.port) == (
        allowed.scheme,
        allowed.host,
        allowed.port,
    ) and target.segments[: len(allowed.segments)] == allowed.segments


def _ip_address(host: str) -> IPAddress | None:
    """Return ``host`` as an IP address (IPv4-mapped IPv6 unwrapped to IPv4), or None for a name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_legacy_ipv4(host: str) -> bool:
    """Return whether ``host`` is an IPv4 address written in a form other than dotted-quad decimal."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def _is_unroutable(address: IPAddress) -> bool:
    """Return whether ``address`` is link-local, reserved, multicast or unspecified."""
    return address.is_link_local or address.is_reserved or address.is_multicast or address.is_unspecified
