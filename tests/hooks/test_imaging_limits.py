"""Images are never decoded in the API: it passes the attachment as received; the worker decodes under limits.

Over the Flask test client with real Redis: an inline image over the byte limit gets its card at once and no
job; a deflate bomb (64 MiB of zeros in a few kilobytes) is handed to the worker as received, and the worker
stops inflating it at the limit and fails the job with the reason, which the next chart open shows.
"""

from __future__ import annotations

import base64
import io
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import generate_uid
from support import Issuer
from support import waiting

from cds_service.app import create_app
from cds_service.jobs import JobStore
from cds_service.jobs import job_request_key
from cds_service.settings import Settings
from worker.tasks import run_model_job

PATH = "/cds-services/imaging-report-draft"
UNREADABLE = "An image could not be read for AI drafting"
MAX_BYTES, MAX_DECODED = 200_000, 10_000_000


@pytest.fixture
def tight(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_image_bytes": MAX_BYTES, "max_image_decoded_bytes": MAX_DECODED})


@pytest.fixture
def tight_client(tight: Settings) -> Iterator[FlaskClient]:
    app: Flask = create_app(tight)
    yield app.test_client()
    app.extensions["cds"].audit.flush()
    app.extensions["cds"].store.engine.dispose()


def deflate_bomb(inflated_mib: int) -> bytes:
    """Return a deflated DICOM dataset (PS3.5 A.5) that inflates to ``inflated_mib`` MiB of zeros."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    head = io.BytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = b"\0" * (1 << 20)
    return (
        head.getvalue()
        + b"".join(compressor.compress(zeros) for _ in range(inflated_mib))
        + compressor.flush()
    )


def chart(patient_id: str, data: bytes) -> dict[str, Any]:
    """A patient-view body whose prefetch holds one Media with ``data`` inline, and nothing else."""
    media = {
        "resourceType": "Media",
        "id": uuid.uuid4().hex[:16],
        "status": "completed",
        "subject": {"reference": f"Patient/{patient_id}"},
        "createdDateTime": "2024-03-01T10:00:00Z",
        "content": {"contentType": "application/dicom", "data": base64.b64encode(data).decode()},
    }

    def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}

    return {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/COREPRACTITIONER1", "patientId": patient_id},
        "prefetch": {"studies": bundle(), "media": bundle(media), "documents": bundle(), "reports": bundle()},
    }


def test_an_image_over_the_byte_limit_gets_its_card_at_once(
    tight_client: FlaskClient, issuer: Issuer
) -> None:
    oversized = b"\0" * 128 + b"DICM" + np.random.default_rng(7).bytes(MAX_BYTES + 4096)
    response = tight_client.post(PATH, json=chart("p-oversized", oversized), headers=issuer.headers(PATH))
    assert response.status_code == 200, response.json
    (card,) = response.json["cards"]
    assert card["summary"] == UNREADABLE
    assert f"over the limit of {MAX_BYTES} bytes" in card["detail"]


def test_a_deflate_bomb_goes_to_the_worker_as_received_and_stops_at_the_limit(
    tight_client: FlaskClient, tight: Settings, issuer: Issuer, redis_client: redis.Redis
) -> None:
    bomb = deflate_bomb(64)
    assert len(bomb) < MAX_BYTES  # within the byte limit: only inflating it would show what it is
    body = chart(f"p-{uuid.uuid4().hex[:8]}", bomb)

    (pending,) = tight_client.post(PATH, json=body, headers=issuer.headers(PATH)).json["cards"]
    assert pending["summary"] in waiting("Imaging report draft")
    job_id = pending["links"][0]["url"].split("/jobs/", 1)[1].split("?", 1)[0]
    store = JobStore(redis_client, tight.result_ttl_s, request_key=job_request_key(tight))
    request = store.request_of(job_id)
    assert request is not None
    # The API handed over the attachment exactly as received: nothing decoded, nothing re-encoded.
    (image,) = request.images
    assert image.data_b64 == body["prefetch"]["media"]["entry"][0]["resource"]["content"]["data"]

    run_model_job(tight, store, job_id)  # what the image worker runs for this job

    record = store.get(job_id)
    assert record is not None and record.state == "failed"
    (card,) = tight_client.post(PATH, json=body, headers=issuer.headers(PATH)).json["cards"]
    assert card["summary"] == UNREADABLE and card["indicator"] == "warning"
    assert f"inflates past the limit of {MAX_DECODED} bytes" in card["detail"]
