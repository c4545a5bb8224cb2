"""Feedback and hook audit tables.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("service_id", sa.String(128), nullable=False, index=True),
        sa.Column("card_uuid", sa.String(128), nullable=False, index=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("accepted_suggestions", sa.JSON, nullable=False),
        sa.Column("override_reason_code", sa.String(128)),
        sa.Column("override_reason_system", sa.String(512)),
        sa.Column("override_comment", sa.Text),
        sa.Column("outcome_timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "hook_audit",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("service_id", sa.String(128), nullable=False, index=True),
        sa.Column("hook_instance", sa.String(64), nullable=False),
        sa.Column("patient_hash", sa.String(64)),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("outcome", sa.String(64), nullable=False),
        sa.Column("cards", sa.Integer, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("hook_audit")
    op.drop_table("feedback")
