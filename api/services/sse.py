"""Server-Sent Events of one job: the stored events after a sequence number, then live ones.

The database is the record: every event sent is read from it, in sequence order, so a resume
with Last-Event-ID has no gap and no repeat, and a Redis restart loses nothing. The job's Redis
stream is only the wake-up: a blocking XREAD (about a second) from the last entry seen, after
which, woken or not, the database is read again. The wait is async (redis.asyncio), so an open
stream holds no thread; only the short database reads run in worker threads, which the sync
routes share.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loraq.events import events_after, stream_key
from loraq.models import FINAL_STATES, Job

KEEPALIVE_S = 15.0
BLOCK_MS = 1000
BATCH = 500
FINAL = {state.value for state in FINAL_STATES}


@dataclass
class _Read:
    events: list[tuple[int, str, dict]] = field(default_factory=list)
    state: str | None = None  # None: the job is gone
    event_seq: int = 0


def format_event(seq: int, type_: str, data: dict) -> str:
    return f"id: {seq}\nevent: {type_}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _read(factory: sessionmaker[Session], job_id: str, after: int) -> _Read:
    with factory() as session:
        row = session.execute(select(Job.state, Job.event_seq).where(Job.id == job_id)).first()
        if row is None:
            return _Read()
        found = events_after(session, job_id, after, limit=BATCH)
        return _Read([(event.seq, event.type, event.data) for event in found], row.state, row.event_seq)


async def _stream_tail(redis: AsyncRedis, job_id: str) -> bytes | None:
    """The id of the stream's newest entry ("0-0" when empty); None when Redis does not answer."""
    try:
        newest = await redis.xrevrange(stream_key(job_id), count=1)
    except (RedisError, OSError):
        return None
    return newest[0][0] if newest else b"0-0"


async def _wait(redis: AsyncRedis, job_id: str, entry_id: bytes | None) -> bytes | None:
    """Wait until the job's stream has an entry after `entry_id` or about a second passed."""
    if entry_id is None:
        entry_id = await _stream_tail(redis, job_id)
        if entry_id is None:
            await anyio.sleep(BLOCK_MS / 1000)
            return None
    try:
        found = await redis.xread({stream_key(job_id): entry_id}, count=100, block=BLOCK_MS)
    except (RedisError, OSError):
        await anyio.sleep(BLOCK_MS / 1000)
        return None
    for _key, entries in found or ():
        if entries:
            entry_id = entries[-1][0]
    return entry_id


async def job_event_stream(factory: sessionmaker[Session], redis: AsyncRedis, job_id: str,
                           after: int) -> AsyncIterator[str]:
    """SSE text for the job's events after `after`, following live ones.

    Ends once the job is in a final state and every event it has was sent (or the job is gone).
    """
    last = after
    entry_id = await _stream_tail(redis, job_id)  # before reading: no lost wake-up
    quiet_since = time.monotonic()
    while True:
        read = await anyio.to_thread.run_sync(_read, factory, job_id, last)
        for seq, type_, data in read.events:
            yield format_event(seq, type_, data)
            last = seq
        if read.events:
            quiet_since = time.monotonic()
        if read.state is None or (read.state in FINAL and last >= read.event_seq):
            return
        if len(read.events) == BATCH:
            continue
        if time.monotonic() - quiet_since >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
        entry_id = await _wait(redis, job_id, entry_id)
