"""Job records in Redis: the request (clinical text, images) is encrypted, and gone once the job finishes."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import redis
from pydantic import SecretStr

from cds_service.jobs import TASK_NAME
from cds_service.jobs import JobRequestUnreadable
from cds_service.jobs import JobStore
from cds_service.jobs import TaskMessages
from cds_service.jobs import job_request_key
from cds_service.settings import Settings
from cds_service.wire import ImageReference
from cds_service.wire import ModelJobRequest
from worker.celery_app import make_celery
from worker.tasks import run_model_job

PROMPT = "Patient reports chest pain radiating to the left arm; history of myocardial infarction"
IMAGE_BYTES = b"\x89PNG fake pixels of a chest radiograph"
EHR_TOKEN = "ehr-token-for-the-same-origin-pacs"


def job_request(note: str) -> ModelJobRequest:
    """Return a request holding clinical text and an image, unique to ``note``."""
    return ModelJobRequest(
        service_id="imaging-report-draft",
        task="imaging-read",
        role="image",
        model="google/medgemma-4b-it",
        system_prompt="You are a radiologist.",
        user_prompt=f"{PROMPT} ({note})",
        images=[
            ImageReference(
                content_hash=note,
                resource="Media/m1",
                content_type="image/png",
                data_b64=base64.b64encode(IMAGE_BYTES).decode(),
                fhir_server="https://ehr.test/fhir",
                access_token=SecretStr(EHR_TOKEN),
            )
        ],
        evidence=["Patient/p1"],
        input_hashes=[note],
        max_new_tokens=64,
    )


@pytest.fixture
def store(redis_client: redis.Redis, settings: Settings) -> JobStore:
    """The job store as the app builds it: keyed from the settings' secret."""
    return JobStore(redis_client, 600, request_key=job_request_key(settings))


def test_the_stored_request_holds_no_clinical_text_or_image_in_clear(
    store: JobStore, redis_client: redis.Redis
) -> None:
    request = job_request(str(uuid.uuid4()))
    job_id, created = store.create(request)
    assert created is not None
    raw = redis_client.hgetall(JobStore.key(job_id))
    dump = b"".join(key + value for key, value in raw.items())
    image = request.images[0].data_b64 or ""
    clear_texts = (
        b"chest pain",
        b"myocardial",
        b"radiologist",
        image.encode(),
        IMAGE_BYTES,
        EHR_TOKEN.encode(),
    )
    for clear in clear_texts:
        assert clear not in dump
    assert raw[b"state"] == b"queued" and raw[b"service_id"] == b"imaging-report-draft"
    assert 0 < redis_client.ttl(JobStore.key(job_id)) <= 600


def test_request_of_returns_the_request_as_created(store: JobStore, settings: Settings) -> None:
    request = job_request(str(uuid.uuid4()))
    job_id, _ = store.create(request)
    assert store.request_of(job_id) == request
    # The EHR's token survives the trip (encrypted), for the worker to fetch with on the EHR's origin.
    stored = store.request_of(job_id)
    assert stored is not None and stored.images[0].access_token == SecretStr(EHR_TOKEN)
    assert EHR_TOKEN not in repr(stored) and EHR_TOKEN not in str(stored.model_dump())
    # A worker builds its own store from the same settings: it derives the same key and reads it too.
    worker_store = JobStore(
        redis.Redis.from_url(settings.redis_url), 600, request_key=job_request_key(settings)
    )
    assert worker_store.request_of(job_id) == request
    assert store.request_of("0" * 40) is None


def test_the_request_is_deleted_when_the_job_finishes_and_the_result_stays(
    store: JobStore, redis_client: redis.Redis
) -> None:
    job_id, _ = store.create(job_request(str(uuid.uuid4())))
    store.start(job_id, "w")
    assert store.finish(job_id, {"state": "done", "result": '{"findings": "clear lungs"}', "model": "m"})
    fields = redis_client.hgetall(JobStore.key(job_id))
    assert b"request" not in fields
    assert store.request_of(job_id) is None
    record = store.get(job_id)
    assert record is not None and record.state == "done" and record.result == {"findings": "clear lungs"}
    assert 0 < redis_client.ttl(JobStore.key(job_id)) <= 600


def test_a_failed_job_loses_its_request_too(store: JobStore, redis_client: redis.Redis) -> None:
    job_id, _ = store.create(job_request(str(uuid.uuid4())))
    assert store.finish(job_id, {"state": "failed", "error": "model task failed (RuntimeError)"})
    assert b"request" not in redis_client.hgetall(JobStore.key(job_id))
    assert redis_client.ttl(JobStore.key(job_id)) > 0


def test_another_secret_cannot_read_the_request(
    store: JobStore, redis_client: redis.Redis, settings: Settings
) -> None:
    job_id, _ = store.create(job_request(str(uuid.uuid4())))
    other = settings.model_copy(update={"secret_key": SecretStr("another-secret-of-another-deployment-9c")})
    stranger = JobStore(redis_client, 600, request_key=job_request_key(other))
    with pytest.raises(JobRequestUnreadable, match="MEDGEMMA_CDS_SECRET_KEY"):
        stranger.request_of(job_id)


def test_a_worker_with_another_secret_fails_the_job_saying_why(
    store: JobStore, redis_client: redis.Redis, settings: Settings
) -> None:
    job_id, _ = store.create(job_request(str(uuid.uuid4())))
    other = settings.model_copy(update={"secret_key": SecretStr("another-secret-of-another-deployment-9c")})
    run_model_job(other, JobStore(redis_client, 600, request_key=job_request_key(other)), job_id)
    record = store.get(job_id)
    assert record is not None and record.state == "failed"
    assert record.error is not None and "MEDGEMMA_CDS_SECRET_KEY" in record.error
    assert b"request" not in redis_client.hgetall(JobStore.key(job_id))


def test_the_key_is_derived_per_secret_and_is_not_the_secret(settings: Settings) -> None:
    same = Settings(secret_key=settings.secret_key)
    other = settings.model_copy(update={"secret_key": SecretStr("another-secret-of-another-deployment-9c")})
    assert job_request_key(settings) == job_request_key(same)
    assert job_request_key(settings) != job_request_key(other)
    assert len(job_request_key(settings)) == 32
    assert settings.secret_key.get_secret_value().encode() not in job_request_key(settings)


def test_a_prepared_task_message_is_the_one_celery_send_task_writes(
    redis_client: redis.Redis, settings: Settings
) -> None:
    celery = make_celery(settings)
    job_id, queue = uuid.uuid4().hex, f"test-queue-{uuid.uuid4().hex[:8]}"
    try:
        celery.send_task(TASK_NAME, args=[job_id], task_id=job_id, queue=queue, ignore_result=False)
        sent = json.loads(redis_client.rpop(queue))
        prepared = json.loads(TaskMessages(celery).message(job_id, queue))
    finally:
        redis_client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
        celery.close()
    # Every field the same but the delivery tag (unique per message); the body decodes to the same task call.
    assert prepared["properties"].pop("delivery_tag") != sent["properties"].pop("delivery_tag")
    body = json.loads(base64.b64decode(sent.pop("body")))
    assert json.loads(base64.b64decode(prepared.pop("body"))) == body == [[job_id], {}, body[2]]
    assert prepared == sent


def test_a_job_is_created_and_queued_in_one_call_and_queued_once(
    store: JobStore, redis_client: redis.Redis, settings: Settings
) -> None:
    request = job_request(str(uuid.uuid4()))
    job_id, queue = request.job_id(), f"test-queue-{uuid.uuid4().hex[:8]}"
    message = TaskMessages(make_celery(settings)).message(job_id, queue)
    try:
        first = store.submit(request, job_id, message, queue, mode="interactive")
        again = store.submit(request, job_id, message, queue, mode="interactive")
        assert first.created and first.record is not None and first.record.state == "queued"
        assert not again.created and again.record == first.record
        assert redis_client.lrange(queue, 0, -1) == [message]
    finally:
        redis_client.delete(queue, JobStore.key(job_id))
