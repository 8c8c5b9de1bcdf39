"""`loraq-admin`: manage API keys on the server's own database (no running API needed).

    loraq-admin keys create --owner alice [--name laptop] [--admin]
    loraq-admin keys list [--owner alice]
    loraq-admin keys revoke KEY_ID
    loraq-admin models add PATH|HUB_ID [--name N] [--config DIR]
    loraq-admin models list
    loraq-admin models remove NAME
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click
import redis
from sqlalchemy.orm import Session

from loraq import auth, registry
from loraq.db import make_engine, make_session_factory
from loraq.errors import AppError
from loraq.settings import Settings


@contextmanager
def _session() -> Iterator[Session]:
    """A session on the server's database; an AppError becomes the command's error message."""
    engine = make_engine(Settings())
    try:
        with make_session_factory(engine)() as session:
            yield session
    except AppError as error:
        raise click.ClickException(error.message) from None
    finally:
        engine.dispose()


@click.group()
def main() -> None:
    """Administer a loraq server (reads LORAQ_* settings like the server does)."""


@main.group()
def keys() -> None:
    """Create, list and revoke API keys."""


@keys.command("create")
@click.option("--owner", required=True, help="who the key acts for: their datasets and jobs")
@click.option("--name", default=None, help="a note to tell keys apart")
@click.option("--admin", is_flag=True, help="an admin key sees every owner's data and manages keys")
def create(owner: str, name: str | None, admin: bool) -> None:
    """Create a key and print its secret (shown only now)."""
    try:
        auth.check_owner(owner)
    except AppError as error:
        raise click.BadParameter(error.message, param_hint="--owner") from None
    with _session() as session:
        row, secret = auth.create_key(session, owner, name, admin)
    click.echo(f"created key {row.id} for {row.owner}{' (admin)' if row.admin else ''}", err=True)
    click.echo(secret)


@keys.command("list")
@click.option("--owner", default=None)
def list_(owner: str | None) -> None:
    """Every key: id, owner, prefix, admin, created, last used, revoked."""
    with _session() as session:
        rows = auth.list_keys(session, owner)
    for row in rows:
        state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
        used = f"{row.last_used_at:%Y-%m-%d %H:%M}" if row.last_used_at else "never"
        click.echo(f"{row.id}\t{row.owner}\t{row.prefix}…\t{'admin' if row.admin else 'user'}\t"
                   f"created {row.created_at:%Y-%m-%d %H:%M}\tused {used}\t{state}\t{row.name or ''}")


@keys.command("revoke")
@click.argument("key_id")
def revoke(key_id: str) -> None:
    """Revoke a key: its next request gets 401."""
    client = redis.Redis.from_url(Settings().redis_url, socket_connect_timeout=2, socket_timeout=5)
    with _session() as session:
        auth.revoke_key(session, key_id, client)
    client.close()
    click.echo(f"revoked {key_id}")


@main.group()
def models() -> None:
    """Add, list and remove base models (workers and the API see changes at once)."""


@models.command("add")
@click.argument("source")
@click.option("--name", default=None, help="what jobs give as base_model (default: folder or file name, or hub id)")
@click.option("--config", default=None,
              help="a single-file checkpoint's config: a pipeline folder or cached hub id of its family")
def models_add(source: str, name: str | None, config: str | None) -> None:
    """Add a pipeline folder, a single-file .safetensors checkpoint or a cached hub id."""
    settings = Settings()
    with _session() as session:
        status = registry.add_model(session, settings, source, name, config, added_by="loraq-admin")
    single = f" (single file, config {status.config_dir})" if status.info.single_file else ""
    click.echo(f"added {status.entry.name}: {status.family} {status.info.kind}{single}")


@models.command("list")
def models_list() -> None:
    """Every base model: name, family, origin, source, and why one cannot train here."""
    settings = Settings()
    with _session() as session:
        entries = registry.all_models(settings, session)
    for entry in entries.values():
        status = registry.describe(settings, entry)
        click.echo(f"{entry.name}\t{status.family or '-'}\t{entry.origin}\t{entry.source}"
                   f"{chr(9) + status.problem if status.problem else ''}")


@models.command("remove")
@click.argument("name")
def models_remove(name: str) -> None:
    """Forget an added model (its files stay); refused while active jobs use it."""
    with _session() as session:
        registry.remove_model(session, Settings(), name)
    click.echo(f"removed {name}")


if __name__ == "__main__":
    main()
