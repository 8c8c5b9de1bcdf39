"""/v1/webhook-secret: the key that signs the caller's webhooks (read, or rotate)."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import OwnedJob, PrincipalDep, SessionDep
from api.schemas import ERRORS, WebhookDeliveryOut, WebhookSecretOut
from loraq import webhooks
from loraq.models import WebhookSecret

router = APIRouter(tags=["webhooks"])


def _out(session, owner: str) -> WebhookSecretOut:
    return WebhookSecretOut.model_validate(session.get(WebhookSecret, owner), from_attributes=True)


@router.get("/webhook-secret")
def get_secret(session: SessionDep, principal: PrincipalDep) -> WebhookSecretOut:
    """The owner's webhook signing secret (made on first use): verify `webhook-signature` with it."""
    webhooks.owner_secret(session, principal.owner)
    return _out(session, principal.owner)


@router.post("/webhook-secret")
def rotate_secret(session: SessionDep, principal: PrincipalDep) -> WebhookSecretOut:
    """A new secret for the owner; every delivery from now on, retries included, is signed with it."""
    webhooks.rotate_secret(session, principal.owner)
    return _out(session, principal.owner)


@router.get("/jobs/{job_id}/webhook-deliveries", responses=ERRORS)
def list_deliveries(job: OwnedJob, session: SessionDep) -> list[WebhookDeliveryOut]:
    """Each state change's delivery to the job's webhook_url, with every attempt (empty without one)."""
    return [WebhookDeliveryOut.model_validate(d, from_attributes=True) for d in webhooks.deliveries(session, job.id)]
