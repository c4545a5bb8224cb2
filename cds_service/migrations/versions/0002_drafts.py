"""Drafts of AI reports and their sign-off.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drafts",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("source_key", sa.String(64), nullable=False, unique=True),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("patient_id", sa.String(64), nullable=False, index=True),
        sa.Column("encounter_id", sa.String(64)),
        sa.Column("requested_by", sa.String(128)),
        sa.Column("study_ref", sa.String(128)),
        sa.Column("image_ref", sa.String(128)),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(512), nullable=False),
        sa.Column("model_version", sa.String(512), nullable=False),
        sa.Column("input_hashes", sa.JSON, nullable=False),
        sa.Column("evidence", sa.JSON, nullable=False),
        sa.Column("ai_text", sa.Text, nullable=False),
        sa.Column("ai_urgency", sa.String(16), nullable=False),
        sa.Column("draft_report", sa.JSON, nullable=False),
        sa.Column("ai_provenance", sa.JSON, nullable=False),
        sa.Column("image_png", sa.LargeBinary),
        sa.Column("signed_text", sa.Text),
        sa.Column("signed_by", sa.String(128)),
        sa.Column("signed_by_name", sa.String(256)),
        sa.Column("signed_at", sa.DateTime(timezone=True)),
        sa.Column("final_report", sa.JSON),
        sa.Column("writeback", sa.String(512)),
        sa.Column("reject_reason", sa.Text),
        sa.Column("rejected_by", sa.String(128)),
        sa.Column("rejected_at", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("drafts")
