"""The fhirServer SSRF guard, exercised through the pure check function only: no traffic is sent anywhere."""

from __future__ import annotations

import pytest

from cds_service.errors import BadRequest
from cds_service.fhir_guard import check_fhir_server_url
from cds_service.fhir_guard import is_loopback_host
from cds_service.fhir_guard import validate_allowlist

ALLOWLIST = [
    "https://fhir.example.org/r4",
    "https://fhir.other.org:8443/",
    "http://127.0.0.1:8080/fhir",
]


@pytest.mark.parametrize(
    "url",
    [
        "https://fhir.example.org/r4",
        "https://fhir.example.org/r4/",
        "https://fhir.example.org/r4/tenant-a",
        "https://FHIR.Example.ORG/r4",
        "HTTPS://fhir.example.org/r4",
        "https://fhir.example.org:443/r4",
        "https://fhir.example.org./r4",
        "https://fhir.other.org:8443",
        "https://fhir.other.org:8443/any/base",
    ],
)
def test_allowlisted_https_urls_pass(url: str) -> None:
    check_fhir_server_url(url, ALLOWLIST, allow_http_loopback=False)


def test_http_loopback_passes_with_the_flag_or_an_explicit_http_entry() -> None:
    check_fhir_server_url("http://127.0.0.1:8080/fhir", ALLOWLIST, allow_http_loopback=True)
    # Written with http:// on the allowlist, that origin is allowed plain HTTP without the loopback flag.
    check_fhir_server_url("http://127.0.0.1:8080/fhir", ALLOWLIST, allow_http_loopback=False)
    https_only = ["https://127.0.0.1:8080/fhir"]
    with pytest.raises(BadRequest, match="must use https"):
        check_fhir_server_url("http://127.0.0.1:8080/fhir", https_only, allow_http_loopback=False)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9090/fhir",
        "http://127.0.0.1/fhir",
        "http://127.0.0.2:8080/fhir",
        "http://localhost:8080/fhir",
        "http://[::1]:8080/fhir",
        "http://127.0.0.1:8080/other",
    ],
)
def test_loopback_not_on_a_nonempty_allowlist_is_refused(url: str) -> None:
    with pytest.raises(BadRequest, match="not on the FHIR server allowlist"):
        check_fhir_server_url(url, ALLOWLIST, allow_http_loopback=True)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("https://fhir.example.org.evil.com/r4", id="allowed-host-as-subdomain"),
        pytest.param("https://evilfhir.example.org/r4", id="host-suffix"),
        pytest.param("https://evil.com/fhir.example.org/r4", id="allowed-host-in-path"),
        pytest.param("https://fhir.example.org/r4x", id="path-not-on-segment-boundary"),
        pytest.param("https://fhir.example.org/r", id="shorter-path"),
        pytest.param("https://fhir.example.org/", id="parent-path"),
        pytest.param("https://fhir.example.org/R4", id="path-case"),
        pytest.param("https://fhir.example.org/%72%34", id="percent-encoded-path"),
        pytest.param("https://fhir.example.org:8443/r4", id="other-port"),
        pytest.param("https://fhir.other.org/", id="default-port-not-allowed-port"),
        pytest.param("https://fhir.example.org:443.evil.com/r4", id="port-confusion"),
    ],
)
def test_prefix_confusion_is_refused(url: str) -> None:
    with pytest.raises(BadRequest):
        check_fhir_server_url(url, ALLOWLIST, allow_http_loopback=True)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://fhir.example.org/r4", "must use https"),
        ("https://user:secret@fhir.example.org/r4", "user information"),
        ("https://fhir.example.org@evil.com/r4", "user information"),
        ("https://:@fhir.example.org/r4", "user information"),
        ("https://evil.com\\@fhir.example.org/r4", "backslashes"),
        ("https://fhir.example.org/r4\n", "control characters"),
        ("https://fhir.example.org/r4 ", "whitespace"),
        ("https://fhir.example.org/r4/../admin", "'..' segments"),
        ("https://fhir.example.org/r4/%2e%2e/admin", "'..' segments"),
        ("https://fhir.example.org/r4/./Patient", "'.' or '..' segments"),
        ("https://fhir.example.org/r4//Patient", "empty"),
        ("https://fhir.example.org/r4?_format=json", "query or fragment"),
        ("https://fhir.example.org/r4#x", "query or fragment"),
        ("https://fhir.example.org/r4?", "query or fragment"),
        ("ftp://fhir.example.org/r4", "http or https"),
        ("fhir.example.org/r4", "http or https"),
        ("", "http or https"),
        ("https:///r4", "no host"),
        ("https://fhir.example.org:99999/r4", "not a valid URL"),
        ("https://[::1/r4", "not a valid URL"),
    ],
)
def test_malformed_urls_are_refused_with_a_clear_message(url: str, problem: str) -> None:
    with pytest.raises(BadRequest, match="fhirServer") as raised:
        check_fhir_server_url(url, ALLOWLIST, allow_http_loopback=False)
    assert problem in raised.value.message


def test_message_never_repeats_the_url() -> None:
    with pytest.raises(BadRequest) as raised:
        check_fhir_server_url("https://user:s3cr3t@fhir.example.org/r4", ALLOWLIST, allow_http_loopback=False)
    assert "s3cr3t" not in raised.value.message
    assert "fhir.example.org" not in raised.value.message


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://169.254.169.254/latest", "metadata"),
        ("http://169.254.169.254/latest", "metadata"),
        ("https://[fd00:ec2::254]/latest", "metadata"),
        ("https://metadata.google.internal/computeMetadata", "metadata"),
        ("https://METADATA.google.internal./computeMetadata", "metadata"),
        ("https://[::ffff:169.254.169.254]/latest", "metadata"),
        ("https://169.254.10.20/fhir", "link-local"),
        ("https://[fe80::1]/fhir", "link-local"),
        ("https://[fe80::1%25eth0]/fhir", "link-local"),
        ("https://0.0.0.0/fhir", "unspecified"),
        ("https://[::]/fhir", "unspecified"),
        ("https://240.0.0.1/fhir", "reserved"),
        ("https://224.0.0.1/fhir", "multicast"),
        ("https://2852039166/latest", "non-canonical IPv4"),
        ("https://0xa9.0xfe.0xa9.0xfe/latest", "non-canonical IPv4"),
        ("https://169.254.43518/latest", "non-canonical IPv4"),
        ("https://0177.0.0.1/fhir", "non-canonical IPv4"),
    ],
)
def test_metadata_and_link_local_addresses_are_refused_even_when_allowlisted(url: str, problem: str) -> None:
    with pytest.raises(BadRequest) as raised:
        check_fhir_server_url(url, [url.rsplit("/", 1)[0] + "/"], allow_http_loopback=True)
    assert problem in raised.value.message


@pytest.mark.parametrize(
    "url",
    [
        "https://10.0.0.5/fhir",
        "https://192.168.1.10/fhir",
        "https://172.16.0.1/fhir",
        "https://[fd12::1]/fhir",
    ],
)
def test_private_addresses_are_refused_unless_allowlisted(url: str) -> None:
    with pytest.raises(BadRequest, match="not on the FHIR server allowlist"):
        check_fhir_server_url(url, ALLOWLIST, allow_http_loopback=True)
    with pytest.raises(BadRequest, match="no FHIR server allowlist"):
        check_fhir_server_url(url, [], allow_http_loopback=True)
    # An in-hospital FHIR server on a private address is a normal deployment; allowlisting it is a choice.
    check_fhir_server_url(url, [url], allow_http_loopback=False)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/fhir",
        "https://127.0.0.1/fhir",
        "http://127.9.9.9:1/",
        "http://[::1]:5000",
        "http://localhost",
    ],
)
def test_empty_allowlist_allows_only_loopback_and_only_with_the_flag(url: str) -> None:
    check_fhir_server_url(url, [], allow_http_loopback=True)
    with pytest.raises(BadRequest):
        check_fhir_server_url(url, [], allow_http_loopback=False)


def test_empty_allowlist_refuses_every_other_host() -> None:
    for allow_http_loopback in (True, False):
        with pytest.raises(BadRequest, match="no FHIR server allowlist"):
            check_fhir_server_url("https://fhir.example.org/r4", [], allow_http_loopback)


def test_unreadable_allowlist_entries_match_nothing_and_fail_validation() -> None:
    broken = ["fhir.example.org/r4", "https://user@fhir.example.org/r4", "https://fhir.example.org/r4?x=1"]
    with pytest.raises(BadRequest, match="not on the FHIR server allowlist"):
        check_fhir_server_url("https://fhir.example.org/r4", broken, allow_http_loopback=False)
    for entry in broken:
        with pytest.raises(ValueError, match="allowlist entry"):
            validate_allowlist([entry])
    validate_allowlist(ALLOWLIST)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST.", True),
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("api.localhost", False),
        ("localhost.evil.com", False),
        ("128.0.0.1", False),
        ("10.0.0.1", False),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_an_http_allowlist_entry_allows_plain_http_to_exactly_that_origin() -> None:
    # The compose API reads HAPI at http://fhir:8080/fhir inside its network.
    allowlist = ["http://fhir:8080/fhir"]
    check_fhir_server_url("http://fhir:8080/fhir", allowlist, allow_http_loopback=False)
    check_fhir_server_url("http://fhir:8080/fhir/", allowlist, allow_http_loopback=False)
    for other in ("http://fhir:8081/fhir", "http://fhir2:8080/fhir", "http://fhir:8080/other"):
        with pytest.raises(BadRequest):
            check_fhir_server_url(other, allowlist, allow_http_loopback=False)
    # An https entry never lets plain http through to the same host.
    with pytest.raises(BadRequest, match="must use https"):
        check_fhir_server_url("http://ehr.example.org/fhir", ["https://ehr.example.org/fhir"], False)
