"""The DICOMweb client against a loopback server: no redirect followed, bodies bounded, paths only of UIDs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer

import httpx
import pytest

from cds_service.dicomweb import DicomwebClient
from cds_service.dicomweb import DicomwebError
from cds_service.dicomweb import first_part

BIG = 5000


class Pacs(BaseHTTPRequestHandler):
    """/dicom-web/studies/1/metadata redirects elsewhere; /dicom-web/studies/2/metadata is too big."""

    paths: list[str]

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        self.paths.append(self.path)
        if self.path.startswith("/dicom-web/studies/1/"):
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.end_headers()
        self.wfile.write(b"[" + b" " * BIG + b"]")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the http.server signature
        pass


@pytest.fixture
def root() -> Iterator[tuple[str, list[str]]]:
    paths: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (Pacs,), {"paths": paths}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", paths
    server.shutdown()
    server.server_close()


def client(root: str, max_bytes: int = 1_000_000) -> DicomwebClient:
    return DicomwebClient(
        httpx.Client(timeout=5),
        root,
        allowlist=[root],
        allow_http_loopback=False,
        authorization="Basic c2VjcmV0",
        max_bytes=max_bytes,
    )


def test_a_redirect_is_refused_not_followed(root: tuple[str, list[str]]) -> None:
    url, paths = root
    with pytest.raises(DicomwebError, match="redirect, which is not followed"):
        client(url).study_metadata("1")
    assert paths == ["/dicom-web/studies/1/metadata"]


def test_a_body_over_the_limit_stops_the_read(root: tuple[str, list[str]]) -> None:
    url, _ = root
    with pytest.raises(DicomwebError, match="over the limit of 1000 bytes"):
        client(url, max_bytes=1000).study_metadata("2")
    assert client(url).study_metadata("2") == []


def test_only_uids_go_into_a_path_and_only_allowlisted_roots_are_asked(root: tuple[str, list[str]]) -> None:
    url, paths = root
    for hostile in ("../../admin", "1.2/../../x", "1.2?x=1", "1" * 65):
        with pytest.raises(DicomwebError, match="not a DICOM UID"):
            client(url).instance("1.2", "3.4", hostile)
    with pytest.raises(DicomwebError, match="not on the DICOMweb allowlist"):
        DicomwebClient(
            httpx.Client(),
            "https://pacs.elsewhere.test/dicom-web",
            allowlist=[url],
            allow_http_loopback=False,
            authorization=None,
            max_bytes=1000,
        )
    assert paths == []


def test_first_part_refuses_what_is_not_multipart_dicom() -> None:
    with pytest.raises(DicomwebError, match="did not answer with multipart/related"):
        first_part(b"DICM", "application/dicom")
    with pytest.raises(DicomwebError, match="held no DICOM instance"):
        first_part(b"--b--\r\n", 'multipart/related; type="application/dicom"; boundary=b')
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\nDICOM-BYTES\r\n--b\r\n\r\nsecond\r\n--b--\r\n"
    assert first_part(body, 'multipart/related; type="application/dicom"; boundary=b') == b"DICOM-BYTES"
