"""jobs.attempt_base: a user's retry starts a new series of attempts for the automatic cap

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 21:15:00
"""

from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("attempt_base", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("attempt_base")
