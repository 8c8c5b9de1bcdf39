"""Alembic: one migration history that upgrades, downgrades and upgrades again on both databases."""

from sqlalchemy import inspect

from loraq.db import make_engine
from loraq.migrate import downgrade, upgrade
from loraq.models import Base

TABLES = {"datasets", "jobs", "job_metrics", "job_events", "artifacts", "api_keys", "base_models",
          "webhook_secrets", "webhook_deliveries", "job_counts", "job_versions"}


def tables(settings) -> set[str]:
    engine = make_engine(settings)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(settings):
    # `settings` starts migrated (from a template); go all the way down first: an empty database.
    downgrade(settings, "base")
    assert tables(settings) == set()

    upgrade(settings)
    assert tables(settings) == TABLES
    downgrade(settings, "base")
    assert tables(settings) == set()
    upgrade(settings)
    assert tables(settings) == TABLES


def test_migrations_match_the_models(settings):
    """Every column the ORM maps exists in the migrated schema (no model change without migration)."""
    engine = make_engine(settings)
    try:
        inspector = inspect(engine)
        for table in Base.metadata.sorted_tables:
            migrated = {column["name"] for column in inspector.get_columns(table.name)}
            assert {column.name for column in table.columns} == migrated, table.name
    finally:
        engine.dispose()


def test_migrations_create_the_indexes_the_models_declare(settings):
    """The same indexes (name, columns in order, uniqueness) in the models as in the migrated schema:
    a query planned against the models' indexes finds them in a migrated database, and an index
    the migrations add is declared where the queries that need it are read."""
    engine = make_engine(settings)
    try:
        inspector = inspect(engine)
        for table in Base.metadata.sorted_tables:
            declared = {(index.name, tuple(column.name for column in index.columns), bool(index.unique))
                        for index in table.indexes}
            migrated = {(index["name"], tuple(index["column_names"]), bool(index["unique"]))
                        for index in inspector.get_indexes(table.name)
                        if not index.get("duplicates_constraint")}  # PostgreSQL: a unique constraint's own
            assert declared == migrated, table.name
    finally:
        engine.dispose()


def test_the_list_and_dedupe_lookups_have_their_indexes(settings):
    """Migration 0004: GET /v1/jobs pages and counts, queue positions and the dataset dedupe
    lookup each have an index in their order."""
    engine = make_engine(settings)
    try:
        inspector = inspect(engine)
        jobs = {index["name"]: index["column_names"] for index in inspector.get_indexes("jobs")}
        datasets = {index["name"]: index["column_names"] for index in inspector.get_indexes("datasets")}
    finally:
        engine.dispose()
    assert jobs["ix_jobs_owner_queued_at"] == ["owner", "queued_at", "id"]
    assert jobs["ix_jobs_owner_state_queued_at"] == ["owner", "state", "queued_at", "id"]
    assert jobs["ix_jobs_state_queued_at"] == ["state", "queued_at", "id"]
    assert "ix_jobs_owner" not in jobs and "ix_jobs_state" not in jobs  # prefixes of the above
    assert datasets["ix_datasets_owner_content_hash"] == ["owner", "content_hash"]


def test_job_counts_follow_every_insert_state_change_and_delete(settings):
    """Migration 0009's triggers keep job_counts equal to a GROUP BY count of jobs, whatever SQL
    writes the jobs (also checks a later migration did not drop them by recreating `jobs`)."""
    from datetime import datetime, timezone

    from sqlalchemy import delete, func, insert, select, update

    from loraq.models import Dataset, Job, JobCount

    def counts(conn) -> tuple[dict, dict]:
        kept = {(r.owner, r.state): r.n for r in conn.execute(select(JobCount)) if r.n}
        counted = {(r.owner, r.state): r.n for r in conn.execute(
            select(Job.owner, Job.state, func.count().label("n")).group_by(Job.owner, Job.state))}
        return kept, counted

    engine = make_engine(settings)
    try:
        with engine.begin() as conn:
            conn.execute(insert(Dataset), [{"id": "d1", "owner": "a", "name": "d", "image_count": 1,
                                            "captioned_count": 1, "total_bytes": 1, "content_hash": "0" * 64,
                                            "storage_path": "d", "report": {}}])
            now = datetime.now(timezone.utc)
            conn.execute(insert(Job), [{"id": f"j{n}", "owner": "a" if n < 5 else "b", "dataset_id": "d1",
                                        "base_model": "m", "config": {}, "state": "queued", "total_steps": 1,
                                        "queued_at": now} for n in range(8)])
            conn.execute(update(Job).where(Job.id.in_(["j0", "j1", "j5"])).values(state="running"))
            conn.execute(update(Job).where(Job.id == "j0").values(state="succeeded", step=1))
            conn.execute(update(Job).where(Job.id == "j2").values(step=0))  # no state change
            conn.execute(update(Job).where(Job.id == "j3").values(owner="b"))
        with engine.begin() as conn:
            conn.execute(delete(Job).where(Job.id.in_(["j0", "j7"])))
            kept, counted = counts(conn)
        assert counted == {("a", "running"): 1, ("a", "queued"): 2, ("b", "running"): 1, ("b", "queued"): 2}
        assert kept == counted
    finally:
        engine.dispose()
