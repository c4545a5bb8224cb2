"""SSRF end to end: a request's fhirServer is only ever contacted when allowlisted, and so is every redirect.

Everything listens on loopback: the allowlisted FHIR server (redirecting where its path says) and recording
listeners that note every connection made to them. Link-local and metadata addresses are only checked through
the pure guard (test_fhir_guard.py): no test here sends traffic off loopback.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from typing import Any

import pytest
from flask.testing import FlaskClient
from support import Issuer
from support import fhir_access

from cds_service.app import create_app
from cds_service.settings import Settings

PATH = "/cds-services/order-review"
TOKEN = "ssrf-secret-access-token-7c1e"
SETTLE_S = 0.2


class RecordingListener:
    """A loopback TCP port that accepts and records every connection, and answers nothing."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.05)
        self.port = int(self._socket.getsockname()[1])
        self._accepted: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, peer = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._accepted.append(peer)
            connection.close()

    def connections(self) -> list[tuple[str, int]]:
        """Return the peers that connected so far, after giving a late connection time to arrive."""
        time.sleep(SETTLE_S)
        return list(self._accepted)

    def close(self) -> None:
        """Stop accepting and release the port."""
        self._stop.set()
        self._thread.join(timeout=2)
        self._socket.close()


class RedirectingFhir(ThreadingHTTPServer):
    """The allowlisted FHIR server, at ``/fhir``: the path segment after ``/fhir/`` says where it redirects.

    ``to-b`` → the recording listener B by address, ``to-localhost`` → B by name, ``protocol-relative`` → B
    with a scheme-relative Location, ``to-outside-path`` → its own host off the allowlisted path, ``inside`` →
    ``/fhir/data`` (still allowlisted), where ``data`` answers a read with a bare resource, a search with an
    empty Bundle.
    """

    def __init__(self, redirect_port: int) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer.requests.append((self.path, self.headers.get("Authorization")))
                route, _, rest = self.path.removeprefix("/fhir/").partition("/")
                port = outer.redirect_port
                targets = {
                    "to-b": f"http://127.0.0.1:{port}/fhir/{rest}",
                    "to-localhost": f"http://localhost:{port}/fhir/{rest}",
                    "protocol-relative": f"//127.0.0.1:{port}/fhir/{rest}",
                    "to-outside-path": f"/elsewhere/{rest}",
                    "inside": f"/fhir/data/{rest}",
                }
                if route in targets:
                    self.send_response(302 if route != "to-localhost" else 307)
                    self.send_header("Location", targets[route])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                resource_type, _, resource_id = rest.partition("?")[0].partition("/")
                if resource_id:
                    body = json.dumps({"resourceType": resource_type, "id": resource_id}).encode()
                else:
                    body = b'{"resourceType": "Bundle", "type": "searchset", "total": 0}'
                self.send_response(200 if route == "data" else 404)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        self.requests: list[tuple[str, str | None]] = []
        self.port = int(self.server_address[1])
        self.redirect_port = redirect_port


@pytest.fixture
def listeners() -> Iterator[Callable[[], RecordingListener]]:
    """Start recording listeners on demand; all are closed afterwards."""
    started: list[RecordingListener] = []

    def start() -> RecordingListener:
        listener = RecordingListener()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.close()


@pytest.fixture
def redirect_target(listeners: Callable[[], RecordingListener]) -> RecordingListener:
    """B: where the allowlisted server redirects to; nothing may ever connect to it."""
    return listeners()


@pytest.fixture
def fhir(redirect_target: RecordingListener) -> Iterator[RedirectingFhir]:
    """A: the allowlisted FHIR server."""
    server = start_fhir(redirect_target.port)
    yield server
    server.shutdown()
    server.server_close()


def start_fhir(redirect_port: int) -> RedirectingFhir:
    """Start a RedirectingFhir on a free loopback port, serving from a daemon thread."""
    server = RedirectingFhir(redirect_port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def ssrf_client(settings: Settings, fhir: RedirectingFhir) -> FlaskClient:
    """The app with one allowlist entry: A's ``/fhir``."""
    allowlist = [f"http://127.0.0.1:{fhir.port}/fhir"]
    app = create_app(settings.model_copy(update={"fhir_server_allowlist": allowlist}))
    return app.test_client()


def order_review_call(hook_body: Callable[..., dict[str, Any]], fhir_server: str) -> dict[str, Any]:
    """Return an order-select call with no prefetch, so both keys are read from ``fhir_server``."""
    body = hook_body(
        "order-select",
        "p1",
        **fhir_access(fhir_server, TOKEN),
    )
    body["context"] |= {
        "selections": ["MedicationRequest/d1"],
        "draftOrders": {"resourceType": "Bundle", "type": "collection"},
    }
    return body


def assert_token_not_in(response: Any) -> None:
    """Fail if the fhirAuthorization access token appears in the answer's body or headers."""
    assert TOKEN not in response.get_data(as_text=True)
    assert TOKEN not in str(response.headers)


def test_allowlisted_server_is_read_with_the_token_and_redirects_inside_the_allowlist_are_followed(
    ssrf_client: FlaskClient,
    issuer: Issuer,
    fhir: RedirectingFhir,
    redirect_target: RecordingListener,
    hook_body: Callable[..., dict[str, Any]],
) -> None:
    # The control: without it, "no connection" below could mean the setup never worked at all.
    body = order_review_call(hook_body, f"http://127.0.0.1:{fhir.port}/fhir/inside")
    response = ssrf_client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 200, response.json
    assert_token_not_in(response)
    paths = [path.split("?")[0] for path, _ in fhir.requests]
    asked = sorted(path.removeprefix("/fhir/inside/") for path in paths if path.startswith("/fhir/inside/"))
    followed = sorted(path.removeprefix("/fhir/data/") for path in paths if path.startswith("/fhir/data/"))
    assert {"AllergyIntolerance", "MedicationRequest"} <= set(asked)
    assert followed == asked and len(paths) == 2 * len(asked)
    assert {authorization for _, authorization in fhir.requests} == {f"Bearer {TOKEN}"}
    assert redirect_target.connections() == []


def test_recording_listener_sees_a_connection(redirect_target: RecordingListener) -> None:
    with socket.create_connection(("127.0.0.1", redirect_target.port)):
        pass
    assert len(redirect_target.connections()) == 1


@pytest.mark.parametrize(
    "server",
    [
        "http://127.0.0.1:{other}/fhir",
        "http://localhost:{other}/fhir",
        "http://127.0.0.1:{other}/fhir/to-b",
        "http://localhost:{fhir}/fhir",
        "http://127.0.0.2:{fhir}/fhir",
        "http://127.0.0.1:{fhir}/other",
        "http://127.0.0.1:{fhir}/fhirx",
        "http://127.0.0.1:{fhir}/fhir/../other",
        "http://u:p@127.0.0.1:{fhir}/fhir",
        "https://127.0.0.1:{fhir}/fhir",
    ],
)
def test_fhir_server_off_the_allowlist_is_400_and_never_contacted(
    ssrf_client: FlaskClient,
    issuer: Issuer,
    fhir: RedirectingFhir,
    listeners: Callable[[], RecordingListener],
    hook_body: Callable[..., dict[str, Any]],
    server: str,
) -> None:
    other = listeners()
    body = order_review_call(hook_body, server.format(other=other.port, fhir=fhir.port))
    response = ssrf_client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 400, response.json
    assert response.json["message"].startswith("fhirServer")
    assert_token_not_in(response)
    assert other.connections() == []
    assert fhir.requests == []


@pytest.mark.parametrize("route", ["to-b", "to-localhost", "protocol-relative", "to-outside-path"])
def test_redirect_off_the_allowlist_is_400_and_the_target_never_contacted(
    ssrf_client: FlaskClient,
    issuer: Issuer,
    fhir: RedirectingFhir,
    redirect_target: RecordingListener,
    hook_body: Callable[..., dict[str, Any]],
    route: str,
) -> None:
    body = order_review_call(hook_body, f"http://127.0.0.1:{fhir.port}/fhir/{route}")
    response = ssrf_client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 400, response.json
    assert response.json["message"] == "fhirServer is not on the FHIR server allowlist"
    assert_token_not_in(response)
    assert redirect_target.connections() == []
    # A itself was asked (it is allowlisted), but never for the path it pointed outside the allowlist.
    assert fhir.requests and all(path.startswith(f"/fhir/{route}/") for path, _ in fhir.requests)


@pytest.fixture
def second_fhir(fhir: RedirectingFhir) -> Iterator[RedirectingFhir]:
    """B: another allowlisted FHIR server, on another port (another origin), redirecting back to A."""
    server = start_fhir(fhir.port)
    fhir.redirect_port = server.port
    yield server
    server.shutdown()
    server.server_close()


def test_token_never_follows_a_redirect_to_another_origin(
    settings: Settings,
    issuer: Issuer,
    fhir: RedirectingFhir,
    second_fhir: RedirectingFhir,
    hook_body: Callable[..., dict[str, Any]],
) -> None:
    allowlist = [f"http://127.0.0.1:{fhir.port}/fhir", f"http://127.0.0.1:{second_fhir.port}/fhir"]
    client = create_app(settings.model_copy(update={"fhir_server_allowlist": allowlist})).test_client()
    # A → B (allowlisted, another port) → back to A: the token goes to A's first hop only.
    body = order_review_call(hook_body, f"http://127.0.0.1:{fhir.port}/fhir/to-b/to-b/data")
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 200, response.json
    assert_token_not_in(response)
    first = [auth for path, auth in fhir.requests if path.startswith("/fhir/to-b/")]
    back = [auth for path, auth in fhir.requests if path.startswith("/fhir/data/")]
    assert {"AllergyIntolerance", "MedicationRequest"} <= {
        path.removeprefix("/fhir/to-b/data/").split("/")[0].split("?")[0] for path, _ in second_fhir.requests
    }
    assert first and set(first) == {f"Bearer {TOKEN}"}
    assert second_fhir.requests and {auth for _, auth in second_fhir.requests} == {None}
    assert back and set(back) == {None}
    assert len(first) == len(second_fhir.requests) == len(back)


def test_token_follows_a_redirect_within_the_origin(
    ssrf_client: FlaskClient,
    issuer: Issuer,
    fhir: RedirectingFhir,
    hook_body: Callable[..., dict[str, Any]],
) -> None:
    # A → A (another allowlisted path, same scheme, host and port): every hop carries the token.
    body = order_review_call(hook_body, f"http://127.0.0.1:{fhir.port}/fhir/inside")
    response = ssrf_client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 200, response.json
    followed = [auth for path, auth in fhir.requests if path.startswith("/fhir/data/")]
    assert followed and set(followed) == {f"Bearer {TOKEN}"}
    assert {auth for _, auth in fhir.requests} == {f"Bearer {TOKEN}"}
