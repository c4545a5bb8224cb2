"""Which imaging still needs a report, and the cards for imaging drafts."""

from __future__ import annotations

import json
from typing import Any

from cds_service.wire import Action
from cds_service.wire import Card
from cds_service.wire import DraftRef
from cds_service.wire import JobRecord
from cds_service.wire import Link
from cds_service.wire import Source
from cds_service.wire import Suggestion
from fhir_mappings.ai_cards import AI_DISCLAIMER
from fhir_mappings.ai_cards import model_source
from fhir_mappings.ai_cards import truncation_note
from fhir_mappings.images import ImageSource
from fhir_mappings.images import image_sources
from fhir_mappings.images import newest_first
from fhir_mappings.images import study_sources
from fhir_mappings.markdown import md_text
from fhir_mappings.markdown import plain_text
from fhir_mappings.model_outputs import ImagingReadOutput
from fhir_mappings.record import bundle_resources
from fhir_mappings.record import reference

FINAL_STATUSES = {"final", "amended", "corrected", "appended"}
URGENCY_INDICATOR = {"routine": "info", "urgent": "warning", "critical": "critical"}


def reported_references(reports: Any) -> set[str]:
    """Return the studies and media that a final DiagnosticReport already covers."""
    covered: set[str] = set()
    for report in bundle_resources(reports, "DiagnosticReport"):
        if report.status not in FINAL_STATUSES:
            continue
        covered |= {r.reference for r in report.imagingStudy or [] if r.reference}
        covered |= {m.link.reference for m in report.media or [] if m.link and m.link.reference}
    return covered


def imaging_worklist(
    studies: Any, media: Any, documents: Any, reports: Any
) -> tuple[list[ImageSource], list[Any]]:
    """Return (images to read, newest first; studies with no retrievable image), leaving out reported ones."""
    covered = reported_references(reports)
    attachments = image_sources(
        bundle_resources(media, "Media"), bundle_resources(documents, "DocumentReference")
    )
    # A report that covers an image covers that image's study too.
    covered |= {s.study for s in attachments if s.study and s.resource in covered}
    attachments = [
        s for s in attachments if s.resource not in covered and (s.study is None or s.study not in covered)
    ]
    # A study with an image in FHIR is read from there; one without, from its PACS when DICOMweb can.
    with_attachment = {s.study for s in attachments}
    open_studies = [
        study
        for study in bundle_resources(studies, "ImagingStudy")
        if reference(study) not in covered and reference(study) not in with_attachment
    ]
    endpoints = {reference(e): e for e in bundle_resources(studies, "Endpoint")}
    on_pacs = study_sources(open_studies, endpoints)
    retrievable = {s.study for s in on_pacs}
    without_image = [study for study in open_studies if reference(study) not in retrievable]
    return newest_first(attachments + on_pacs), without_image


def study_description(study: Any) -> str:
    """Return a human description of an ImagingStudy: modality, body site, date."""
    series = (study.series or [None])[0]
    modality = series.modality.display or series.modality.code if series and series.modality else "imaging"
    site = series.bodySite.display if series and series.bodySite and series.bodySite.display else ""
    return " ".join(part for part in (modality, site, "study", str(study.started or "")[:10]) if part)


def no_image_card(study: Any) -> Card:
    """Return the info card for a study whose image can't be retrieved, so no AI draft can be made."""
    return Card(
        summary=plain_text(f"No retrievable image for {study_description(study)}", 139),
        detail=(
            f"{md_text(reference(study))} has no image this service can read (no Media or DocumentReference "
            "with an image attachment points at it, and no DICOMweb endpoint with the study's UID), so no AI "
            "draft report was made."
        ),
        indicator="info",
        source=Source(label="MedGemma CDS"),
    )


def unreadable_image_card(source: ImageSource, reason: str) -> Card:
    """Return the warning card for an image that could not be fetched, was over a limit or undecodable."""
    return Card(
        summary="An image could not be read for AI drafting",
        detail=f"{md_text(source.resource)}: {md_text(reason)}. No AI draft report was made.",
        indicator="warning",
        source=Source(label="MedGemma CDS"),
    )


def imaging_draft_card(output: ImagingReadOutput, record: JobRecord, draft: DraftRef) -> Card | None:
    """Return the card offering the AI draft report (a create suggestion and a SMART link to review it).

    None once a clinician has signed or rejected the draft: it is no longer on offer.
    """
    if draft.status != "draft":
        return None
    read = [f"**Image read:** {md_text(draft.image_read.description)}"] if draft.image_read else []
    return Card(
        summary=f"AI draft imaging report ready for review ({output.urgency})"[:139],
        detail="\n\n".join(
            [
                f"**Impression (AI draft):** {md_text(output.impression)}",
                f"**Findings (AI draft):** {md_text(output.findings)}",
                *read,
                *filter(None, [truncation_note(record)]),
                AI_DISCLAIMER,
            ]
        ),
        indicator=URGENCY_INDICATOR[output.urgency],  # type: ignore[arg-type]
        source=model_source(record),
        suggestions=[
            Suggestion(
                label="Create the preliminary report (AI draft, unsigned)",
                actions=[
                    Action(
                        type="create",
                        description="Create a preliminary DiagnosticReport from the AI draft",
                        resource=draft.report,
                    )
                ],
            )
        ],
        selection_behavior="at-most-one",
        links=[
            Link(
                label="Review and sign the draft",
                url=draft.review_url,
                type="smart",
                app_context=json.dumps({"draftId": draft.id}),
            )
        ]
        + (
            [Link(label="Review the draft (development link)", url=draft.development_url, type="absolute")]
            if draft.development_url
            else []
        ),
    )


def describe_source(source: ImageSource, studies: Any) -> str:
    """Return what the image is, from its ImagingStudy when it names one."""
    for study in bundle_resources(studies, "ImagingStudy"):
        if reference(study) == source.study:
            return study_description(study)
    return "medical image"


def source_modality(source: ImageSource, studies: Any) -> str | None:
    """Return the DICOM modality code (CR, DX, CT, ...) of the study the image belongs to, if it names one."""
    for study in bundle_resources(studies, "ImagingStudy"):
        if reference(study) == source.study:
            series = (study.series or [None])[0]
            return series.modality.code if series and series.modality else None
    return None
