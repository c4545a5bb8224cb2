"""A DICOMweb client for the PACS an ImagingStudy names: study metadata (WADO-RS) and one instance's bytes.

Every request goes through the SSRF guard against ``MEDGEMMA_CDS_DICOMWEB_ALLOWLIST`` (the FHIR allowlist's
rules and format), follows no redirect (a PACS has no reason to send one, and a hop could take the
credential elsewhere), and streams its body under a byte limit, so a PACS can't make a worker hold more
than the limit. Errors say what failed in words a card can show, never the URL or the credential.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from python_multipart.multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from cds_service.errors import BadRequest
from cds_service.fhir_guard import check_fhir_server_url

DICOM_JSON = "application/dicom+json"
#: A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters; nothing else goes into a path.
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: Any transfer syntax the PACS holds (PS3.18 8.7.3.5.2): the worker decodes it, or says it can't.
DICOM_MULTIPART = 'multipart/related; type="application/dicom"; transfer-syntax=*'


class DicomwebError(Exception):
    """A DICOMweb request was refused or failed; the message says why, for a card."""


def uid(value: str) -> str:
    """Return ``value`` if it is a DICOM UID; DicomwebError otherwise (it would go into a URL path)."""
    if len(value) > 64 or not UID.match(value):
        raise DicomwebError("the study names an identifier that is not a DICOM UID")
    return value


class DicomwebClient:
    """One allowlisted DICOMweb root, with the Authorization header chosen for it (or none)."""

    def __init__(
        self,
        http: httpx.Client,
        root: str,
        *,
        allowlist: list[str],
        allow_http_loopback: bool,
        authorization: str | None,
        max_bytes: int,
    ) -> None:
        try:
            check_fhir_server_url(
                root.rstrip("/"),
                allowlist,
                allow_http_loopback,
                what="the DICOMweb endpoint",
                allowlist_name="DICOMweb allowlist",
            )
        except BadRequest as refused:
            raise DicomwebError(refused.message) from None
        self._http = http
        self.root = root.rstrip("/")
        self._authorization = authorization
        self._max_bytes = max_bytes

    def study_metadata(self, study_uid: str) -> list[dict[str, Any]]:
        """Return the DICOM JSON metadata of every instance of a study (WADO-RS, PS3.18 10.4.1.1.2)."""
        body, _ = self._get(f"studies/{uid(study_uid)}/metadata", DICOM_JSON)
        try:
            metadata = json.loads(body)
        except ValueError:
            raise DicomwebError("the PACS sent metadata that is not JSON") from None
        if not isinstance(metadata, list) or not all(isinstance(item, dict) for item in metadata):
            raise DicomwebError("the PACS sent metadata that is not a list of DICOM JSON objects")
        return metadata

    def instance(self, study_uid: str, series_uid: str, instance_uid: str) -> bytes:
        """Return one instance as a DICOM Part 10 file (WADO-RS, multipart/related, first part)."""
        path = f"studies/{uid(study_uid)}/series/{uid(series_uid)}/instances/{uid(instance_uid)}"
        body, content_type = self._get(path, DICOM_MULTIPART)
        return first_part(body, content_type)

    @contextmanager
    def _stream(self, path: str, accept: str) -> Iterator[httpx.Response]:
        headers = {"Accept": accept}
        if self._authorization:
            headers["Authorization"] = self._authorization
        try:
            with self._http.stream(
                "GET", f"{self.root}/{path}", headers=headers, follow_redirects=False
            ) as response:
                yield response
        except httpx.TimeoutException:
            raise DicomwebError("the PACS did not answer in time") from None
        except httpx.TransportError:
            raise DicomwebError("the PACS is unreachable") from None

    def _get(self, path: str, accept: str) -> tuple[bytes, str]:
        with self._stream(path, accept) as response:
            if response.is_redirect:
                raise DicomwebError("the PACS answered with a redirect, which is not followed")
            if response.status_code in (401, 403):
                raise DicomwebError(f"the PACS refused the credentials ({response.status_code})")
            if response.status_code == 404:
                raise DicomwebError("the PACS does not hold the study (404)")
            if response.status_code >= 400:
                raise DicomwebError(f"the PACS answered {response.status_code}")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self._max_bytes:
                raise DicomwebError(f"the PACS answer is over the limit of {self._max_bytes} bytes")
            received = bytearray()
            for chunk in response.iter_bytes():
                received += chunk
                if len(received) > self._max_bytes:
                    raise DicomwebError(f"the PACS answer is over the limit of {self._max_bytes} bytes")
            return bytes(received), response.headers.get("content-type", "")


def first_part(body: bytes, content_type: str) -> bytes:
    """Return the body of the first part of a multipart/related answer (python-multipart parses it)."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/related" or not boundary:
        raise DicomwebError("the PACS did not answer with multipart/related DICOM")
    parts: list[bytearray] = []

    def on_part_begin() -> None:
        parts.append(bytearray())

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if len(parts) == 1:
            parts[0] += data[start:end]

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_part_data": on_part_data})
    try:
        parser.write(body)
        parser.finalize()
    except Exception:  # noqa: BLE001 - any malformed multipart body is one answer: unreadable
        raise DicomwebError("the PACS sent a malformed multipart answer") from None
    if not parts or not parts[0]:
        raise DicomwebError("the PACS answer held no DICOM instance")
    return bytes(parts[0])
