"""docker-compose.yml: valid against the compose spec, and every name in it is one the project defines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import ROOT

from cds_service.cli import build_parser
from cds_service.settings import Settings

COMPOSE_FILE = ROOT / "docker-compose.yml"
GPU_WORKERS = ("worker-text", "worker-image")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as YAML sees it (anchors and merge keys resolved)."""
    return dict(yaml.safe_load(COMPOSE_FILE.read_text()))


def our_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run the project's image."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def test_compose_file_matches_the_compose_spec() -> None:
    # check-jsonschema vendors the compose-spec schema: no network is needed.
    checker = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_command_is_a_medgemma_cds_subcommand(compose: dict[str, Any]) -> None:
    parser = build_parser()
    services = our_services(compose)
    assert {"api", "seed", "worker-text", "worker-image", "worker-cpu"} <= services.keys()
    for name, service in services.items():
        command = service["command"]
        assert command[0] == "medgemma-cds", name
        # parse_args exits on an unknown subcommand or option.
        parser.parse_args(command[1:])
        healthcheck = service.get("healthcheck", {}).get("test", [])
        if healthcheck[1:2] == ["medgemma-cds"]:
            parser.parse_args(healthcheck[2:])


def test_commands_run_what_each_service_is_for(compose: dict[str, Any]) -> None:
    parser = build_parser()
    services = compose["services"]

    def args(name: str) -> Any:
        return parser.parse_args(services[name]["command"][1:])

    assert args("api").command == "serve" and args("api").host == "0.0.0.0" and args("api").port == 8080
    assert (args("worker-text").queue, args("worker-image").queue) == ("text", "image")
    assert args("seed").command == "load-sample-data" and args("seed").fhir_base == "http://fhir:8080/fhir"
    assert args("tiny-model").directory == "/models/tiny"


def test_every_medgemma_cds_variable_is_a_setting(compose: dict[str, Any]) -> None:
    settings = set(Settings.model_fields)
    seen = set()
    for name, service in compose["services"].items():
        for variable in service.get("environment", {}):
            if variable.startswith("MEDGEMMA_CDS_"):
                field = variable.removeprefix("MEDGEMMA_CDS_").lower()
                assert field in settings, f"{name}: {variable} is not a Settings field"
                seen.add(field)
    assert {"redis_url", "database_url", "public_url", "fhir_server_allowlist", "trusted_issuers"} <= seen
    assert "hf_token" in seen


def test_the_api_reaches_postgres_and_redis_in_the_stack(compose: dict[str, Any]) -> None:
    env = compose["services"]["api"]["environment"]
    assert env["MEDGEMMA_CDS_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@cds-db:5432/" in env["MEDGEMMA_CDS_DATABASE_URL"]
    assert env["MEDGEMMA_CDS_REDIS_URL"] == "redis://redis:6379/0"
    assert env["MEDGEMMA_CDS_FHIR_SERVER_ALLOWLIST"].split(":-", 1)[1].startswith('["https://')


def test_long_lived_services_have_healthchecks(compose: dict[str, Any]) -> None:
    one_shot = {name for name, svc in compose["services"].items() if svc.get("restart") == "no"}
    assert one_shot == {"seed", "tiny-model"}
    for name, service in compose["services"].items():
        if name not in one_shot:
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    # The HAPI image is distroless: its check must be an exec form that needs no shell.
    assert compose["services"]["fhir"]["healthcheck"]["test"][0] == "CMD"
    assert compose["services"]["fhir"]["image"].startswith("hapiproject/hapi:v8.")


def test_start_order_follows_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["fhir"]["depends_on"]["fhir-db"]["condition"] == "service_healthy"
    assert services["seed"]["depends_on"]["fhir"]["condition"] == "service_healthy"
    assert services["worker-cpu"]["depends_on"]["tiny-model"]["condition"] == "service_completed_successfully"
    for name in ("api", *GPU_WORKERS, "worker-cpu"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_gpu_workers_reserve_a_gpu_and_cache_weights(compose: dict[str, Any]) -> None:
    for name in GPU_WORKERS:
        service = compose["services"][name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        assert any(volume.startswith("hf-cache:") for volume in service["volumes"])
        assert service["environment"]["MEDGEMMA_CDS_HF_TOKEN"] == "${HF_TOKEN:-}"
        assert service["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}"
        assert service["profiles"] == ["gpu"]
    for name in ("worker-cpu", "worker-cpu-image"):
        assert "deploy" not in compose["services"][name]
        assert compose["services"][name]["profiles"] == ["cpu"]


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source in declared, f"{name} mounts undeclared volume {source}"
    for name in ("fhir-db", "cds-db", "redis"):
        assert compose["services"][name]["volumes"], f"{name} keeps its data in a volume"


def test_cpu_env_file_points_every_model_at_the_tiny_checkpoint() -> None:
    values = dict(
        line.split("=", 1)
        for line in (ROOT / "deploy" / "cpu.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert values["COMPOSE_PROFILES"] == "cpu"
    assert values["MEDGEMMA_CDS_TEXT_MODEL"] == values["MEDGEMMA_CDS_IMAGE_MODEL"] == "/models/tiny"
    for variable in values:
        if variable.startswith("MEDGEMMA_CDS_"):
            assert variable.removeprefix("MEDGEMMA_CDS_").lower() in Settings.model_fields


def test_dockerfile_final_stage_is_slim_and_unprivileged() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    final = dockerfile.rsplit("\nFROM ", 1)[1]
    assert final.startswith("${PYTHON_IMAGE}") and "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile
    assert "USER medgemma" in final
    assert "build-essential" not in final and "apt-get" not in final
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    assert '".${EXTRAS:+[${EXTRAS}]}"' in dockerfile and "ARG EXTRAS=worker" in dockerfile
