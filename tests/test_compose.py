"""docker-compose.yml: valid against the compose spec; every name in it is one the project or HAPI defines."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import check_jsonschema  # noqa: F401  (its vendored compose-spec schema)
import jsonschema
import pytest
import yaml
from support import ROOT

from cds_service.cli import build_parser
from cds_service.settings import Settings
from cds_service.settings import SettingsProblem
from cds_service.settings import load_settings

COMPOSE_FILE = ROOT / "docker-compose.yml"
GPU_WORKERS = ("worker-text", "worker-image")
# The keys come from the starter's application.yaml at the tag the image is built from; a new image tag
# needs a new key list.
HAPI_IMAGE = "hapiproject/hapi:v8.10.0-3"
HAPI_KEYS_FILE = ROOT / "tests" / "data" / "hapi" / "starter-application-keys.txt"
# Spring Boot's JpaProperties.properties is a Map<String, String> handed to Hibernate as it is.
MAP_PROPERTIES = ("spring.jpa.properties",)
POSTGRES_DIALECT = "ca.uhn.fhir.jpa.model.dialect.HapiFhirPostgresDialect"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as YAML sees it (anchors and merge keys resolved)."""
    return dict(yaml.safe_load(COMPOSE_FILE.read_text()))


@pytest.fixture(scope="module")
def hapi_keys() -> frozenset[str]:
    """Property keys the pinned HAPI starter's application.yaml sets or documents."""
    lines = HAPI_KEYS_FILE.read_text().splitlines()
    return frozenset(line for line in lines if line and not line.startswith("#"))


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
    # The seed stores the sample radiograph in the stack's PACS, which the workers may fetch from.
    assert args("seed").pacs == "http://pacs:8042"
    allowlist = compose["services"]["api"]["environment"]["MEDGEMMA_CDS_DICOMWEB_ALLOWLIST"]
    assert json.loads(allowlist.split(":-", 1)[1].removesuffix("}")) == ["http://pacs:8042/dicom-web"]
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
    # The stack's own HAPI server by its http:// origin (plain HTTP to exactly that origin), others by https.
    allowlist = json.loads(env["MEDGEMMA_CDS_FHIR_SERVER_ALLOWLIST"].split(":-", 1)[1].removesuffix("}"))
    assert allowlist[0] == "http://fhir:8080/fhir"
    assert all(entry.startswith("https://") for entry in allowlist[1:])


def test_long_lived_services_have_healthchecks(compose: dict[str, Any]) -> None:
    one_shot = {name for name, svc in compose["services"].items() if svc.get("restart") == "no"}
    assert one_shot == {"init", "seed", "tiny-model"}
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
    values = env_file(ROOT / "deploy" / "cpu.env")
    assert values["COMPOSE_PROFILES"] == "cpu"
    assert values["MEDGEMMA_CDS_TEXT_MODEL"] == values["MEDGEMMA_CDS_IMAGE_MODEL"] == "/models/tiny"
    # Plain `docker compose up` reads .env: the same CPU stack.
    assert env_file(ROOT / ".env") == values
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


def dashed(element: str) -> str:
    """One name element in Spring Boot's canonical dashed form, as DataObjectPropertyName.toDashedForm has it.

    The binder looks a property up under its Java name in that form (``resthook_enabled`` and
    ``maxRetryCount`` become ``resthook-enabled`` and ``max-retry-count``); a YAML key names the same property
    when it spells the same words.
    """
    result = ""
    for char in element.replace("_", "-"):
        if char.isupper() and result and not result.endswith("-"):
            result += "-"
        result += char.lower()
    return result


def binding_names(key: str) -> set[str]:
    """Environment variable names Spring Boot 3.5's binder reads for ``key`` (list indexes left out).

    Spring Boot reference, "Binding From Environment Variables": from the canonical form, replace dots with
    underscores, remove dashes, upper-case. SystemEnvironmentPropertyMapper also tries a legacy form with each
    dash written as an underscore. Under a map property the binder takes the entry's key from the variable
    itself, lower-cased with ``_`` read as ``.`` ("Binding Maps From Environment Variables"), so an entry
    whose key holds ``_`` or ``-`` cannot be set from the environment.
    """
    for root in MAP_PROPERTIES:
        if key.startswith(root + "."):
            entry = key.removeprefix(root + ".")
            return {key.replace(".", "_").upper()} if re.fullmatch(r"[a-z0-9.]+", entry) else set()
    elements = [dashed(element) for element in key.split(".")]
    canonical = "_".join(re.sub(r"[^a-z0-9]", "", element) for element in elements)
    legacy = "_".join(element.replace("-", "_") for element in elements)
    return {canonical.upper(), legacy.upper()}


def environment_name(key: str) -> str:
    """The variable ``Environment.getProperty(key)`` finds: SystemEnvironmentPropertySource's spelling."""
    return key.replace(".", "_").replace("-", "_").upper()


def bound_keys(variable: str, keys: Iterable[str]) -> list[str]:
    """The keys among ``keys`` that Spring Boot binds ``variable`` to."""
    return sorted(key for key in keys if variable in binding_names(key))


@pytest.mark.parametrize(
    ("key", "variable", "binds"),
    [
        # The reference's own example.
        ("spring.main.log-startup-info", "SPRING_MAIN_LOGSTARTUPINFO", True),
        ("spring.datasource.driver-class-name", "SPRING_DATASOURCE_DRIVERCLASSNAME", True),
        ("spring.datasource.driver-class-name", "SPRING_DATASOURCE_DRIVER_CLASS_NAME", True),
        ("hapi.fhir.subscription.resthook_enabled", "HAPI_FHIR_SUBSCRIPTION_RESTHOOK_ENABLED", True),
        ("hapi.fhir.subscription.resthook_enabled", "HAPI_FHIR_SUBSCRIPTION_RESTHOOKENABLED", True),
        ("hapi.fhir.subscription.resthook_enabled", "HAPI_FHIR_SUBSCRIPTION_RESTHOOK", False),
        (
            "hapi.fhir.cr.terminologyServerClientSettings.maxRetryCount",
            "HAPI_FHIR_CR_TERMINOLOGYSERVERCLIENTSETTINGS_MAXRETRYCOUNT",
            True,
        ),
        (
            "hapi.fhir.cr.terminologyServerClientSettings.maxRetryCount",
            "HAPI_FHIR_CR_TERMINOLOGY_SERVER_CLIENT_SETTINGS_MAX_RETRY_COUNT",
            True,
        ),
        ("spring.jpa.properties.hibernate.dialect", "SPRING_JPA_PROPERTIES_HIBERNATE_DIALECT", True),
        # Map entries: these become the keys hibernate.format.sql and hibernate.formatsql, not format_sql.
        ("spring.jpa.properties.hibernate.format_sql", "SPRING_JPA_PROPERTIES_HIBERNATE_FORMAT_SQL", False),
        ("spring.jpa.properties.hibernate.format_sql", "SPRING_JPA_PROPERTIES_HIBERNATE_FORMATSQL", False),
    ],
)
def test_spring_binds_environment_variables_by_its_relaxed_rules(
    key: str, variable: str, binds: bool
) -> None:
    assert (variable in binding_names(key)) is binds


def test_every_hapi_variable_is_a_property_of_the_pinned_starter(
    compose: dict[str, Any], hapi_keys: frozenset[str]
) -> None:
    fhir = compose["services"]["fhir"]
    assert fhir["image"] == HAPI_IMAGE
    for variable in fhir["environment"]:
        keys = bound_keys(variable, hapi_keys)
        assert len(keys) == 1, f"{variable} binds to {keys or 'no key'} of the starter's application.yaml"
        # The starter also reads underscored keys through Environment.getProperty (OnR4Condition reads
        # hapi.fhir.fhir_version), which finds HAPI_FHIR_FHIR_VERSION but not HAPI_FHIR_FHIRVERSION.
        assert variable == environment_name(keys[0]), f"{variable}: spell it {environment_name(keys[0])}"


def test_a_bare_hibernate_dialect_variable_is_no_property(hapi_keys: frozenset[str]) -> None:
    # At this tag the YAML's dialect is ${HIBERNATE_DIALECT:<H2 dialect>}, a placeholder the file may drop;
    # the compose file sets the property itself, which outranks application.yaml.
    assert bound_keys("HIBERNATE_DIALECT", hapi_keys) == []
    assert bound_keys("SPRING_JPA_PROPERTIES_HIBERNATE_DIALECT", hapi_keys) == [
        "spring.jpa.properties.hibernate.dialect"
    ]
    # Binds, but the starter's own look-up of hapi.fhir.fhir_version would not see it.
    assert bound_keys("HAPI_FHIR_FHIRVERSION", hapi_keys) == ["hapi.fhir.fhir_version"]
    assert environment_name("hapi.fhir.fhir_version") != "HAPI_FHIR_FHIRVERSION"


def test_hapi_runs_r4_on_postgres_with_rest_hook_subscriptions(
    compose: dict[str, Any], hapi_keys: frozenset[str]
) -> None:
    services = compose["services"]
    properties = {
        bound_keys(variable, hapi_keys)[0]: value
        for variable, value in services["fhir"]["environment"].items()
    }
    database = services["fhir-db"]["environment"]
    assert properties["spring.datasource.url"] == f"jdbc:postgresql://fhir-db:5432/{database['POSTGRES_DB']}"
    assert properties["spring.datasource.username"] == database["POSTGRES_USER"]
    assert properties["spring.datasource.password"] == database["POSTGRES_PASSWORD"]
    assert properties["spring.datasource.driver-class-name"] == "org.postgresql.Driver"
    assert properties["spring.jpa.properties.hibernate.dialect"] == POSTGRES_DIALECT
    assert properties["hapi.fhir.fhir_version"] == "R4"
    assert properties["hapi.fhir.subscription.resthook_enabled"] == "true"
    assert properties["hapi.fhir.server_address"] == "http://fhir:8080/fhir"


# --- The file as `docker compose config` resolves it ----------------------------------------------------
# The Docker engine and its compose plugin are not on the test machines, so what `docker compose config` does
# for this file is done here: read the env file (.env unless --env-file names another) under the shell's
# variables, interpolate (${VAR}, ${VAR:-default}, ${VAR:?error}, $$), pick the profile's services, pass
# valueless environment entries through from the shell, then check the result against the compose spec.

COMPOSE_SCHEMA = (
    Path(sys.modules["check_jsonschema"].__file__).parent / "builtin_schemas/vendor/compose-spec.json"
)
_VARIABLE = re.compile(r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class MissingVariable(Exception):
    """A ``${VAR:?error}`` whose variable is unset: compose refuses the file with the error."""


def env_file(path: Path) -> dict[str, str]:
    """Return the ``KEY=VALUE`` lines of an env file (comments and blank lines left out)."""
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.lstrip().startswith("#"))


def interpolate(value: Any, variables: dict[str, str]) -> Any:
    """Return ``value`` with compose's variable syntax replaced, in every string at every depth."""
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if not isinstance(value, str):
        return value

    def replace(found: re.Match[str]) -> str:
        if found.group(0) == "$$":
            return "$"
        name, op, arg = found.group("braced"), found.group("op"), found.group("arg")
        present = variables.get(name)
        unset = present is None or (op is not None and op.startswith(":") and present == "")
        if op and op.endswith("?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        if op and op.endswith("-") and unset:
            return str(arg)
        return present or ""

    return _VARIABLE.sub(replace, value)


def resolved_config(shell: dict[str, str], env_path: Path = ROOT / ".env") -> dict[str, Any]:
    """Return the configuration ``docker compose [--env-file ENV] config`` prints, for a shell environment."""
    variables = env_file(env_path) | shell
    document = interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), variables)
    profiles = set(filter(None, variables.get("COMPOSE_PROFILES", "").split(",")))
    services = {}
    for name, service in document["services"].items():
        if service.get("profiles") and not profiles & set(service["profiles"]):
            continue
        environment = service.get("environment", {})
        service["environment"] = {
            key: value if value is not None else variables[key]
            for key, value in environment.items()
            if value is not None or key in variables
        }
        services[name] = service
    document["services"] = services
    return {key: value for key, value in document.items() if not key.startswith("x-")}


COMMON = {"init", "fhir-db", "fhir", "seed", "pacs", "redis", "cds-db", "api", "beat"}
PROFILES = {
    "default": (ROOT / ".env", COMMON | {"tiny-model", "worker-cpu", "worker-cpu-image"}),
    "cpu": (ROOT / "deploy" / "cpu.env", COMMON | {"tiny-model", "worker-cpu", "worker-cpu-image"}),
    "gpu": (ROOT / "deploy" / "gpu.env", COMMON | {"worker-text", "worker-image"}),
}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_compose_config_resolves_with_nothing_exported(profile: str) -> None:
    env_path, expected = PROFILES[profile]
    config = resolved_config({}, env_path)
    services = config["services"]
    assert expected <= set(services)
    other_profile = {"worker-text", "worker-image"} if profile != "gpu" else {"tiny-model", "worker-cpu"}
    assert not other_profile & set(services)
    jsonschema.validate(config, json.loads(COMPOSE_SCHEMA.read_text()))
    for name, service in services.items():
        assert "${" not in json.dumps(service), name
        for target in service.get("depends_on", {}):
            assert target in services, f"{name} depends on {target}, which {profile} doesn't run"
    # One secret for the whole stack, written by init into the volume the others read; none in the file.
    init_volume = services["init"]["volumes"][0].split(":")
    assert (
        init_volume[1] == "/run/medgemma-cds"
        and services["init"]["command"][-1] == "/run/medgemma-cds/secret_key"
    )
    readers = [name for name, svc in services.items() if "MEDGEMMA_CDS_SECRET_KEY_FILE" in svc["environment"]]
    assert set(readers) == {"api", "beat"} | {n for n in services if n.startswith("worker-")}
    for name in readers:
        service = services[name]
        assert service["environment"]["MEDGEMMA_CDS_SECRET_KEY_FILE"] == "/run/medgemma-cds/secret_key"
        assert "MEDGEMMA_CDS_SECRET_KEY" not in service["environment"]
        assert f"{init_volume[0]}:/run/medgemma-cds:ro" in service["volumes"]
        assert service["depends_on"]["init"]["condition"] == "service_completed_successfully"
        # Development mode, said in the file's comments and on by default.
        assert service["environment"]["MEDGEMMA_CDS_DEV_MODE"] == "true"
        # The API names the model in a job's id, the worker loads what the job names: the same everywhere.
        for role in ("TEXT", "IMAGE"):
            assert (
                service["environment"][f"MEDGEMMA_CDS_{role}_MODEL"]
                == services["api"]["environment"][f"MEDGEMMA_CDS_{role}_MODEL"]
            )
    models = services["api"]["environment"]["MEDGEMMA_CDS_TEXT_MODEL"]
    assert models == ("google/medgemma-27b-text-it" if profile == "gpu" else "/models/tiny")
    assert "DEVELOPMENT MODE" in COMPOSE_FILE.read_text()


def test_an_exported_value_wins_over_the_compose_defaults() -> None:
    shell = {
        "MEDGEMMA_CDS_SECRET_KEY": "an-exported-secret-of-enough-length-1234",
        "MEDGEMMA_CDS_DEV_MODE": "false",
    }
    services = resolved_config(shell)["services"]
    for name in ("api", "beat", "worker-cpu"):
        environment = services[name]["environment"]
        assert environment["MEDGEMMA_CDS_SECRET_KEY"] == shell["MEDGEMMA_CDS_SECRET_KEY"]
        assert environment["MEDGEMMA_CDS_DEV_MODE"] == "false"
    with pytest.raises(MissingVariable):
        interpolate("${NEEDED:?set NEEDED}", {})


def test_the_init_secret_is_read_by_the_settings_and_an_exported_one_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "run" / "secret_key"
    command = [str(Path(sys.executable).parent / "medgemma-cds"), "init-secret", str(secret_file)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "written" in first.stdout
    written = secret_file.read_text().strip()
    assert len(written) >= 32 and secret_file.stat().st_mode & 0o777 == 0o600
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert "kept" in again.stdout and secret_file.read_text().strip() == written  # restarts keep the key

    monkeypatch.setenv("MEDGEMMA_CDS_SECRET_KEY_FILE", str(secret_file))
    monkeypatch.delenv("MEDGEMMA_CDS_SECRET_KEY", raising=False)
    assert load_settings().secret_key.get_secret_value() == written
    monkeypatch.setenv("MEDGEMMA_CDS_SECRET_KEY", "exported-" + "x" * 32)
    assert load_settings().secret_key.get_secret_value() == "exported-" + "x" * 32
    monkeypatch.delenv("MEDGEMMA_CDS_SECRET_KEY")
    monkeypatch.setenv("MEDGEMMA_CDS_SECRET_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsProblem, match="MEDGEMMA_CDS_SECRET_KEY_FILE"):
        load_settings()
