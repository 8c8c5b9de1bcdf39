"""job_counts: jobs per owner and state, kept by triggers on jobs (GET /v1/jobs reads its totals here)

Counting an index of 10,000 jobs twice per page (the total, and the queued jobs ahead of the
page) was most of GET /v1/jobs under load. The triggers run in the writing transaction, for
every insert, state (or owner) change and delete, so the counts are exact whoever writes.
On PostgreSQL a state change updates both of its rows in one statement, so two opposite moves
of one owner's jobs lock them in the same order and cannot deadlock.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 19:10:00
"""

from alembic import op
import sqlalchemy as sa

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

SQLITE_TRIGGERS = [
    """CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs BEGIN
         INSERT OR IGNORE INTO job_counts (owner, state, n) VALUES (NEW.owner, NEW.state, 0);
         UPDATE job_counts SET n = n + 1 WHERE owner = NEW.owner AND state = NEW.state;
       END""",
    """CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs BEGIN
         UPDATE job_counts SET n = n - 1 WHERE owner = OLD.owner AND state = OLD.state;
       END""",
    """CREATE TRIGGER job_counts_update AFTER UPDATE OF owner, state ON jobs
       WHEN OLD.owner IS NOT NEW.owner OR OLD.state IS NOT NEW.state BEGIN
         INSERT OR IGNORE INTO job_counts (owner, state, n) VALUES (NEW.owner, NEW.state, 0);
         UPDATE job_counts SET n = n - 1 WHERE owner = OLD.owner AND state = OLD.state;
         UPDATE job_counts SET n = n + 1 WHERE owner = NEW.owner AND state = NEW.state;
       END""",
]

POSTGRES_TRIGGERS = [
    """CREATE FUNCTION job_counts_apply() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         IF TG_OP = 'DELETE' THEN
           UPDATE job_counts SET n = n - 1 WHERE owner = OLD.owner AND state = OLD.state;
           RETURN NULL;
         END IF;
         INSERT INTO job_counts (owner, state, n) VALUES (NEW.owner, NEW.state, 0) ON CONFLICT DO NOTHING;
         IF TG_OP = 'INSERT' THEN
           UPDATE job_counts SET n = n + 1 WHERE owner = NEW.owner AND state = NEW.state;
         ELSE
           UPDATE job_counts SET n = n + CASE WHEN owner = NEW.owner AND state = NEW.state THEN 1 ELSE -1 END
             WHERE (owner = OLD.owner AND state = OLD.state) OR (owner = NEW.owner AND state = NEW.state);
         END IF;
         RETURN NULL;
       END $$""",
    """CREATE TRIGGER job_counts_insert_delete AFTER INSERT OR DELETE ON jobs
       FOR EACH ROW EXECUTE FUNCTION job_counts_apply()""",
    """CREATE TRIGGER job_counts_update AFTER UPDATE OF owner, state ON jobs FOR EACH ROW
       WHEN (OLD.owner IS DISTINCT FROM NEW.owner OR OLD.state IS DISTINCT FROM NEW.state)
       EXECUTE FUNCTION job_counts_apply()""",
]


def upgrade() -> None:
    op.create_table(
        "job_counts",
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("owner", "state"),
    )
    op.create_index("ix_job_counts_state", "job_counts", ["state"])
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:  # no job may change between the backfill and the triggers
        op.execute("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")
    op.execute("INSERT INTO job_counts (owner, state, n) SELECT owner, state, count(*) FROM jobs GROUP BY owner, state")
    for statement in POSTGRES_TRIGGERS if postgres else SQLITE_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS job_counts_update ON jobs")
        op.execute("DROP TRIGGER IF EXISTS job_counts_insert_delete ON jobs")
        op.execute("DROP FUNCTION IF EXISTS job_counts_apply()")
    else:
        for name in ("job_counts_update", "job_counts_delete", "job_counts_insert"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_index("ix_job_counts_state", table_name="job_counts")
    op.drop_table("job_counts")
