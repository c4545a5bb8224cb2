"""imaging-report-draft: at chart open, is there recent imaging without a final report? Offer an AI draft."""

from __future__ import annotations

from cds_service.registry import Prefetch
from cds_service.registry import service
from cds_service.wire import Card
from cds_service.wire import HookCall
from cds_service.wire import HookResponse
from cds_service.wire import ImageReference
from cds_service.wire import JobRecord
from fhir_mappings.ai_cards import guarded_ai_cards
from fhir_mappings.ai_cards import job_cards
from fhir_mappings.images import IMAGE_NOT_READ
from fhir_mappings.images import ImageRejected
from fhir_mappings.images import ImageSource
from fhir_mappings.imaging import describe_source
from fhir_mappings.imaging import imaging_draft_card
from fhir_mappings.imaging import imaging_worklist
from fhir_mappings.imaging import no_image_card
from fhir_mappings.imaging import source_modality
from fhir_mappings.imaging import unreadable_image_card
from fhir_mappings.model_outputs import ImagingReadOutput
from fhir_mappings.prompts import imaging_prompt
from fhir_mappings.prompts import imaging_system_prompt


def request_imaging_job(
    call: HookCall, source: ImageSource
) -> tuple[ImageReference, list[str], JobRecord | None]:
    """Ask for the imaging-read job of ``source`` (the newest unreported image), the one this service's chart
    open asks for; return the image's reference, the evidence and the job. ImageRejected when the record
    already shows the image can't be used (over the byte limit, a URL off the allowlist)."""
    if call.images is None or call.jobs is None:
        raise ImageRejected("this call can read no images")
    image = call.images.reference(source)
    evidence = [ref for ref in (source.resource, source.study) if ref]
    modality = source_modality(source, call.prefetch["studies"])
    prompt = imaging_prompt(describe_source(source, call.prefetch["studies"]), modality)
    job = call.jobs.for_service("imaging-report-draft").request(
        "imaging-read", "image", imaging_system_prompt(modality), prompt,
        evidence=evidence, input_hashes=[image.content_hash], images=[image],
    )  # fmt: skip
    return image, evidence, job


@service(
    id="imaging-report-draft",
    hook="patient-view",
    title="Imaging report draft",
    description="Drafts a report (MedGemma) for recent imaging with no final report; a clinician signs it.",
    prefetch={
        "studies": "ImagingStudy?patient={{context.patientId}}",
        "media": Prefetch("Media?patient={{context.patientId}}", "omit"),
        "documents": Prefetch("DocumentReference?patient={{context.patientId}}", "omit"),
        "reports": "DiagnosticReport?patient={{context.patientId}}",
    },
    potentially_long_running=True,
)
def imaging_report_draft(call: HookCall) -> HookResponse:
    """Answer a card per study without an image, and the draft card (or "running") for the newest image."""
    p = call.prefetch
    sources, studies_without_image = imaging_worklist(p["studies"], p["media"], p["documents"], p["reports"])
    cards = [no_image_card(study) for study in studies_without_image]

    def ai_cards() -> list[Card]:
        if not sources or call.jobs is None or call.images is None or call.drafts is None:
            return []
        source, drafts = sources[0], call.drafts
        try:
            image, evidence, job = request_imaging_job(call, source)
        except ImageRejected as rejected:
            return [unreadable_image_card(source, str(rejected))]

        def draft_card(finished: JobRecord) -> Card | None:
            output = ImagingReadOutput.model_validate(finished.result)
            draft = drafts.record(finished, image.content_hash, source.study, source.resource, evidence)
            return imaging_draft_card(output, finished, draft)

        # The worker fetches and decodes the image: one it could not read fails the job, and says why here.
        if job is not None and job.state == "failed" and (job.error or "").startswith(IMAGE_NOT_READ):
            return [unreadable_image_card(source, (job.error or "").removeprefix(IMAGE_NOT_READ))]
        return job_cards(job, "Imaging report draft", call.jobs.job_url, draft_card)

    return HookResponse(cards=cards + guarded_ai_cards(call.service_id, ai_cards))
