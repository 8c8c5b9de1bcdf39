"""Alembic environment: the database comes from loraq's settings unless a URL is passed in."""

from alembic import context

from loraq.db import make_engine
from loraq.models import Base
from loraq.settings import Settings

target_metadata = Base.metadata


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    settings = Settings(database_url=url) if url else Settings()
    engine = make_engine(settings)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()  # no idle connections left behind (SQLite WAL checkpoint, PG templates)


def _run(connection) -> None:
    # Batch mode: SQLite cannot ALTER most things, so changes there copy the table.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
