"""The worker fetches an attachment with the EHR's token on the EHR's own origin only."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer

import pytest
from PIL import Image
from pydantic import SecretStr
from support import SAMPLE

from cds_service.settings import Settings
from cds_service.wire import ImageReference
from worker.images import read_image

PNG = (SAMPLE / "cxr-00000001_000.png").read_bytes()
TOKEN = "ehr-token-for-its-own-origin-only"


class Recording(BaseHTTPRequestHandler):
    """Answers every GET with the sample PNG and records the Authorization header it got."""

    seen: list[str | None]

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        self.seen.append(self.headers.get("Authorization"))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the http.server signature
        pass


@pytest.fixture
def servers() -> Iterator[tuple[str, list[str | None]]]:
    """A loopback server standing for the EHR's FHIR server and another origin, both recording."""
    seen: list[str | None] = []
    handler = type("Handler", (Recording,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def reference(fhir_server: str, url: str) -> ImageReference:
    return ImageReference(
        content_hash="h",
        resource="Media/m1",
        content_type="image/png",
        url=url,
        fhir_server=fhir_server,
        access_token=SecretStr(TOKEN),
    )


def test_the_token_goes_to_the_ehrs_origin_and_nowhere_else(
    settings: Settings, servers: tuple[str, list[str | None]]
) -> None:
    host, seen = servers
    ehr = f"http://{host}/fhir"
    read = read_image(settings, reference(ehr, f"http://{host}/fhir/Binary/1"))
    assert read.image.size == Image.open(io.BytesIO(PNG)).size
    # The same server under another name is another origin: it gets no token.
    read_image(settings, reference(ehr, f"http://localhost:{host.rsplit(':', 1)[1]}/images/1.png"))
    assert seen == [f"Bearer {TOKEN}", None]
