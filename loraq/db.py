"""Engine and sessions, built from settings (never at import time)."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from loraq.settings import Settings


def make_engine(settings: Settings) -> Engine:
    """An engine for the configured database; SQLite gets WAL and a busy timeout for concurrency."""
    url = settings.sqlalchemy_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # No cap on connections: a request may hold one while it waits for a thread, and a capped
        # pool then deadlocks against the thread pool under a burst (seen at 100 event streams).
        # SQLite connections are only open files.
        # Kept open: as many as the API's worker threads (40), since a connection opened past the
        # pool's size is closed on return and the next one pays the open and pragmas again.
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               pool_size=40, max_overflow=-1)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # Room for every thread of the API's pool (40) and the requests waiting between steps, the
    # threads' share kept open (a new PostgreSQL connection costs milliseconds); several API
    # processes (LORAQ_API_WORKERS) split it, staying within the server's 100 connections.
    share = max(1, settings.api_workers)
    return create_engine(url, pool_pre_ping=True, pool_size=max(10, 40 // share),
                         max_overflow=max(20, 80 // share - max(10, 40 // share)))


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
