"""Webhooks: each state change of a job with a `webhook_url` is POSTed there, signed, retried.

The delivery is an outbox row (`WebhookDelivery`) written by `loraq.jobs.transition` (and by the
submit) in the state change's own transaction, so it exists exactly when the change committed
and nothing is sent for a change that rolled back. A dispatcher thread in every worker process
(`start_dispatcher`, like the lease reaper) sends the due rows after the commit: it claims a row
with a conditional UPDATE (several dispatchers never send the same attempt twice), POSTs, and
records the attempt. A failure (no answer, a non-2xx status) is retried after
`webhook_retry_base_s * 2**(attempt-1)` seconds, up to `webhook_max_attempts`. Nothing here runs
in a transition's path beyond one INSERT: a slow or dead receiver never blocks or fails a job.

Signature (the Standard Webhooks scheme, https://www.standardwebhooks.com/): headers
`webhook-id` (the delivery's id, the same on every retry: receivers dedupe on it),
`webhook-timestamp` (Unix seconds of this attempt) and `webhook-signature`: `v1,` followed by the
base64 of HMAC-SHA256, keyed with the base64-decoded part of the owner's secret after `whsec_`,
over `{webhook-id}.{webhook-timestamp}.{body}` (the raw body bytes).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from loraq.errors import Invalid
from loraq.models import Job, JobEvent, WebhookDelivery, WebhookSecret, utcnow
from loraq.settings import Settings

log = logging.getLogger("loraq.webhooks")

SECRET_PREFIX = "whsec_"
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
CLAIM_S = 120  # a claimed attempt's row is not due again before this (the sender died mid-send)
USER_AGENT = "loraq-webhooks/1"


# --------------------------------------------------------------------------------------------
# The URL a job gives


def _blocked(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (ip.is_loopback or ip.is_link_local or ip.is_private or ip.is_reserved or ip.is_multicast
            or ip.is_unspecified)


def url_problem(url: str, allow_private: bool) -> str | None:
    """Why `url` may not receive webhooks (None: it may): http(s) only, a host that resolves,
    and, unless `allow_private`, none of its addresses loopback, link-local or private."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as error:
        return f"not a valid URL ({error})"
    if parts.scheme not in ("http", "https"):
        return f"must be an http or https URL (got {parts.scheme or 'no'} scheme)"
    if not parts.hostname:
        return "has no host"
    if parts.username or parts.password:
        return "must not carry credentials"
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError, ValueError) as error:
        return f"its host {parts.hostname!r} does not resolve ({error})"
    if not allow_private:
        blocked = sorted(a for a in addresses if _blocked(a))
        if blocked:
            return (f"its host {parts.hostname!r} resolves to a loopback, link-local or private address "
                    f"({', '.join(blocked)}); this server refuses those unless LORAQ_WEBHOOK_ALLOW_PRIVATE is set")
    return None


def check_url(settings: Settings, url: str | None) -> str | None:
    """The submitted webhook_url, or a 422 naming it."""
    if url is None:
        return None
    problem = url_problem(url, settings.webhook_allow_private)
    if problem:
        raise Invalid(f"webhook_url: {problem}")
    return url


# --------------------------------------------------------------------------------------------
# Secrets


def owner_secret(session: Session, owner: str) -> str:
    """The owner's signing secret, made (and committed) on first use."""
    row = session.get(WebhookSecret, owner)
    if row is not None:
        return row.secret
    session.add(WebhookSecret(owner=owner, secret=_new_secret()))
    try:
        session.commit()
    except IntegrityError:  # made concurrently: use that one
        session.rollback()
    return session.get(WebhookSecret, owner).secret


def rotate_secret(session: Session, owner: str) -> str:
    """A new secret for the owner; deliveries from now on are signed with it."""
    row = session.get(WebhookSecret, owner)
    if row is None:
        owner_secret(session, owner)
        row = session.get(WebhookSecret, owner)
    row.secret, row.created_at = _new_secret(), utcnow()
    session.commit()
    return row.secret


def _new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, delivery_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header's value for this body (see the module's docstring)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


# --------------------------------------------------------------------------------------------
# Recording (inside the state change's transaction)


def record(session: Session, job_id: str, url: str | None, event: JobEvent) -> None:
    """Add the delivery of this state event when the job has a webhook URL (no commit here)."""
    if url:
        session.add(WebhookDelivery(id=_new_id(), job_id=job_id, event_seq=event.seq, state=event.data["state"],
                                    url=url, status=PENDING, attempts=0, next_attempt_at=utcnow(), history=[]))


def _new_id() -> str:
    return "msg_" + secrets.token_hex(14)


def deliveries(session: Session, job_id: str) -> list[WebhookDelivery]:
    return list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                                .order_by(WebhookDelivery.event_seq)))


def outcome_counts(session: Session) -> dict[str, int]:
    """Delivery attempts by outcome (`success`, `failure`: every attempt the history holds)."""
    counts = {"success": 0, "failure": 0}
    for (history,) in session.execute(select(WebhookDelivery.history)):
        for attempt in history or []:
            counts["success" if attempt.get("ok") else "failure"] += 1
    return counts


# --------------------------------------------------------------------------------------------
# Sending


def payload(job: Job, delivery: WebhookDelivery, event: JobEvent | None) -> dict:
    """What a delivery POSTs: the state change it announces and the job as it is now."""
    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "type": "job.state_changed", "delivery_id": delivery.id, "state": delivery.state,
        "event_seq": delivery.event_seq, "event": event.data if event is not None else {"state": delivery.state},
        "job": {"id": job.id, "name": job.name, "owner": job.owner, "state": job.state, "step": job.step,
                "total_steps": job.total_steps, "last_loss": job.last_loss, "dataset_id": job.dataset_id,
                "base_model": job.base_model, "attempt": job.attempt, "error": job.error, "worker": job.worker,
                "queued_at": iso(job.queued_at), "started_at": iso(job.started_at),
                "finished_at": iso(job.finished_at), "config": job.config},
    }


def _claim(session: Session, delivery_id: str, now: datetime) -> bool:
    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == PENDING,
               WebhookDelivery.next_attempt_at <= now)
        .values(attempts=WebhookDelivery.attempts + 1, next_attempt_at=now + timedelta(seconds=CLAIM_S)))
    session.commit()
    return result.rowcount == 1


def deliver_due(sessions: sessionmaker[Session], settings: Settings, client, limit: int = 20) -> int:
    """Send every due delivery (at most `limit`); returns how many were attempted."""
    now = utcnow()
    with sessions() as session:
        due = session.scalars(select(WebhookDelivery.id).where(
            WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at).limit(limit)).all()
    sent = 0
    for delivery_id in due:
        with sessions() as session:
            if not _claim(session, delivery_id, utcnow()):
                continue  # another dispatcher has it
            try:
                _attempt(session, settings, client, delivery_id)
            except Exception:  # noqa: BLE001 - one bad row must not stop the others
                log.exception("webhook.attempt_failed delivery=%s", delivery_id)
            sent += 1
    return sent


def _attempt(session: Session, settings: Settings, client, delivery_id: str) -> None:
    delivery = session.get(WebhookDelivery, delivery_id)
    job = session.get(Job, delivery.job_id)
    if job is None:  # deleted meanwhile
        delivery.status, delivery.next_attempt_at = FAILED, None
        session.commit()
        return
    event = session.scalar(select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.seq == delivery.event_seq))
    body = json.dumps(payload(job, delivery, event), separators=(",", ":")).encode()
    secret = owner_secret(session, job.owner)
    delivery = session.get(WebhookDelivery, delivery_id)  # owner_secret may have committed
    status_code, error = None, None
    problem = url_problem(delivery.url, settings.webhook_allow_private)  # DNS may have changed since submit
    if problem:
        error = f"refused: webhook_url {problem}"
    else:
        timestamp = int(time.time())
        headers = {"content-type": "application/json", "user-agent": USER_AGENT, "webhook-id": delivery.id,
                   "webhook-timestamp": str(timestamp),
                   "webhook-signature": sign(secret, delivery.id, timestamp, body)}
        try:
            response = client.post(delivery.url, content=body, headers=headers, timeout=settings.webhook_timeout_s)
            status_code = response.status_code
            if not 200 <= status_code < 300:
                error = f"answered {status_code}"
        except Exception as exc:  # noqa: BLE001 - any transport failure is a failed attempt
            error = f"{type(exc).__name__}: {exc}"[:500]
    now = utcnow()
    ok = error is None
    delivery.history = [*delivery.history, {"attempt": delivery.attempts, "at": now.isoformat(),
                                            "status_code": status_code, "ok": ok, "error": error}]
    delivery.last_status_code, delivery.last_error = status_code, error
    if ok:
        delivery.status, delivery.delivered_at, delivery.next_attempt_at = DELIVERED, now, None
    elif problem or delivery.attempts >= settings.webhook_max_attempts:
        delivery.status, delivery.next_attempt_at = FAILED, None
    else:
        delay = settings.webhook_retry_base_s * 2 ** (delivery.attempts - 1)
        delivery.next_attempt_at = now + timedelta(seconds=delay)
    session.commit()
    log.info("webhook.attempt delivery=%s job=%s state=%s attempt=%s status=%s outcome=%s", delivery.id,
             delivery.job_id, delivery.state, delivery.attempts, status_code, delivery.status if not ok else "ok")


def dispatch_forever(settings: Settings, stop: threading.Event, interval_s: float = 0.5) -> None:
    """Send due deliveries every `interval_s` until `stop` is set."""
    import httpx

    from loraq.db import make_engine, make_session_factory

    engine = make_engine(settings)
    sessions = make_session_factory(engine)
    # No redirects: a public URL answering 30x must not lead the server to a private address.
    client = httpx.Client(follow_redirects=False)
    try:
        while not stop.wait(interval_s):
            try:
                deliver_due(sessions, settings, client)
            except Exception as error:  # noqa: BLE001 - database briefly away: next round
                log.warning("webhooks.round_failed: %s", error)
    finally:
        client.close()
        engine.dispose()


def start_dispatcher(settings: Settings, interval_s: float = 0.5) -> threading.Event:
    """Deliver webhooks from a daemon thread; set the returned event to stop."""
    stop = threading.Event()
    threading.Thread(target=dispatch_forever, args=(settings, stop, interval_s), name="loraq-webhooks",
                     daemon=True).start()
    return stop

