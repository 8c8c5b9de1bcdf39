"""API processes remember recently checked keys (loraq.auth.PrincipalCache); a revocation still
refuses the key's next request in every process, not only the one that revoked it."""

from __future__ import annotations

import asyncio

from loraq.auth import REVOCATION_TOKEN_KEY, PrincipalCache, RevocationWatch, announce_revocation


def _as(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_a_key_revoked_through_one_process_is_refused_by_another_that_remembered_it(make_client):
    first, second = make_client(), make_client()  # two apps: two processes' caches on one database
    key = first.post("/v1/keys", json={"owner": "alice"}).json()
    assert first.get("/v1/whoami", headers=_as(key["key"])).json()["owner"] == "alice"
    assert second.get("/v1/whoami", headers=_as(key["key"])).json()["owner"] == "alice"  # now remembered

    assert first.delete(f"/v1/keys/{key['id']}").status_code == 200

    for client in (second, first):
        response = client.get("/v1/whoami", headers=_as(key["key"]))
        assert response.status_code == 401 and "revoked" in response.json()["error"]["message"]


def test_a_remembered_key_is_not_read_again_until_a_revocation(client, session):
    from loraq.models import ApiKey

    key = client.post("/v1/keys", json={"owner": "bob"}).json()
    assert client.get("/v1/whoami", headers=_as(key["key"])).status_code == 200
    # Changed behind the API's back (no announcement): the remembered principal still answers ...
    session.query(ApiKey).filter(ApiKey.id == key["id"]).update({"owner": "mallory"})
    session.commit()
    assert client.get("/v1/whoami", headers=_as(key["key"])).json()["owner"] == "bob"
    # ... until any revocation is announced, after which every key is read again.
    announce_revocation(client.app.state.redis)
    assert client.get("/v1/whoami", headers=_as(key["key"])).json()["owner"] == "mallory"


def test_nothing_is_remembered_without_a_token_and_entries_expire():
    from loraq.auth import Principal

    principal = Principal(owner="a", admin=False, key_id="k")
    cache = PrincipalCache(ttl_s=60)
    cache.put("lq_secret", None, principal)  # Redis did not answer: not stored
    assert cache.get("lq_secret", b"") is None
    cache.put("lq_secret", b"t1", principal)
    assert cache.get("lq_secret", b"t1") == principal
    assert cache.get("lq_secret", b"t2") is None and cache.get("lq_secret", None) is None
    expired = PrincipalCache(ttl_s=-1)
    expired.put("lq_secret", b"t1", principal)
    assert expired.get("lq_secret", b"t1") is None


def test_requests_arriving_together_share_one_redis_read_begun_after_they_arrived():
    """Concurrent requests share a read; a request never takes the answer of a read that was
    already in flight when it arrived (that read may predate a revocation)."""

    class CountingRedis:
        def __init__(self):
            self.reads, self.value = 0, b"before"

        async def get(self, key):
            assert key == REVOCATION_TOKEN_KEY
            self.reads += 1
            value = self.value
            await asyncio.sleep(0.05)
            return value

    async def scenario():
        fake = CountingRedis()
        watch = RevocationWatch(fake)
        first = [asyncio.create_task(watch.token()) for _ in range(20)]
        await asyncio.sleep(0.01)  # the first read is in flight, holding "before"
        fake.value = b"after"  # a revocation lands now
        late = asyncio.create_task(watch.token())
        tokens = await asyncio.gather(*first)
        return fake.reads, tokens, await late

    reads, tokens, late = asyncio.run(scenario())
    assert tokens == [b"before"] * 20 and late == b"after" and reads == 2


def test_without_redis_every_request_reads_its_key(make_client, settings):
    client = make_client(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
    key = client.post("/v1/keys", json={"owner": "carol"}).json()
    assert client.get("/v1/whoami", headers=_as(key["key"])).status_code == 200
    assert client.delete(f"/v1/keys/{key['id']}").status_code == 200  # announcing fails: only logged
    assert client.get("/v1/whoami", headers=_as(key["key"])).status_code == 401
