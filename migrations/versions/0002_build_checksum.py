"""Index builds record the sha256 of their index file, so a damaged live index is found and rebuilt.

Revision ID: 0002
Revises: 0003 (the head when this was written; 0002 was reserved for it)
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Builds made before this revision have none: they are checked for loading, not for their bytes.
    with op.batch_alter_table("builds") as batch:
        batch.add_column(sa.Column("checksum", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("builds") as batch:
        batch.drop_column("checksum")
