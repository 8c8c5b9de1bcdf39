"""indexes for GET /v1/jobs under load and the dataset dedupe lookup

Jobs get three composite indexes in the order GET /v1/jobs pages (queued_at, id): an owner's
jobs, an owner's jobs in one state, every job in one state (queue positions). They begin with
the columns of the single-column ix_jobs_owner and ix_jobs_state, which they replace.
Datasets get (owner, content_hash) for an upload's lookup of the owner's identical dataset.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 18:00:00
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_owner_queued_at", "jobs", ["owner", "queued_at", "id"])
    op.create_index("ix_jobs_owner_state_queued_at", "jobs", ["owner", "state", "queued_at", "id"])
    op.create_index("ix_jobs_state_queued_at", "jobs", ["state", "queued_at", "id"])
    op.drop_index("ix_jobs_owner", table_name="jobs")
    op.drop_index("ix_jobs_state", table_name="jobs")
    op.create_index("ix_datasets_owner_content_hash", "datasets", ["owner", "content_hash"])


def downgrade() -> None:
    op.drop_index("ix_datasets_owner_content_hash", table_name="datasets")
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index("ix_jobs_owner", "jobs", ["owner"])
    op.drop_index("ix_jobs_state_queued_at", table_name="jobs")
    op.drop_index("ix_jobs_owner_state_queued_at", table_name="jobs")
    op.drop_index("ix_jobs_owner_queued_at", table_name="jobs")
