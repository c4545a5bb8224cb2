"""Drafts keep what the worker read: the study, series, instance and frame, and the DICOMweb root.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("drafts") as batch:
        batch.add_column(sa.Column("image_read", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("drafts") as batch:
        batch.drop_column("image_read")
