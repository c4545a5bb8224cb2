"""Drafts belong to one patient on one FHIR server; a write-back that failed is kept visible.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("drafts") as batch:
        batch.add_column(sa.Column("fhir_server", sa.String(2048)))
        batch.add_column(sa.Column("writeback_error", sa.String(512)))


def downgrade() -> None:
    with op.batch_alter_table("drafts") as batch:
        batch.drop_column("writeback_error")
        batch.drop_column("fhir_server")
