"""API keys: created, checked, listed and revoked; the first admin key is made on first start.

A key is `lq_` plus 43 random URL-safe characters (256 bits). Only its SHA-256 is stored: with
that much entropy a slow password hash adds nothing, and a fast one lets every request be
checked by an indexed lookup.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from redis.exceptions import RedisError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from loraq.errors import Invalid, NotFound
from loraq.models import ApiKey, utcnow
from loraq.settings import Settings

log = logging.getLogger("loraq.auth")

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
    """The principal of a live key, or None for an unknown or revoked one.

    One indexed read of the columns it needs (no ORM object); `last_used_at` is written at most
    once per LAST_USED_RESOLUTION, so a busy key does not turn every request into a write."""
    if not secret.startswith(KEY_PREFIX) or len(secret) > 200:
        return None
    row = session.execute(select(ApiKey.id, ApiKey.owner, ApiKey.admin, ApiKey.revoked_at, ApiKey.last_used_at)
                          .where(ApiKey.key_hash == hash_key(secret))).first()
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


def authenticate_with(factory: sessionmaker[Session], secret: str) -> Principal | None:
    """`authenticate` in a session of its own, closed (its connection back in the pool) on return."""
    with factory() as session:
        return authenticate(session, secret)


def list_keys(session: Session, owner: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if owner is not None:
        query = query.where(ApiKey.owner == owner)
    return list(session.scalars(query))


def revoke_key(session: Session, key_id: str, redis=None) -> ApiKey:
    """Revoke a key (idempotent); its next request gets 401. With `redis`, API processes are told
    to drop the principals they remember (see PrincipalCache)."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"API key {key_id} not found")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    if redis is not None:
        announce_revocation(redis)  # after the commit: see PrincipalCache for why the order matters
    return row


# --------------------------------------------------------------------------------------------
# Remembering principals between requests

REVOCATION_TOKEN_KEY = "loraq:auth:revocation"  # replaced by every revocation
PRINCIPAL_TTL_S = 30.0  # the longest a principal is trusted without reading its key again
PRINCIPAL_CACHE_SIZE = 10_000


def announce_revocation(redis) -> bool:
    """Replace the revocation token, so every API process reads keys again; False when Redis
    could not be told (the processes then notice within PRINCIPAL_TTL_S)."""
    try:
        redis.set(REVOCATION_TOKEN_KEY, uuid.uuid4().hex)
        return True
    except (RedisError, OSError) as error:
        log.warning("auth.revocation_not_announced: %s", error)
        return False


class PrincipalCache:
    """The principals of keys an API process has recently checked, so most requests skip the
    database (the lookup, a worker thread and a pooled connection cost several times what
    FastAPI itself does per request).

    An entry holds only while Redis's revocation token is the one read *before* the key was
    looked up, and for at most PRINCIPAL_TTL_S. A revocation commits first and then replaces
    the token, so a lookup either sees the revoked row, or was made before the commit and is
    dropped with the old token: a revoked key's next request is refused by every process.
    Without an answer from Redis nothing is remembered and every request reads its key. Only
    valid keys are stored (by hash), so unknown keys cannot fill it."""

    def __init__(self, ttl_s: float = PRINCIPAL_TTL_S, size: int = PRINCIPAL_CACHE_SIZE):
        self.ttl_s, self.size = ttl_s, size
        self._entries: dict[str, tuple[Principal, bytes, float]] = {}

    def get(self, secret: str, token: bytes | None) -> Principal | None:
        if token is None:
            return None
        entry = self._entries.get(hash_key(secret))
        if entry is None or entry[1] != token or time.monotonic() > entry[2]:
            return None
        return entry[0]

    def put(self, secret: str, token: bytes | None, principal: Principal) -> None:
        if token is None:
            return
        if len(self._entries) >= self.size:
            self._entries.clear()
        self._entries[hash_key(secret)] = (principal, token, time.monotonic() + self.ttl_s)


class RevocationWatch:
    """Reads the revocation token for the requests of one event loop, one Redis read serving all
    that arrive together (a read per request cost as much as FastAPI's whole request).

    A request is answered by a read that *began after it arrived*, never by one already in
    flight, which could predate a revocation the request was sent after: requests arriving
    during a read wait for the next one, which then serves them all."""

    def __init__(self, redis):
        self.redis = redis
        self._next: asyncio.Future | None = None  # the read the requests now arriving wait for
        self._reading = False

    async def token(self) -> bytes | None:
        """The current token (b"" before the first revocation); None when Redis does not answer,
        and then nothing may be taken from a PrincipalCache."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            if not self._reading:
                self._reading = True
                asyncio.get_running_loop().create_task(self._read())
        return await asyncio.shield(self._next)

    async def _read(self) -> None:
        try:
            while self._next is not None:
                waiting, self._next = self._next, None
                try:
                    token = await self.redis.get(REVOCATION_TOKEN_KEY) or b""
                except (RedisError, OSError):
                    token = None
                except BaseException:
                    waiting.set_result(None)
                    raise
                waiting.set_result(token)
        finally:
            self._reading = False


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
