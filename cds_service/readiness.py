"""What ``medgemma-cds check`` reports: the configuration (secrets hidden) and whether each dependency is up.

The API's ``/readyz`` answers for one process; this looks at the whole deployment from outside it: Redis, the
database, an optional FHIR server and the Celery workers on each model queue.
"""

from __future__ import annotations

import socket
import time
from typing import Any
from urllib.parse import urlsplit
from urllib.parse import urlunsplit

import httpx
import redis
from pydantic import SecretStr

from cds_service.jobs import QUEUES
from cds_service.jobs import workers_with_another_secret
from cds_service.settings import Settings

MASK = "**********"


def mask_url(url: str) -> str:
    """Return ``url`` with the password of its user information replaced by asterisks."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}{port}"))


def masked_config(settings: Settings) -> dict[str, Any]:
    """Return every setting as JSON-ready values: secrets as asterisks, passwords in URLs hidden."""
    config: dict[str, Any] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            config[name] = MASK
        elif isinstance(value, str) and "://" in value:
            config[name] = mask_url(value)
        elif isinstance(value, list):
            config[name] = [mask_url(v) if isinstance(v, str) else v for v in value]
        elif value is None or isinstance(value, bool | int | float | str):
            config[name] = value
        else:
            config[name] = str(value)
    return config


def _timed(check: Any) -> dict[str, Any]:
    """Run ``check()`` and return ``{"ok", "ms", ...}``; an exception is "not ok" with its class name."""
    started = time.perf_counter()
    try:
        result = dict(check())
    except Exception as exc:  # noqa: BLE001 - readiness reports any failure, it never raises
        result = {"ok": False, "error": type(exc).__name__}
    result["ms"] = round((time.perf_counter() - started) * 1000, 1)
    return result


def check_redis(settings: Settings) -> dict[str, Any]:
    """Return whether Redis answers PING."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=1, socket_connect_timeout=1)
    try:
        return {"ok": bool(client.ping())}
    finally:
        client.close()


def check_database(settings: Settings) -> dict[str, Any]:
    """Return whether the database answers and its schema is at the newest migration."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine

    from cds_service.store import MIGRATIONS

    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    engine = create_engine(settings.database_url, pool_pre_ping=True)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
    result: dict[str, Any] = {"ok": current == head, "schema": current, "head": head}
    if current != head:
        result["error"] = "schema is not at the newest migration: run `medgemma-cds db-upgrade`"
    return result


def check_fhir(settings: Settings, fhir_base: str) -> dict[str, Any]:
    """Return whether ``{fhir_base}/metadata`` answers with an R4 CapabilityStatement."""
    response = httpx.get(
        f"{fhir_base.rstrip('/')}/metadata",
        headers={"Accept": "application/fhir+json"},
        timeout=httpx.Timeout(settings.fhir_timeout_s, connect=settings.fhir_connect_timeout_s),
    )
    if response.status_code != 200:
        return {"ok": False, "error": f"HTTP {response.status_code}"}
    statement = response.json()
    version = statement.get("fhirVersion")
    result = {
        "ok": statement.get("resourceType") == "CapabilityStatement" and str(version).startswith("4.0"),
        "fhir_version": version,
        "software": (statement.get("software") or {}).get("name"),
    }
    if not result["ok"]:
        result["error"] = "not a FHIR R4 (4.0.x) CapabilityStatement"
    return result


def check_workers(settings: Settings) -> dict[str, Any]:
    """Return the Celery workers consuming each model queue; ok when every queue has one."""
    from worker.celery_app import make_celery

    celery = make_celery(settings)
    try:
        active = celery.control.inspect(timeout=1).active_queues() or {}
    finally:
        celery.close()
    queues: dict[str, list[str]] = {
        role: sorted(
            worker for worker, consumed in active.items() if any(q["name"] == name for q in consumed)
        )
        for role, name in QUEUES.items()
    }
    result: dict[str, Any] = {"ok": all(queues.values()), "queues": queues}
    missing = [QUEUES[role] for role, workers in queues.items() if not workers]
    if missing:
        result["error"] = f"no worker consumes {', '.join(missing)}: start `medgemma-cds worker --queue ...`"
    return result


def check_secret_key(settings: Settings) -> dict[str, Any]:
    """Return whether every live worker shares this process's ``MEDGEMMA_CDS_SECRET_KEY`` (by fingerprint)."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        other = workers_with_another_secret(client, settings)
    finally:
        client.close()
    if not other:
        return {"ok": True}
    return {
        "ok": False,
        "workers": other,
        "error": f"{other} worker process(es) have another MEDGEMMA_CDS_SECRET_KEY: they can read no job; "
        "give the API and every worker the same value",
    }


def readiness_report(settings: Settings, fhir_base: str | None = None) -> dict[str, Any]:
    """Return the configuration (secrets masked), a check per dependency and ``ready``: every check passed.

    Checks: Redis ping, database ping and schema, the FHIR server's ``/metadata`` when ``fhir_base`` is
    given, at least one Celery worker on each model queue (``control.inspect().active_queues()``), and that
    every worker shares the secret key (``check_secret_key``).
    ``precompute`` reports the precompute triggers' progress (see ``precompute_report``).
    """
    checks = {
        "redis": _timed(lambda: check_redis(settings)),
        "database": _timed(lambda: check_database(settings)),
    }
    if fhir_base:
        checks["fhir_server"] = _timed(lambda: check_fhir(settings, fhir_base))
    # Without Redis no worker can be asked; say so instead of waiting on a dead broker.
    if checks["redis"]["ok"]:
        checks["workers"] = _timed(lambda: check_workers(settings))
        checks["secret_key"] = check_secret_key(settings)
    else:
        checks["workers"] = {"ok": False, "error": "Redis is down, so workers can't be asked"}
    return {
        "ready": all(check["ok"] for check in checks.values()),
        "checks": checks,
        "precompute": precompute_report(settings) if checks["redis"]["ok"] else None,
        "config": masked_config(settings),
    }


def precompute_report(settings: Settings) -> dict[str, Any]:
    """Return precompute progress (informational, never a failed check): the newest sweep, the scheduler's
    next run, precompute queue depths, precomputed jobs by state and what each trigger asked for."""
    from cds_service.precompute import precompute_status

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=1)
    try:
        return precompute_status(client)
    except redis.RedisError as error:
        return {"error": type(error).__name__}
    finally:
        client.close()


def scheduler_alive(settings: Settings) -> bool:
    """Return whether a ``precompute --daily-at`` scheduler beat in Redis lately (its healthcheck)."""
    from cds_service.precompute import SCHEDULER_KEY

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=1)
    try:
        return bool(client.exists(SCHEDULER_KEY))
    except redis.RedisError:
        return False
    finally:
        client.close()


def local_worker_alive(settings: Settings) -> bool:
    """Return whether a Celery worker started on this host (container) answers a ping within two seconds.

    Worker names are ``{queue}@{hostname}-{pid}`` (``run_worker``); this is the model workers' container
    healthcheck, where the hostname is the container's.
    """
    from worker.celery_app import make_celery

    host = socket.gethostname()
    celery = make_celery(settings)
    try:
        replies = celery.control.ping(timeout=2) or []
    except Exception:  # noqa: BLE001 - no broker, no live worker
        return False
    finally:
        celery.close()
    names = [name for reply in replies for name in reply]
    return any(name.partition("@")[2].rpartition("-")[0] == host for name in names)
