"""What the review app's viewer shows: the draft's study as the PACS holds it, or the picture the model read.

The browser never talks to the PACS: the review app lists the study's series and instances (WADO-RS
metadata) and passes each instance's bytes through, from the same allowlisted DICOMweb root the worker read
from, with the same credential rule (the clinician's SMART token only on the EHR's own origin, else
``MEDGEMMA_CDS_DICOMWEB_AUTHORIZATION``). Nothing is decoded here: Cornerstone3D decodes in the browser.
"""

from __future__ import annotations

from typing import Any

import httpx

from cds_service.dicomweb import DicomwebClient
from cds_service.fhir_client import same_origin
from cds_service.settings import Settings
from cds_service.store import Draft
from cds_service.wire import ImageRead
from fhir_mappings.images import dicom_json_value

#: Most instances listed for the viewer (a long CT series is scrolled within this many).
MAX_INSTANCES = 2000


def read_of(draft: Draft) -> ImageRead | None:
    """Return what the worker read for a draft, if it recorded it."""
    return ImageRead.model_validate(draft.image_read) if draft.image_read else None


def pacs_client(
    read: ImageRead, settings: Settings, http: httpx.Client, ehr: str, token: str
) -> DicomwebClient:
    """Return a client of the PACS a draft was read from; DicomwebError when it is (no longer) allowed."""
    configured = settings.dicomweb_authorization
    authorization = (
        f"Bearer {token}"
        if same_origin(read.endpoint or "", ehr)
        else configured.get_secret_value()
        if configured
        else None
    )
    return DicomwebClient(
        http,
        read.endpoint or "",
        allowlist=settings.dicomweb_allowlist,
        allow_http_loopback=False,
        authorization=authorization,
        max_bytes=settings.max_image_bytes,
    )


def study_view(
    draft: Draft, client: DicomwebClient | None, instance_url: Any, image_url: str
) -> dict[str, Any]:
    """Return the viewer's description of a draft's study: its image series with their instances in order
    (``instance_url(series, instance)`` names each), and what the model read.

    Without a PACS (an image attached in FHIR) it names the picture the model read instead.
    """
    read = read_of(draft)
    if client is None or read is None or not read.study_uid:
        return {"series": [], "image": image_url, "read": None}
    metadata = client.study_metadata(read.study_uid)[:MAX_INSTANCES]
    series: dict[str, dict[str, Any]] = {}
    for attributes in metadata:
        if dicom_json_value(attributes, "00280010") is None:
            continue  # no pixels: a report, key object or presentation state
        uid, instance = dicom_json_value(attributes, "0020000E"), dicom_json_value(attributes, "00080018")
        if not uid or not instance:
            continue
        entry = series.setdefault(
            uid,
            {
                "uid": uid,
                "number": dicom_json_value(attributes, "00200011"),
                "label": " · ".join(
                    str(part)
                    for part in (
                        f"series {dicom_json_value(attributes, '00200011') or '?'}",
                        dicom_json_value(attributes, "00080060"),
                        dicom_json_value(attributes, "0008103E"),
                    )
                    if part
                ),
                "instances": [],
            },
        )
        entry["instances"].append(
            {
                "uid": instance,
                "number": dicom_json_value(attributes, "00200013"),
                "view": dicom_json_value(attributes, "00185101"),
                "url": instance_url(uid, instance),
            }
        )
    ordered = sorted(series.values(), key=lambda s: (_number(s["number"]), s["uid"]))
    for entry in ordered:
        entry["instances"].sort(key=lambda i: (_number(i["number"]), i["uid"]))
    return {
        "series": ordered,
        "image": image_url,
        "read": {
            "series": read.series_uid,
            "instance": read.instance_uid,
            "instance_url": (
                instance_url(read.series_uid, read.instance_uid)
                if read.series_uid and read.instance_uid
                else None
            ),
            "description": read.description,
        },
    }


def _number(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 1 << 30
