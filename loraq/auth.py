"""API keys: created, checked, listed and revoked; the first admin key is made on first start.

A key is `lq_` plus 43 random URL-safe characters (256 bits). Only its SHA-256 is stored: with
that much entropy a slow password hash adds nothing, and a fast one lets every request be
checked by an indexed lookup.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from loraq.errors import Invalid, NotFound
from loraq.models import ApiKey, utcnow
from loraq.settings import Settings

KEY_PREFIX = "lq_"
ADMIN_OWNER = "admin"
BOOTSTRAP_KEY_ID = "bootstrap-admin"  # a fixed id: two API processes starting at once make one key
ADMIN_KEY_FILE = "admin-key"
OWNER_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
LAST_USED_RESOLUTION = timedelta(minutes=1)  # don't write a row on every request


@dataclass(frozen=True)
class Principal:
    """Who is asking: the owner their key belongs to, and whether it is an admin key."""

    owner: str
    admin: bool
    key_id: str


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_owner(owner: str) -> str:
    if not OWNER_PATTERN.fullmatch(owner):
        raise Invalid(f"owner: {owner!r} is not a valid owner name (lowercase letters, digits, '_', '.', '-'; "
                      "up to 64 characters, starting with a letter or digit)")
    return owner


def create_key(session: Session, owner: str, name: str | None = None, admin: bool = False,
               key_id: str | None = None) -> tuple[ApiKey, str]:
    """A new key for `owner` (committed); returns the row and the secret, which is shown only now."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(owner=check_owner(owner), name=name, admin=admin, prefix=secret[:10], key_hash=hash_key(secret))
    if key_id is not None:
        row.id = key_id
    session.add(row)
    session.commit()
    return row, secret


def authenticate(session: Session, secret: str) -> Principal | None:
    """The principal of a live key, or None for an unknown or revoked one."""
    if not secret.startswith(KEY_PREFIX) or len(secret) > 200:
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret)))
    if row is None or row.revoked_at is not None:
        return None
    now = utcnow()
    last = row.last_used_at
    if last is not None and last.tzinfo is None:
        last = last.replace(tzinfo=now.tzinfo)
    if last is None or now - last > LAST_USED_RESOLUTION:
        session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
        session.commit()
    return Principal(owner=row.owner, admin=row.admin, key_id=row.id)


def list_keys(session: Session, owner: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if owner is not None:
        query = query.where(ApiKey.owner == owner)
    return list(session.scalars(query))


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Revoke a key (idempotent); its next request gets 401."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"API key {key_id} not found")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def admin_key_path(settings: Settings) -> Path:
    return settings.data_dir / ADMIN_KEY_FILE


def ensure_admin_key(settings: Settings, factory: sessionmaker[Session]) -> str | None:
    """On a database with no keys at all, create the first admin key, write it to
    `<data_dir>/admin-key` (mode 0600) and return it; otherwise None."""
    with factory() as session:
        if session.scalar(select(ApiKey.id).limit(1)) is not None:
            return None
        try:
            _, secret = create_key(session, ADMIN_OWNER, name="first admin key", admin=True,
                                   key_id=BOOTSTRAP_KEY_ID)
        except IntegrityError:  # another process made it first
            session.rollback()
            return None
    write_secret(admin_key_path(settings), secret)
    return secret


def write_secret(path: Path, secret: str) -> None:
    """Write `secret` to `path` readable by its owner only, replacing any earlier file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    os.chmod(temp, 0o600)  # O_CREAT's mode is masked by the umask; the file must be 0600 exactly
    os.replace(temp, path)
