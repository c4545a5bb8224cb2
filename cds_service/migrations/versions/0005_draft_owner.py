"""A draft belongs to the issuer (and tenant) of the hook call that made it; a signer is recorded with the
issuer that vouched for it.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("drafts") as batch:
        batch.add_column(sa.Column("issuer", sa.String(2048)))
        batch.add_column(sa.Column("tenant", sa.String(256)))
        batch.add_column(sa.Column("signed_by_issuer", sa.String(2048)))
        batch.create_index("ix_drafts_issuer_patient", ["issuer", "patient_id"])


def downgrade() -> None:
    with op.batch_alter_table("drafts") as batch:
        batch.drop_index("ix_drafts_issuer_patient")
        batch.drop_column("signed_by_issuer")
        batch.drop_column("tenant")
        batch.drop_column("issuer")
