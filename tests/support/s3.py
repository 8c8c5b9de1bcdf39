"""A real S3-protocol server for tests: moto's standalone server (`python -m moto.server`) in a
subprocess, never an in-process patch, so the API and workers talk to it over HTTP like to S3."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import httpx
import pytest

from support.service import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> str:
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url, timeout=2)
            break
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"moto server did not start:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=15)


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A fresh bucket on the server, with boto3's credentials in the environment; returns
    (endpoint, bucket, boto3 client)."""
    import boto3

    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"loraq-test-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    return s3_endpoint, bucket, client


def keys(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))
