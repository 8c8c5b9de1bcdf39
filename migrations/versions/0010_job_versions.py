"""job_versions: a counter per owner, and one for the queue, bumped by triggers on every change a
GET /v1/jobs page shows (it keeps pages in memory, keyed by these counters)

A page of 50 jobs cost 2.6-4.2 ms of server time against 0.4 ms for authentication alone, most of
it per request (six statements, 50 rows, a 107 KB body), not per row. An API process now keeps
the pages it answered and serves one again while the counters it was read under have not moved:
one single-row read instead of the page.

What a listed page shows, and which counter each change moves (in the writing transaction, so a
page is never older than the counters it is served under):
- an owner's row (`owner` = the owner): any insert or delete of their jobs, an update that
  changes a listed column (the ones GET /v1/jobs shows; not event_seq, lease_until,
  announced_at and other bookkeeping that every event, heartbeat and wake-up writes), and any
  insert, delete or change (step, time, speed) of their jobs' metrics (a running job's ETA);
- the queue's row (`owner` = '', which no owner name can be): a job entering or leaving the
  queued state, or a queued job's priority, time or GPU class changing: queue positions, which
  cross owners. A page of an owner is read under their row plus the queue's; an admin's, under
  every row (the sum: each counter only grows, so any bump moves it).
Per owner rather than one global counter: a running job's step moves only its owner's pages,
and writers of different owners do not queue on one row (except for the queue's, which only
queue changes take: after the owner's row and job_counts', in every transaction, so in one order).
A SQLite migration that recreates `jobs` or `job_metrics` (batch mode) drops these triggers:
create them again there (tests/loraq/test_migrations.py checks they work).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 21:00:00
"""

import time

from alembic import op
import sqlalchemy as sa

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

QUEUE = "''"  # the queue's row: an empty owner (owners match loraq.auth.OWNER_PATTERN, never empty)

# The jobs columns a listed page shows (api/services/jobs.py _LIST_COLUMNS, plus the owner that
# scopes it); a change of any other column leaves pages as they are.
LISTED = ("owner", "name", "dataset_id", "base_model", "config", "state", "step", "total_steps", "last_loss",
          "queued_at", "started_at", "finished_at", "error", "attempt", "worker", "priority", "num_gpus",
          "gpu_class", "min_gpu_memory_gb")
# What places a queued job in the queue (loraq.jobs.ahead_condition).
QUEUE_PLACE = ("state", "priority", "queued_at", "gpu_class")
# The metric columns a running job's speed and ETA are read from (api/services/jobs.py job_speeds).
METRIC_READ = ("job_id", "step", "time", "images_per_s")


def _changed(columns, distinct: str, cast_json: bool = False) -> str:
    """SQL: any of `columns` differs between OLD and NEW (`distinct`: SQLite's IS NOT or
    PostgreSQL's IS DISTINCT FROM; PostgreSQL's json has no equality, so compare its text)."""
    def side(row, column):
        return f"{row}.{column}::text" if cast_json and column == "config" else f"{row}.{column}"
    return " OR ".join(f"{side('OLD', c)} {distinct} {side('NEW', c)}" for c in columns)


SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER job_versions_insert AFTER INSERT ON jobs BEGIN
         INSERT INTO job_versions (owner, n) VALUES (NEW.owner, 1) ON CONFLICT (owner) DO UPDATE SET n = n + 1;
         UPDATE job_versions SET n = n + 1 WHERE owner = {QUEUE} AND NEW.state = 'queued';
       END""",
    f"""CREATE TRIGGER job_versions_delete AFTER DELETE ON jobs BEGIN
         UPDATE job_versions SET n = n + 1 WHERE owner = OLD.owner;
         UPDATE job_versions SET n = n + 1 WHERE owner = {QUEUE} AND OLD.state = 'queued';
       END""",
    f"""CREATE TRIGGER job_versions_update AFTER UPDATE ON jobs WHEN {_changed(LISTED, 'IS NOT')} BEGIN
         INSERT INTO job_versions (owner, n) VALUES (NEW.owner, 1) ON CONFLICT (owner) DO UPDATE SET n = n + 1;
         UPDATE job_versions SET n = n + 1 WHERE owner = OLD.owner AND OLD.owner IS NOT NEW.owner;
         UPDATE job_versions SET n = n + 1 WHERE owner = {QUEUE}
           AND (OLD.state = 'queued' OR NEW.state = 'queued') AND ({_changed(QUEUE_PLACE, 'IS NOT')});
       END""",
    """CREATE TRIGGER job_versions_metric_insert AFTER INSERT ON job_metrics BEGIN
         UPDATE job_versions SET n = n + 1 WHERE owner = (SELECT owner FROM jobs WHERE id = NEW.job_id);
       END""",
    """CREATE TRIGGER job_versions_metric_delete AFTER DELETE ON job_metrics BEGIN
         UPDATE job_versions SET n = n + 1 WHERE owner = (SELECT owner FROM jobs WHERE id = OLD.job_id);
       END""",
    f"""CREATE TRIGGER job_versions_metric_update AFTER UPDATE ON job_metrics WHEN {_changed(METRIC_READ, 'IS NOT')}
       BEGIN
         UPDATE job_versions SET n = n + 1 WHERE owner IN (SELECT owner FROM jobs WHERE id IN (OLD.job_id, NEW.job_id));
       END""",
]

POSTGRES_TRIGGERS = [
    f"""CREATE FUNCTION job_versions_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         IF TG_OP = 'DELETE' THEN
           UPDATE job_versions SET n = n + 1 WHERE owner = OLD.owner;
           IF OLD.state = 'queued' THEN
             UPDATE job_versions SET n = n + 1 WHERE owner = {QUEUE};
           END IF;
           RETURN NULL;
         END IF;
         INSERT INTO job_versions AS v (owner, n) VALUES (NEW.owner, 1) ON CONFLICT (owner) DO UPDATE SET n = v.n + 1;
         IF TG_OP = 'INSERT' THEN
           IF NEW.state = 'queued' THEN
             UPDATE job_versions SET n = n + 1 WHERE owner = {QUEUE};
           END IF;
           RETURN NULL;
         END IF;
         IF OLD.owner IS DISTINCT FROM NEW.owner THEN
           UPDATE job_versions SET n = n + 1 WHERE owner = OLD.owner;
         END IF;
         IF (OLD.state = 'queued' OR NEW.state = 'queued') AND ({_changed(QUEUE_PLACE, 'IS DISTINCT FROM')}) THEN
           UPDATE job_versions SET n = n + 1 WHERE owner = {QUEUE};
         END IF;
         RETURN NULL;
       END $$""",
    """CREATE TRIGGER job_versions_insert_delete AFTER INSERT OR DELETE ON jobs
       FOR EACH ROW EXECUTE FUNCTION job_versions_jobs()""",
    f"""CREATE TRIGGER job_versions_update AFTER UPDATE OF {', '.join(LISTED)} ON jobs FOR EACH ROW
       WHEN ({_changed(LISTED, 'IS DISTINCT FROM', cast_json=True)})
       EXECUTE FUNCTION job_versions_jobs()""",
    """CREATE FUNCTION job_versions_metrics() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         IF TG_OP = 'INSERT' THEN
           UPDATE job_versions SET n = n + 1 WHERE owner = (SELECT owner FROM jobs WHERE id = NEW.job_id);
         ELSIF TG_OP = 'DELETE' THEN
           UPDATE job_versions SET n = n + 1 WHERE owner = (SELECT owner FROM jobs WHERE id = OLD.job_id);
         ELSE
           UPDATE job_versions SET n = n + 1
             WHERE owner IN (SELECT owner FROM jobs WHERE id IN (OLD.job_id, NEW.job_id));
         END IF;
         RETURN NULL;
       END $$""",
    """CREATE TRIGGER job_versions_metric_insert_delete AFTER INSERT OR DELETE ON job_metrics
       FOR EACH ROW EXECUTE FUNCTION job_versions_metrics()""",
    f"""CREATE TRIGGER job_versions_metric_update AFTER UPDATE OF {', '.join(METRIC_READ)} ON job_metrics
       FOR EACH ROW WHEN ({_changed(METRIC_READ, 'IS DISTINCT FROM')})
       EXECUTE FUNCTION job_versions_metrics()""",
]


def upgrade() -> None:
    op.create_table(
        "job_versions",
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("owner"),
    )
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:  # no owner may appear between the backfill and the triggers
        op.execute("LOCK TABLE jobs, job_metrics IN SHARE ROW EXCLUSIVE MODE")
    # A row for the queue and for every owner with jobs, so that a bump always finds its row
    # (the triggers that may meet a new owner, on insert or an owner change, create theirs).
    # The queue's counter starts at the time in microseconds: were the table ever dropped and
    # made again (a downgrade and upgrade), the counters could not come back to a value an API
    # process still holds pages under (that would take over a million bumps a second).
    op.execute(f"INSERT INTO job_versions (owner, n) VALUES ({QUEUE}, {time.time_ns() // 1000})")
    op.execute(f"INSERT INTO job_versions (owner, n) SELECT DISTINCT owner, 0 FROM jobs WHERE owner <> {QUEUE}")
    for statement in POSTGRES_TRIGGERS if postgres else SQLITE_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS job_versions_metric_update ON job_metrics")
        op.execute("DROP TRIGGER IF EXISTS job_versions_metric_insert_delete ON job_metrics")
        op.execute("DROP TRIGGER IF EXISTS job_versions_update ON jobs")
        op.execute("DROP TRIGGER IF EXISTS job_versions_insert_delete ON jobs")
        op.execute("DROP FUNCTION IF EXISTS job_versions_metrics()")
        op.execute("DROP FUNCTION IF EXISTS job_versions_jobs()")
    else:
        for name in ("job_versions_metric_update", "job_versions_metric_delete", "job_versions_metric_insert",
                     "job_versions_update", "job_versions_delete", "job_versions_insert"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_table("job_versions")
