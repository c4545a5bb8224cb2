"""Model output → AI cards (always marked as drafts), job-state cards, and the prompts the tasks send."""

from __future__ import annotations

from datetime import UTC
from datetime import datetime
from typing import Any

import pytest

from cds_service.wire import Card
from cds_service.wire import JobRecord
from cds_service.wire import Source
from fhir_mappings.ai_cards import AI_DISCLAIMER
from fhir_mappings.ai_cards import MAX_EVIDENCE_LINKS
from fhir_mappings.ai_cards import ai_state
from fhir_mappings.ai_cards import cited_evidence
from fhir_mappings.ai_cards import evidence_links
from fhir_mappings.ai_cards import guarded_ai_cards
from fhir_mappings.ai_cards import job_cards
from fhir_mappings.ai_cards import model_display_name
from fhir_mappings.ai_cards import model_source
from fhir_mappings.ai_cards import summary_ai_card
from fhir_mappings.ai_cards import summary_job_cards
from fhir_mappings.model_outputs import PatientSummaryOutput

OFFERED = ["Condition/c1", "MedicationRequest/m1", "Observation/o1"]
SUMMARY = {
    "summary": "31 year old man with hypertension on hydrochlorothiazide.",
    "key_problems": ["Hypertension"],
    "medication_concerns": ["Check potassium on a thiazide"],
    "follow_up": ["Repeat blood pressure"],
    "evidence_ids": ["Observation/o1", "Condition/invented", "Condition/c1", "Observation/o1"],
}
FHIR_SERVER = "https://ehr.test/fhir/"


def _job(state: str, result: dict[str, Any] | None = None, **fields: Any) -> JobRecord:
    values: dict[str, Any] = {
        "id": f"job-{state}",
        "service_id": "patient-summary",
        "task": "patient-summary",
        "state": state,
        "created_at": datetime(2025, 1, 1, tzinfo=UTC),
        "model": "google/medgemma-4b-it",
        "model_version": "rev-abc123",
        "result": result,
    }
    values.update(fields)
    return JobRecord(**values)


def _job_url(job_id: str) -> str:
    return f"https://cds.test/jobs/{job_id}"


def test_cited_evidence_keeps_offered_ids_in_citation_order() -> None:
    assert cited_evidence(SUMMARY["evidence_ids"], OFFERED) == ["Observation/o1", "Condition/c1"]
    assert cited_evidence(["Patient/p1"], OFFERED) == []
    assert cited_evidence([], OFFERED) == []


def test_evidence_links_need_a_fhir_server_and_are_capped() -> None:
    assert evidence_links(OFFERED, None) == []
    assert evidence_links(OFFERED, "") == []
    many = [f"Observation/o{i}" for i in range(MAX_EVIDENCE_LINKS + 3)]
    links = [link.wire() for link in evidence_links(many, FHIR_SERVER)]
    assert len(links) == MAX_EVIDENCE_LINKS
    assert links[0] == {
        "label": "Evidence: Observation/o0",
        "url": "https://ehr.test/fhir/Observation/o0",
        "type": "absolute",
    }


def test_model_source_names_model_and_version() -> None:
    assert model_source(_job("done")) == Source(label="MedGemma AI draft: MedGemma 4B (rev-abc123)")
    assert model_source(_job("done", model=None, model_version=None)).label == "MedGemma AI draft: model"
    assert len(model_source(_job("done", model="m" * 500)).label) == 200


@pytest.mark.parametrize(
    ("configured", "shown"),
    [
        ("google/medgemma-27b-text-it", "MedGemma 27B (text)"),
        ("my-org/medgemma-4b-finetune", "my-org/medgemma-4b-finetune"),
        ("/srv/models/medgemma-4b-local/", "medgemma-4b-local"),
        ("/root/.cache/medgemma-cds/tiny-gemma3", "tiny-gemma3"),
        ("C:\\models\\medgemma", "medgemma"),
    ],
)
def test_model_is_named_as_people_know_it_never_by_its_path(configured: str, shown: str) -> None:
    assert model_display_name(configured) == shown
    assert "/srv" not in model_source(_job("done", model=configured)).label


def test_summary_ai_card_is_a_marked_draft_citing_only_offered_evidence() -> None:
    output = PatientSummaryOutput.model_validate(SUMMARY)

    body = summary_ai_card(output, _job("done", SUMMARY), OFFERED, FHIR_SERVER).wire()

    Card.model_validate(body)
    assert body["summary"] == "AI pre-visit summary (draft, needs clinician review)"
    assert body["indicator"] == "info"
    assert body["source"]["label"] == "MedGemma AI draft: MedGemma 4B (rev-abc123)"
    assert body["detail"].startswith(SUMMARY["summary"])
    assert body["detail"].endswith(AI_DISCLAIMER)
    assert "**Key problems**\n\n- Hypertension" in body["detail"]
    assert "**Medication concerns**\n\n- Check potassium on a thiazide" in body["detail"]
    assert "**Follow-up**\n\n- Repeat blood pressure" in body["detail"]
    assert "**Evidence used**\n\n- Observation/o1\n- Condition/c1" in body["detail"]
    assert "Condition/invented" not in str(body)
    assert [link["url"] for link in body["links"]] == [
        "https://ehr.test/fhir/Observation/o1",
        "https://ehr.test/fhir/Condition/c1",
    ]
    assert "suggestions" not in body


def test_summary_ai_card_without_fhir_server_has_no_links() -> None:
    output = PatientSummaryOutput.model_validate(SUMMARY)
    assert "links" not in summary_ai_card(output, _job("done", SUMMARY), OFFERED, None).wire()


def never(_: JobRecord) -> Card:
    raise AssertionError("no result to render")


def test_a_failed_job_says_what_failed_in_plain_words() -> None:
    (card,) = job_cards(
        _job("failed", error="model task exceeded its time limit"), "Order review", _job_url, never
    )
    assert card.summary == "Order review: AI analysis failed"
    assert "What failed: the model took longer than it is allowed to." in (card.detail or "")
    assert "model task exceeded" not in (card.detail or "")
    assert card.source.topic is not None and card.source.topic.code == "ai-failed"
    assert [link.url for link in card.links] == ["https://cds.test/jobs/job-failed"]
    unreadable = "the job request does not decrypt: the API and the worker must share MEDGEMMA_CDS_SECRET_KEY"
    (card,) = job_cards(_job("failed", error=unreadable), "Imaging report draft", _job_url, never)
    assert "could not read the request (a configuration problem for its operators)" in (card.detail or "")
    assert "SECRET_KEY" not in (card.detail or "")


def test_no_job_record_means_the_ai_is_unavailable() -> None:
    (card,) = job_cards(None, "Pre-visit summary", _job_url, never)
    assert card.summary == "Pre-visit summary: AI analysis unavailable"
    assert "can't be reached" in (card.detail or "") and card.links == []


@pytest.mark.parametrize(
    ("progress", "summary", "words"),
    [
        ({"workers": 0}, "AI analysis unavailable", "No model worker is running for it"),
        (
            {"workers": 2, "ahead": 0, "expected_wait_s": 4.2},
            "AI analysis queued",
            "Queued: next in line; expected in about 4 seconds.",
        ),
        (
            {"workers": 1, "ahead": 3, "expected_wait_s": 600},
            "AI analysis queued",
            "Queued: 3 ahead of it; expected in about 10 minutes.",
        ),
        ({"workers": 1, "ahead": None}, "AI analysis queued", "Queued behind many other analyses."),
        ({"workers": 1, "ahead": 2}, "AI analysis queued", "Queued: 2 ahead of it."),
    ],
)
def test_a_queued_job_says_where_it_stands(progress: dict[str, Any], summary: str, words: str) -> None:
    record = _job("queued").model_copy(update=progress)
    (card,) = job_cards(record, "Pre-visit summary", _job_url, never)
    assert card.summary == f"Pre-visit summary: {summary}"
    assert words in (card.detail or "")
    assert ai_state(record).headline == summary


def test_a_text_cut_at_its_limit_is_marked_on_the_card() -> None:
    output = PatientSummaryOutput.model_validate(SUMMARY)
    whole = summary_ai_card(output, _job("done", SUMMARY), OFFERED, None)
    cut = summary_ai_card(
        output, _job("done", SUMMARY, truncated=["summary", "key_problems.0"]), OFFERED, None
    )

    assert "cut short" not in (whole.detail or "")
    assert "**Text cut short:** summary, key problems (item 1) reached its length limit" in (cut.detail or "")


@pytest.mark.parametrize("state", ["queued", "running"])
def test_job_cards_for_pending_jobs_link_to_the_status(state: str) -> None:
    (card,) = job_cards(_job(state).model_copy(update={"workers": 1}), "Pre-visit summary", _job_url, never)

    body = card.wire()
    Card.model_validate(body)
    assert body["summary"] == f"Pre-visit summary: AI analysis {state}"
    assert body["indicator"] == "info"
    assert AI_DISCLAIMER in body["detail"]
    assert body["links"] == [
        {"label": "AI analysis status", "url": f"https://cds.test/jobs/job-{state}", "type": "absolute"}
    ]


def test_a_running_job_on_a_worker_that_died_is_unavailable() -> None:
    assert ai_state(_job("running").model_copy(update={"workers": 0})).key == "unavailable"


def test_an_error_building_the_ai_card_gives_a_failure_card() -> None:
    def broken() -> list[Card]:
        raise ValueError("a cached result that no longer validates")

    (card,) = guarded_ai_cards("imaging-report-draft", broken)
    assert card.summary == "Imaging report draft: AI analysis failed"
    assert "a cached result" not in (card.detail or "")


def test_job_cards_for_a_done_job_render_its_result() -> None:
    made = Card(summary="result", indicator="warning", source=Source(label="x"))
    seen: list[JobRecord] = []

    def done(record: JobRecord) -> Card | None:
        seen.append(record)
        return made

    record = _job("done", {"anything": 1})
    assert job_cards(record, "Order review", _job_url, done) == [made]
    assert seen == [record]
    assert job_cards(record, "Order review", _job_url, lambda _: None) == []


def test_summary_job_cards_for_each_state() -> None:
    done = summary_job_cards(_job("done", SUMMARY), OFFERED, FHIR_SERVER, _job_url)
    assert [c.summary for c in done] == ["AI pre-visit summary (draft, needs clinician review)"]
    queued = summary_job_cards(
        _job("queued").model_copy(update={"workers": 1}), OFFERED, FHIR_SERVER, _job_url
    )
    assert [c.summary for c in queued] == ["Pre-visit summary: AI analysis queued"]
    failed = summary_job_cards(_job("failed"), OFFERED, FHIR_SERVER, _job_url)
    assert [c.summary for c in failed] == ["Pre-visit summary: AI analysis failed"]
    missing = summary_job_cards(None, OFFERED, FHIR_SERVER, _job_url)
    assert [c.summary for c in missing] == ["Pre-visit summary: AI analysis unavailable"]


def test_an_answer_cut_at_its_budget_fails_with_a_card_that_says_so() -> None:
    cut = _job(
        "failed",
        error="the answer did not fit its token budget (cut at 1536 and 3072 new tokens)",
        truncated=["max_new_tokens"],
    )
    (card,) = job_cards(cut, "Pre-visit summary", _job_url, never)
    assert card.summary == "Pre-visit summary: AI analysis failed (answer cut short)"
    assert "did not fit its output budget, even when run again with a larger one" in (card.detail or "")
    assert "tried again only when the record changes" in (card.detail or "")
