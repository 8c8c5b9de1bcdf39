"""Alembic: one migration history that upgrades, downgrades and upgrades again on both databases."""

from sqlalchemy import inspect

from loraq.db import make_engine
from loraq.migrate import downgrade, upgrade
from loraq.models import Base

TABLES = {"datasets", "jobs", "job_metrics", "job_events", "artifacts", "api_keys", "base_models",
          "webhook_secrets", "webhook_deliveries"}


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
