"""loraq/object_store.py against moto's standalone S3 server (tests/support/s3.py)."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from loraq.object_store import ObjectStore, job_key, parse_url
from support.s3 import keys, s3_bucket, s3_endpoint  # noqa: F401 - fixtures


def test_parse_url():
    assert parse_url(None) is None and parse_url("") is None and parse_url("/srv/data") is None
    assert parse_url("file:///srv/data") is None
    assert parse_url("s3://bucket") == ("bucket", "")
    assert parse_url("s3://bucket/some/prefix/") == ("bucket", "some/prefix/")
    with pytest.raises(ValueError, match="neither s3://"):
        parse_url("gs://bucket/x")
    with pytest.raises(ValueError, match="not a valid bucket name"):
        parse_url("s3://Bad_Bucket/x")


def test_job_key():
    assert job_key("j1", "/srv/w/jobs/j1/attempt-2/checkpoint-5/a.safetensors") == \
        "jobs/j1/attempt-2/checkpoint-5/a.safetensors"
    assert job_key("j1", "/srv/w/jobs/j2/attempt-1/a") is None
    assert job_key("j1", "/srv/w/jobs/j1/../../etc/passwd") is None


def test_multipart_put_get_presign_delete(s3_bucket, tmp_path):
    endpoint, bucket, client = s3_bucket
    store = ObjectStore(bucket, "pre/", endpoint_url=endpoint, multipart_bytes=5 * 1024**2, presign=True)
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (11 * 1024**2 // 256))  # 11 MiB: three parts of 5 MiB
    store.put_file(big, "jobs/j/attempt-1/big.bin")
    head = client.head_object(Bucket=bucket, Key="pre/jobs/j/attempt-1/big.bin")
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # a multipart upload's ETag

    back = tmp_path / "back" / "big.bin"
    store.get_file("jobs/j/attempt-1/big.bin", back)
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()
    assert b"".join(store.stream("jobs/j/attempt-1/big.bin")) == big.read_bytes()
    assert store.read_range("jobs/j/attempt-1/big.bin", 256, 4) == bytes(range(4))

    url = store.presigned_url("jobs/j/attempt-1/big.bin", "big.bin")
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.content == big.read_bytes()

    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "sub" / "b.txt").write_text("b")
    (tmp_path / "folder" / "a.txt").write_text("a")
    assert store.put_folder(tmp_path / "folder", "jobs/j/attempt-1/ckpt", last="a.txt") == 2
    assert store.list("jobs/j") == sorted(store.list("jobs/j")) and len(store.list("jobs/j")) == 3
    assert store.size("jobs/j/attempt-1/nothing") is None
    assert store.delete_prefix("jobs/j") == 3
    assert keys(client, bucket, "pre/") == []
    assert not store.exists_prefix("jobs/j")
