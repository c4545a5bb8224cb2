"""The Flask application factory."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from typing import Any

import httpx
import orjson
import redis
from flask import Flask
from flask.json.provider import JSONProvider
from flask_cors import CORS

from cds_service.auth import JwtVerifier
from cds_service.auth import TrustConfig
from cds_service.auth import load_trust_config
from cds_service.dev_issuer import DEV_ISSUER
from cds_service.dev_issuer import development_trust
from cds_service.drafts import DraftService
from cds_service.drafts import OutboxSweeper
from cds_service.errors import Unauthorized
from cds_service.fhir_guard import validate_allowlist
from cds_service.image_reads import ImageReads
from cds_service.jobs import Capacity
from cds_service.jobs import JobStore
from cds_service.jobs import TaskMessages
from cds_service.jobs import job_request_key
from cds_service.logging import configure_logging
from cds_service.metrics import init_metrics
from cds_service.prefetch import ParsedPrefetchCache
from cds_service.registry import Registry
from cds_service.registry import load_registry
from cds_service.review import init_review
from cds_service.settings import Settings
from cds_service.settings import check_production_safety
from cds_service.settings import purpose_key
from cds_service.store import AuditWriter
from cds_service.store import Store
from fhir_mappings.drugs import preload as preload_drug_vocabulary
from fhir_mappings.patient_rules import preload as preload_medication_rules
from worker.celery_app import make_celery

log = logging.getLogger(__name__)


class AuthDisabled:
    """Stands in for the verifier when ``AUTH_DISABLED`` is set: accepts every call (local dev only)."""

    def verify(self, authorization_header: str | None, audience: str) -> dict[str, object]:
        """Return empty claims without checking anything."""
        return {}


class NoTrustedIssuers:
    """The verifier when authentication is on but no issuer is trusted: refuses every call."""

    def verify(self, authorization_header: str | None, audience: str) -> dict[str, object]:
        """Refuse: with no trusted issuer no token can be valid."""
        log.warning("refused a call: no trusted issuers are configured (MEDGEMMA_CDS_TRUSTED_ISSUERS)")
        raise Unauthorized("Unauthorized")


class OrjsonProvider(JSONProvider):
    """Flask's JSON (``jsonify``, ``request.get_json``) through orjson: keys as given, a tenth of the CPU."""

    def dumps(self, obj: object, **kwargs: object) -> str:
        """Return ``obj`` as compact JSON text."""
        return orjson.dumps(obj, default=str, option=orjson.OPT_NON_STR_KEYS).decode()

    def loads(self, s: str | bytes, **kwargs: object) -> object:
        """Return the value the JSON text holds."""
        return orjson.loads(s)


@dataclass(frozen=True)
class Services:
    """Everything a request handler needs besides the request; one per app, kept in ``app.extensions``."""

    settings: Settings
    registry: Registry
    store: Store
    redis: redis.Redis
    http: httpx.Client
    executor: ThreadPoolExecutor
    prefetch_cache: ParsedPrefetchCache
    verifier: JwtVerifier | AuthDisabled | NoTrustedIssuers
    jobs: JobStore
    capacity: Capacity
    audit: AuditWriter
    drafts: DraftService
    outbox: OutboxSweeper
    task_messages: TaskMessages
    image_reads: ImageReads
    today: Callable[[], date] = date.today


def off_the_loop() -> Callable[[Callable[[Any], None], Any], None] | None:
    """Under gevent's monkey-patching, return what runs a blocking call on gevent's pool of real threads
    (the greenlet waits, the loop serves other requests meanwhile); None where threads are real already."""
    from gevent import monkey

    if not monkey.is_module_patched("threading"):
        return None
    import gevent

    return lambda call, argument: gevent.get_hub().threadpool.apply(call, (argument,))


def build_verifier(
    settings: Settings, redis_client: redis.Redis
) -> JwtVerifier | AuthDisabled | NoTrustedIssuers:
    """Return the inbound-JWT verifier the settings ask for."""
    if settings.auth_disabled:
        log.warning(
            "AUTHENTICATION IS DISABLED (MEDGEMMA_CDS_AUTH_DISABLED=true): for local development only"
        )
        return AuthDisabled()
    issuers = (
        {} if settings.trusted_issuers is None else dict(load_trust_config(settings.trusted_issuers).issuers)
    )
    if settings.development and (development := development_trust()) is not None:
        log.warning(
            "development mode: trusting the local development issuer (%s, `medgemma-cds token`)", DEV_ISSUER
        )
        issuers[DEV_ISSUER] = development
    if not issuers:
        log.warning("no trusted issuers configured: every hook and feedback call will be refused with 401")
        return NoTrustedIssuers()
    return JwtVerifier(TrustConfig(issuers=issuers), redis_client)


def create_app(settings: Settings | None = None, *, today: Callable[[], date] | None = None) -> Flask:
    """Build the CDS service: load and check the services in ``hooks/``, wire the store, Redis and routes.

    ``today`` is the app's clock for the day a hook is called on (default: the local date); tests of a
    simulated clinic day inject theirs.
    """
    settings = settings or Settings()
    check_production_safety(settings)
    configure_logging()
    if settings.development:
        log.warning(
            "DEVELOPMENT MODE (MEDGEMMA_CDS_DEV_MODE=true): development keys and links are trusted; "
            "never in production"
        )
    validate_allowlist(settings.fhir_server_allowlist)
    validate_allowlist(settings.review_iss_allowlist)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json = OrjsonProvider(app)

    redis_client = redis.Redis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    store = Store(settings.database_url)
    http = httpx.Client(
        timeout=httpx.Timeout(settings.fhir_timeout_s, connect=settings.fhir_connect_timeout_s),
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
    )

    # The drug vocabulary loads once per process here, not on the first clinician's order.
    preload_drug_vocabulary()
    preload_medication_rules()
    drafts = DraftService(store, settings, http)
    app.extensions["cds"] = Services(
        settings=settings,
        registry=load_registry(),
        store=store,
        redis=redis_client,
        http=http,
        executor=ThreadPoolExecutor(max_workers=16, thread_name_prefix="prefetch"),
        prefetch_cache=ParsedPrefetchCache(settings.prefetch_cache_entries),
        verifier=build_verifier(settings, redis_client),
        jobs=JobStore(redis_client, settings.result_ttl_s, request_key=job_request_key(settings)),
        capacity=Capacity(redis_client),
        audit=AuditWriter(store, purpose_key(settings, "audit-patient-hash"), run_blocking=off_the_loop()),
        drafts=drafts,
        outbox=OutboxSweeper(drafts),
        task_messages=TaskMessages(make_celery(settings)),
        image_reads=ImageReads(redis_client, settings),
        today=today or date.today,
    )

    # §Security / CORS: any origin, the three methods, and the two headers EHRs send (the sandbox sends
    # Authorization even with its discovery GET).
    CORS(
        app,
        origins="*",
        methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Content-Type", "Authorization"],
        expose_headers=["X-Request-Id"],
        max_age=600,
    )

    from cds_service import api
    from cds_service import drafts_api
    from cds_service import errors_http
    from cds_service import notifications_api
    from cds_service import openapi

    errors_http.register(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(drafts_api.bp)
    app.register_blueprint(notifications_api.bp)
    app.register_blueprint(openapi.bp)
    init_review(app)
    init_metrics(app)
    return app
