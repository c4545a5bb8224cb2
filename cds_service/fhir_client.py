"""Reads from the EHR's ``fhirServer``: allowlisted, with the hook's bearer token, redirects checked."""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urljoin
from urllib.parse import urlsplit
from urllib.parse import urlunsplit

import httpx

from cds_service.fhir_guard import check_fhir_server_url

MAX_REDIRECTS = 3
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
#: Pages of one search read at most: a longer list keeps its ``next`` link, and the checks say it is partial.
MAX_SEARCH_PAGES = 5


class FhirReadError(Exception):
    """A read failed; ``kind`` says how (unreachable, timeout, status, invalid); ``status`` the HTTP code."""

    def __init__(self, kind: str, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.status = status


class FhirReader:
    """One FHIR server as a hook sees it: base URL checked against the allowlist, optional bearer token."""

    def __init__(
        self,
        http: httpx.Client,
        base_url: str,
        access_token: str | None,
        *,
        allowlist: Sequence[str],
        allow_http_loopback: bool,
    ) -> None:
        check_fhir_server_url(base_url, allowlist, allow_http_loopback)
        self._http = http
        self._base = base_url.rstrip("/") + "/"
        self._token = access_token
        self._allowlist = allowlist
        self._allow_http_loopback = allow_http_loopback

    @property
    def access_token(self) -> str | None:
        """The bearer token this reader sends (a worker may need it for an image on the same server)."""
        return self._token

    def read(self, relative_url: str) -> tuple[dict[str, Any], float]:
        """GET ``relative_url`` under the base; return its JSON (the caller parses it) and the seconds."""
        url = urljoin(self._base, relative_url.lstrip("/"))
        headers = {"Accept": "application/fhir+json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        started = time.perf_counter()
        response = self._get(url, headers)
        elapsed = time.perf_counter() - started
        if response.status_code >= 400:
            raise FhirReadError(
                "status", f"FHIR server answered {response.status_code}", response.status_code
            )
        if len(response.content) > MAX_RESPONSE_BYTES:
            raise FhirReadError("invalid", "FHIR server response is too large")
        try:
            data = response.json()
        except ValueError:
            raise FhirReadError("invalid", "FHIR server sent invalid JSON") from None
        if not isinstance(data, dict):
            raise FhirReadError("invalid", "FHIR server sent JSON that is not a resource")
        return data, elapsed

    def read_search(
        self, relative_url: str, max_pages: int = MAX_SEARCH_PAGES
    ) -> tuple[dict[str, Any], float]:
        """Read a search and follow its ``next`` links under the same base, up to ``max_pages`` pages.

        The entries of every page are joined in the first page's Bundle; the last page's links stay, so a
        list longer than the bound still says it has a next page.
        """
        data, seconds = self.read(relative_url)
        return self.follow_pages(data, max_pages - 1, seconds)

    def follow_pages(
        self, data: dict[str, Any], max_pages: int = MAX_SEARCH_PAGES - 1, seconds: float = 0.0
    ) -> tuple[dict[str, Any], float]:
        """Return a search Bundle (a first page read or sent) with up to ``max_pages`` next pages joined."""
        base = self._base.rstrip("/")
        for _ in range(max_pages):
            if data.get("resourceType") != "Bundle":
                break
            links = data.get("link") if isinstance(data.get("link"), list) else []
            following = next(
                (
                    link.get("url")
                    for link in links
                    if isinstance(link, dict) and link.get("relation") == "next"
                ),
                None,
            )
            target = urljoin(self._base, following) if isinstance(following, str) else ""
            # Only the same server's pages: a link elsewhere is not followed with this token.
            if not (target.startswith(base + "/") or target.startswith(base + "?")):
                break
            page, more = self.read(target)
            seconds += more
            entries = page.get("entry") if isinstance(page.get("entry"), list) else []
            data["entry"] = (data.get("entry") if isinstance(data.get("entry"), list) else []) + entries
            data["link"] = page.get("link", [])
        return data, seconds

    def read_bytes(self, url: str, *, max_bytes: int) -> bytes:
        """GET an attachment URL (relative to the base, or absolute and allowlisted); return its bytes.

        A FHIR ``Binary`` answered as JSON is unwrapped (R4 Binary.data); anything else is taken as raw bytes.
        """
        target = urljoin(self._base, url)
        check_fhir_server_url(without_query(target), self._allowlist, self._allow_http_loopback)
        headers = {"Accept": "application/fhir+json, image/*, application/dicom;q=0.9, */*;q=0.5"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        response = self._get(target, headers)
        if response.status_code >= 400:
            raise FhirReadError(
                "status", f"FHIR server answered {response.status_code}", response.status_code
            )
        if len(response.content) > max_bytes * 2:
            raise FhirReadError("invalid", "attachment is larger than the image limit")
        if "json" in response.headers.get("content-type", ""):
            binary = response.json()
            if binary.get("resourceType") != "Binary" or not isinstance(binary.get("data"), str):
                raise FhirReadError("invalid", "attachment URL did not return a Binary with data")
            return base64.b64decode(binary["data"])
        return response.content

    def _get(self, url: str, headers: dict[str, str]) -> httpx.Response:
        # Redirects are followed by hand so that every hop is checked against the allowlist before any
        # connection (and the bearer token) goes to it.
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = self._http.get(url, headers=headers, follow_redirects=False)
            except httpx.TimeoutException:
                raise FhirReadError("timeout", "FHIR server did not answer in time") from None
            except httpx.TransportError:
                raise FhirReadError("unreachable", "FHIR server is unreachable") from None
            if not response.is_redirect:
                return response
            url = urljoin(url, response.headers.get("Location", ""))
            # The guard judges where a request goes (scheme, host, port, path), not a search's query.
            check_fhir_server_url(without_query(url), self._allowlist, self._allow_http_loopback)
            if _origin(url) != origin and "Authorization" in headers:
                # The token was issued for the fhirServer's origin; another allowlisted origin is another
                # party. RFC 9110 §15.4 asks a client following a redirect to consider dropping
                # Authorization; like httpx and browsers we drop it across origins, for this hop and the rest.
                headers = {name: value for name, value in headers.items() if name != "Authorization"}
        raise FhirReadError("status", "FHIR server redirected too many times", 310)


def _origin(url: str) -> tuple[str, str, int | None]:
    # RFC 6454 §4: scheme, host and port, the port defaulted from the scheme.
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def same_origin(first: str, second: str) -> bool:
    """Return whether two URLs share an origin (RFC 6454: scheme, host and port); False if one can't be
    read (a malformed port), so a credential never goes to a URL nobody could place."""
    try:
        return _origin(first) == _origin(second)
    except ValueError:
        return False


def without_query(url: str) -> str:
    """Return ``url`` without its query and fragment: the guard judges where a request goes (scheme, host,
    port, path), not a search's query."""
    return urlunsplit(urlsplit(url)._replace(query="", fragment=""))
