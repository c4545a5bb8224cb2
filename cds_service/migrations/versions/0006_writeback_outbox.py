"""Write-back outbox: a signed report is queued in the sign's transaction and delivered until written.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("drafts") as batch:
        batch.add_column(sa.Column("writeback_state", sa.String(16)))
        batch.create_index("ix_drafts_writeback_state", ["writeback_state"])
    # Drafts signed before: written where a location was kept, failed (visible, retried by hand) where an
    # error was; the rest had no write-back server.
    op.execute("UPDATE drafts SET writeback_state = 'written' WHERE writeback IS NOT NULL")
    op.execute(
        "UPDATE drafts SET writeback_state = 'failed' "
        "WHERE status = 'signed' AND writeback IS NULL AND writeback_error IS NOT NULL"
    )
    op.create_table(
        "writeback_outbox",
        sa.Column("draft_id", sa.String(32), primary_key=True),
        sa.Column("base_url", sa.String(2048), nullable=False),
        sa.Column("sealed_token", sa.LargeBinary),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("writeback_outbox")
    with op.batch_alter_table("drafts") as batch:
        batch.drop_index("ix_drafts_writeback_state")
        batch.drop_column("writeback_state")
