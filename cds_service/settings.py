"""Settings of the service and its workers, read once from ``MEDGEMMA_CDS_*`` environment variables."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from pathlib import Path
from typing import Any
from typing import get_origin
from urllib.parse import urlsplit

from pydantic import Field
from pydantic import SecretStr
from pydantic import ValidationError
from pydantic import field_validator
from pydantic import model_validator
from pydantic_settings import BaseSettings
from pydantic_settings import SettingsConfigDict
from pydantic_settings import SettingsError

ENV_PREFIX = "MEDGEMMA_CDS_"


class Settings(BaseSettings):
    """Every knob of the service; the API and the Celery workers are built from the same object.

    Defaults are the embedded ones: Redis on localhost, a SQLite file, no model downloaded
    until a worker needs one.
    """

    # Each field's docstring is its description: docs/configuration.md is generated from them.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="ignore", use_attribute_docstrings=True
    )

    # Where things run
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis for the job queue, job records, replay keys and review sessions (nothing durable)."""
    database_url: str = "sqlite:///medgemma-cds.db"
    """SQLAlchemy URL of the durable store (feedback, audit, drafts): SQLite, or postgresql+psycopg://…"""
    public_url: str = Field(
        default="http://127.0.0.1:8080",
        description="Base URL EHRs call; JWT `aud` is checked against {public_url}/cds-services/{id}.",
    )

    # Models (Hugging Face id or a local folder)
    text_model: str = "google/medgemma-27b-text-it"
    """Text model the text workers load: a Hugging Face id or a local folder."""
    text_model_revision: str | None = None
    """Hub revision (commit or tag) of the text model; unset: the default branch."""
    image_model: str = "google/medgemma-4b-it"
    """Image-text model the image workers load: a Hugging Face id or a local folder."""
    image_model_revision: str | None = None
    """Hub revision (commit or tag) of the image model; unset: the default branch."""
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    text_device: str | None = None
    """Device of the text model (auto, cpu, cuda, cuda:N); unset: DEVICE. Checked for free memory at start"""
    image_device: str | None = None
    """Device of the image model (auto, cpu, cuda, cuda:N); unset: DEVICE. Checked for free memory at start"""
    # Covers the worst case of every output schema (order review: ~1,300 tokens; see model_outputs.py).
    max_new_tokens: int = Field(default=1536, ge=16, le=8192)
    """Most tokens a model job may generate."""
    max_batch_size: int = Field(default=8, ge=1, le=64)
    """Most concurrent requests a worker process batches into one generate call."""
    batch_wait_ms: int = Field(default=10, ge=0, le=1000)
    """How long a worker waits for more requests to join a batch."""
    hf_token: SecretStr | None = None
    """Hugging Face token for the gated MedGemma weights (workers only)."""

    # Hook behaviour
    hook_budget_ms: int = Field(default=1500, ge=0, le=60_000)
    """Longest a hook waits for its model job before answering what is ready."""
    result_ttl_s: int = Field(default=24 * 3600, ge=60)
    """How long a finished model result stays in Redis for later hooks."""
    fhir_timeout_s: float = Field(default=5.0, gt=0, le=120)
    """Timeout of one read from a request's fhirServer (504 past it)."""
    fhir_connect_timeout_s: float = Field(default=2.0, gt=0, le=60)
    """Timeout of connecting to a request's fhirServer."""
    prefetch_cache_entries: int = Field(
        default=128, ge=0, description="Parsed prefetch values kept per process (0: parse every call)."
    )

    # Security
    dev_mode: bool = Field(
        default=False,
        description=(
            "Development mode (AUTH_DISABLED implies it): signed review links may sign, and the public CDS "
            "Hooks sandbox issuer and short secrets are allowed. Never in production."
        ),
    )
    auth_disabled: bool = False
    """Accept hooks without a JWT (implies development mode; warned at every start). Never in production."""
    trusted_issuers: Path | None = Field(
        default=None, description="JSON or YAML file: {'issuers': {iss: {jwks_file | jwks_uri, ...}}}"
    )
    fhir_server_allowlist: list[str] = Field(
        default_factory=list,
        description=(
            "URL prefixes (scheme://host[:port]/path) a request's fhirServer must start with; an http:// "
            "entry allows plain HTTP to exactly that origin (e.g. a FHIR server inside the compose network)."
        ),
    )
    review_iss_allowlist: list[str] = Field(default_factory=list)
    """FHIR servers (SMART ``iss``, in FHIR_SERVER_ALLOWLIST's format) the review app may be launched from;
    a list of its own, so a server allowed for hooks (an open test launcher) signs no one in. Empty: none
    (loopback too with FHIR_ALLOW_HTTP_LOOPBACK)."""
    fhir_allow_http_loopback: bool = False
    """Allow plain-HTTP fhirServer URLs on loopback addresses (local development)."""
    dicomweb_allowlist: list[str] = Field(default_factory=list)
    """DICOMweb roots (scheme://host[:port]/path prefixes, in FHIR_SERVER_ALLOWLIST's format) workers may
    fetch an ImagingStudy's images from; an Endpoint elsewhere gets a card instead. Empty: none. Plain HTTP
    only to an origin an http:// entry names."""
    dicomweb_authorization: SecretStr | None = None
    """Authorization header value ('Basic ...' or 'Bearer ...') sent to allowlisted DICOMweb endpoints off the
    EHR's own origin; on the EHR's origin, the hook's fhirAuthorization token is sent instead."""
    fhir_writeback_url: str | None = Field(
        default=None,
        description="FHIR base that signed reports are written to; unset: kept in the store only.",
    )
    fhir_writeback_token: SecretStr | None = None
    """Bearer token for FHIR_WRITEBACK_URL, if it needs one."""
    writeback_retry_s: int = Field(default=30, ge=1, le=3600)
    """Seconds before a signed report the EHR did not take is tried again (doubling per attempt, up to 10
    minutes; given up after 10 attempts or a refusal, shown as failed); also how often each API process
    looks for reports due."""
    secret_key: SecretStr = Field(
        default_factory=lambda: SecretStr(secrets.token_urlsafe(32)),
        description="Signs review-page links; set it in production (a random default dies with the process).",
    )
    secret_key_file: Path | None = None
    """File holding SECRET_KEY, read when MEDGEMMA_CDS_SECRET_KEY is unset (docker compose's init service
    writes one into a volume the API and the workers share); an exported SECRET_KEY wins."""
    review_link_ttl_s: int = Field(default=12 * 3600, ge=60)
    """Lifetime of the signed links on cards (job status, development review link)."""

    # The review app as a SMART on FHIR app (SMART App Launch 2.0)
    smart_client_id: str = Field(
        default="medgemma-cds-review", description="client_id the EHR registered the review app under"
    )
    smart_client_secret: SecretStr | None = Field(
        default=None, description="Confidential client secret (client_secret_basic); unset: a public client"
    )
    smart_session_ttl_s: int = Field(default=8 * 3600, ge=60, description="Lifetime of a review-app session")

    # Precompute: FHIR R4 Subscriptions (rest-hook) that notify new imaging, read back from their server
    fhir_subscription_server: str | None = Field(
        default=None,
        description=(
            "FHIR base whose Subscriptions notify us (/fhir-notifications); the notified patient's "
            "imaging is read from it. Unset: notifications are refused."
        ),
    )
    fhir_subscription_token: SecretStr | None = Field(
        default=None, description="Bearer token for reading fhir_subscription_server, if it needs one"
    )
    fhir_subscription_secret: SecretStr | None = Field(
        default=None,
        description=(
            "Shared secret the FHIR server sends as 'Authorization: Bearer <secret>' "
            "(Subscription.channel.header); unset: notifications are refused"
        ),
    )

    # Limits
    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    """Largest request body accepted (413 past it)."""
    max_json_depth: int = Field(default=64, ge=8)
    """Deepest JSON nesting accepted in a request body."""
    max_prefetch_keys: int = Field(default=32, ge=1)
    """Most prefetch keys accepted in one hook call."""
    max_draft_orders: int = Field(default=100, ge=1)
    """Most draft orders read from one order-select or order-sign call."""
    max_prefetch_entries: int = Field(default=100, ge=1)
    """Most entries read from each prefetch Bundle (each order is checked against at most these); a card names
    what was not read."""
    max_cards: int = Field(default=20, ge=2)
    """Most cards one service answers per call; further findings are rolled into one card that counts them."""
    max_image_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    """Largest image (PNG, JPEG, DICOM) a worker fetches for a model job, in bytes as received."""
    max_image_pixels: int = Field(default=40_000_000, ge=1024)
    """Most pixels one image frame may have (checked from its header, before decoding)."""
    max_image_decoded_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    """Most bytes an image may decode to, all frames (a deflated DICOM dataset stops inflating there)."""
    max_image_frames: int = Field(default=1000, ge=1)
    """Most frames of a multi-frame image (one frame, the middle one, is decoded)."""

    # Worker
    task_soft_time_limit_s: int = Field(default=300, ge=5)
    """Seconds after which a model job is asked to stop and marked failed."""
    task_time_limit_s: int = Field(default=360, ge=10)
    """Seconds after which a model job's worker process is killed."""

    @model_validator(mode="before")
    @classmethod
    def _secret_key_from_file(cls, data: Any) -> Any:
        """Read SECRET_KEY from SECRET_KEY_FILE when it isn't given itself (an unreadable file is reported by
        the field's own check)."""
        if isinstance(data, dict) and not data.get("secret_key") and data.get("secret_key_file"):
            try:
                secret = Path(data["secret_key_file"]).read_text(encoding="utf-8").strip()
            except OSError:
                return data
            if secret:
                return {**data, "secret_key": secret}
        return data

    @field_validator("secret_key_file")
    @classmethod
    def _secret_key_file_is_readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError("no such file")
        return value

    def model_of(self, role: str) -> tuple[str, str | None, str]:
        """Return the model, revision and device setting of a worker role (``text`` or ``image``)."""
        if role == "text":
            return self.text_model, self.text_model_revision, self.text_device or self.device
        return self.image_model, self.image_model_revision, self.image_device or self.device

    @property
    def development(self) -> bool:
        """Return whether development mode is on (``DEV_MODE``, or ``AUTH_DISABLED`` which implies it)."""
        return self.dev_mode or self.auth_disabled


class SettingsProblem(ValueError):
    """A setting in the environment is malformed; the message is one line naming the variable and format."""


def _expected(name: str) -> str:
    field = Settings.model_fields[name]
    annotation = field.annotation
    if get_origin(annotation) is list:
        return 'a JSON list of strings, e.g. ["https://ehr.example.org/fhir"]'
    text = str(annotation)
    for kind, words in (("bool", "true or false"), ("int", "a whole number"), ("float", "a number")):
        if re.search(rf"\b{kind}\b", text):
            return words + (f" ({field.description})" if field.description else "")
    if "Path" in text:
        return "a path to a readable file"
    return field.description or "a string"


def load_settings() -> Settings:
    """Return the settings from the environment; SettingsProblem saying which variable is malformed and
    the format it expects (one line, no stack trace, never the value: it may be a secret)."""
    try:
        settings = Settings()
    except SettingsError as error:
        found = re.search(r'field "(\w+)"', str(error))
        name = found.group(1) if found else ""
    except ValidationError as error:
        first = error.errors(include_input=False)[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        if name in Settings.model_fields:
            raise SettingsProblem(
                f"{ENV_PREFIX}{name.upper()}: {first['msg']}; expected {_expected(name)}"
            ) from None
    else:
        from cds_service.fhir_guard import validate_allowlist

        for listed in ("fhir_server_allowlist", "review_iss_allowlist", "dicomweb_allowlist"):
            try:
                validate_allowlist(getattr(settings, listed))
            except ValueError as error:
                raise SettingsProblem(f"{ENV_PREFIX}{listed.upper()}: {error}") from None
        return settings
    if name not in Settings.model_fields:
        raise SettingsProblem("the MEDGEMMA_CDS_* settings could not be read")
    raise SettingsProblem(f"{ENV_PREFIX}{name.upper()} is malformed; expected {_expected(name)}")


def purpose_key(settings: Settings, purpose: str) -> bytes:
    """Return a 32-byte key for one purpose, derived from ``MEDGEMMA_CDS_SECRET_KEY`` by HMAC-SHA256.

    Each use of the secret (audit hashes, job encryption, ...) gets its own key, so no two share one.
    """
    secret = settings.secret_key.get_secret_value().encode()
    return hmac.new(secret, f"medgemma-cds {purpose}".encode(), hashlib.sha256).digest()


#: The public CDS Hooks sandbox: its private signing key is published with it, so anyone can mint its JWTs.
SANDBOX_HOST = "sandbox.cds-hooks.org"
SANDBOX_JWKS = Path(__file__).parent / "data" / "jwks" / "cds-hooks-sandbox.jwks.json"
MIN_SECRET_CHARS = 32
#: Secrets shipped as examples (docker-compose.yml's old default among them); compared case-insensitively.
PLACEHOLDER_SECRETS = frozenset(
    {
        "change-me-to-a-long-random-value",
        "changeme",
        "change-me",
        "change_me",
        "secret",
        "dev",
        "development",
        "test",
    }
)
_OPT_IN = f"or set {ENV_PREFIX}DEV_MODE=true for local development"


def key_fingerprint(settings: Settings) -> str:
    """Return a short public fingerprint of ``MEDGEMMA_CDS_SECRET_KEY`` (an HMAC-derived key, not the secret):
    the workers' heartbeats carry it, so the API can tell when a worker has another secret."""
    return purpose_key(settings, "key-fingerprint").hex()[:16]


def check_production_safety(settings: Settings) -> None:
    """Raise SettingsProblem (one line: why, and how to opt in) when settings are unsafe outside development.

    Unsafe: trusting the public CDS Hooks sandbox (its issuer, key URLs or bundled key set), or a secret key
    that is unset (a random one per process: no worker could read the API's jobs), a known placeholder or
    shorter than MIN_SECRET_CHARS. Development mode allows all of it.
    """
    if settings.development:
        return
    if settings.trusted_issuers is not None and _trusts_sandbox(settings.trusted_issuers):
        raise SettingsProblem(
            f"{ENV_PREFIX}TRUSTED_ISSUERS trusts the public CDS Hooks sandbox (https://{SANDBOX_HOST}), "
            "whose signing key is public, so anyone could mint its JWTs; trust your EHR's issuer instead, "
            + _OPT_IN
        )
    if "secret_key" not in settings.model_fields_set:
        raise SettingsProblem(
            f"{ENV_PREFIX}SECRET_KEY is not set: the API and every worker must share one long random value "
            f"(python3 -c 'import secrets; print(secrets.token_urlsafe(32))'), {_OPT_IN}"
        )
    secret = settings.secret_key.get_secret_value()
    if secret.strip().lower() in PLACEHOLDER_SECRETS:
        raise SettingsProblem(
            f"{ENV_PREFIX}SECRET_KEY is a published placeholder; set a long random value "
            f"(python3 -c 'import secrets; print(secrets.token_urlsafe(32))'), {_OPT_IN}"
        )
    if len(secret) < MIN_SECRET_CHARS:
        raise SettingsProblem(
            f"{ENV_PREFIX}SECRET_KEY is shorter than {MIN_SECRET_CHARS} characters; set a long random value "
            f"(python3 -c 'import secrets; print(secrets.token_urlsafe(32))'), {_OPT_IN}"
        )


def _trusts_sandbox(trust_file: Path) -> bool:
    from cds_service.auth import load_trust_config

    try:
        trust = load_trust_config(trust_file)
    except (OSError, ValueError):
        # An unreadable trust file stops startup where the verifier loads it, with its own message.
        return False
    sandbox_keys = _public_keys(SANDBOX_JWKS)
    for issuer, config in trust.issuers.items():
        urls = (issuer, config.jwks_uri, *config.jku_allowed)
        if any(url and (urlsplit(url).hostname or "").lower() == SANDBOX_HOST for url in urls):
            return True
        # The sandbox's key set under another issuer name is the same public key.
        if config.jwks_file is not None and _public_keys(config.jwks_file) & sandbox_keys:
            return True
    return False


def _public_keys(jwks_file: Path) -> set[tuple[str, ...]]:
    try:
        keys = json.loads(jwks_file.read_text(encoding="utf-8")).get("keys", [])
    except (OSError, ValueError, AttributeError):
        return set()
    fields = ("kty", "crv", "x", "y", "n", "e")
    return {tuple(str(key.get(name, "")) for name in fields) for key in keys if isinstance(key, dict)}
