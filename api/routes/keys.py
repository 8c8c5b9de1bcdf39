"""/v1/whoami for any key; /v1/keys (create, list, revoke) for admin keys only."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import AdminDep, PrincipalDep, RedisDep, SessionDep
from api.schemas import ERRORS, ApiKeyCreate, ApiKeyCreated, ApiKeyOut, WhoAmI
from loraq import auth

router = APIRouter(tags=["keys"])


@router.get("/whoami")
async def whoami(principal: PrincipalDep) -> WhoAmI:
    """The owner the request's key acts for, and whether it is an admin key."""
    # async: nothing here blocks, so no worker thread (it is the authentication-only benchmark)
    return WhoAmI(owner=principal.owner, admin=principal.admin, key_id=principal.key_id)


@router.post("/keys", status_code=201, responses=ERRORS)
def create_key(body: ApiKeyCreate, session: SessionDep, _: AdminDep) -> ApiKeyCreated:
    """A new key for an owner; the response is the only time its secret is shown."""
    row, secret = auth.create_key(session, body.owner, body.name, body.admin)
    return ApiKeyCreated(**ApiKeyOut.model_validate(row, from_attributes=True).model_dump(), key=secret)


@router.get("/keys")
def list_keys(session: SessionDep, _: AdminDep, owner: str | None = None) -> list[ApiKeyOut]:
    """Every key (or one owner's), revoked ones included, without secrets."""
    return [ApiKeyOut.model_validate(row, from_attributes=True) for row in auth.list_keys(session, owner)]


@router.delete("/keys/{key_id}", responses=ERRORS)
def revoke_key(key_id: str, session: SessionDep, redis: RedisDep, _: AdminDep) -> ApiKeyOut:
    """Revoke a key: its next request gets 401. Revoking twice is not an error."""
    return ApiKeyOut.model_validate(auth.revoke_key(session, key_id, redis), from_attributes=True)
