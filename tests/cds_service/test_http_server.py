"""The service over real HTTP, served by gunicorn through ``medgemma-cds serve``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
from support import FhirServer
from support import Issuer
from support import LiveServer
from support import fhir_access
from support import free_port
from support import service_env
from support import wait_for_http


def test_discovery_over_http_with_cors(live_server: LiveServer) -> None:
    response = httpx.get(
        f"{live_server.url}/cds-services", headers={"Origin": "https://sandbox.cds-hooks.org"}
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("*", "https://sandbox.cds-hooks.org")
    assert "gunicorn" in response.headers.get("server", "").lower()
    assert {s["id"] for s in response.json()["services"]} >= {"patient-summary", "order-review"}


def test_patient_view_over_http_reads_fhir_server(
    live_server: LiveServer, issuer: Issuer, fhir_server: FhirServer, hook_body
) -> None:
    path = "/cds-services/patient-summary"
    body = hook_body(
        "patient-view",
        fhir_server.patients["Trantow"],
        **fhir_access(fhir_server.base_url, fhir_server.token),
    )
    token = issuer.token(live_server.url + path)
    response = httpx.post(live_server.url + path, json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert response.json()["cards"][0]["summary"] == "1 active problem, 3 active medications, 3 allergies"
    replay = httpx.post(live_server.url + path, json=body, headers={"Authorization": f"Bearer {token}"})
    assert replay.status_code == 401


def test_two_instances_on_one_machine_share_no_control_socket(
    database_url: str, redis_url: str, issuer: Issuer, tmp_path: Path
) -> None:
    # gunicorn's default control socket is one path per user: a second instance would take it over.
    port = free_port()
    env = service_env(database_url, redis_url, issuer, f"http://127.0.0.1:{port}", HOME=str(tmp_path))
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "medgemma-cds"), "serve", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz")
        assert not (tmp_path / ".gunicorn").exists()
    finally:
        process.terminate()
        process.wait(timeout=15)
