"""Alembic: one migration history that upgrades, downgrades and upgrades again on both databases."""

from sqlalchemy import inspect

from loraq.db import make_engine
from loraq.migrate import downgrade, upgrade
from loraq.models import Base

TABLES = {"datasets", "jobs", "job_metrics", "job_events", "artifacts", "api_keys", "base_models"}


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
