"""validation loss: job_metrics.validation_loss and jobs.best_checkpoint

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 19:00:00
"""

from alembic import op
import sqlalchemy as sa

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_metrics") as batch_op:
        batch_op.add_column(sa.Column("validation_loss", sa.Float(), nullable=True))
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("best_checkpoint", sa.String(length=300), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("best_checkpoint")
    with op.batch_alter_table("job_metrics") as batch_op:
        batch_op.drop_column("validation_loss")
