"""fleet: jobs.priority, num_gpus, gpu_class, min_gpu_memory_gb, announced_at and the claim-order index

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 18:50:00
"""

from alembic import op
import sqlalchemy as sa

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("num_gpus", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("gpu_class", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("min_gpu_memory_gb", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("announced_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_jobs_state_priority_queued_at", "jobs", ["state", "priority", "queued_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_state_priority_queued_at", table_name="jobs")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("announced_at")
        batch_op.drop_column("min_gpu_memory_gb")
        batch_op.drop_column("gpu_class")
        batch_op.drop_column("num_gpus")
        batch_op.drop_column("priority")
