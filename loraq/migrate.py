"""Run the Alembic migrations programmatically (make run, tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from loraq.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(settings: Settings) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", settings.sqlalchemy_url)
    return config


def upgrade(settings: Settings, revision: str = "head") -> None:
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings), revision)


def downgrade(settings: Settings, revision: str = "base") -> None:
    command.downgrade(alembic_config(settings), revision)


if __name__ == "__main__":
    upgrade(Settings())
