"""The test MinIO is a real S3 server: objects round-trip through the minio client."""

from __future__ import annotations

import io
import os

import pytest


def test_put_get_round_trip(s3, bucket):
    data = os.urandom(3 * 1024 * 1024 + 17)
    s3.put_object(bucket, "acme/support/3/adapter_model.safetensors", io.BytesIO(data), len(data))
    got = s3.get_object(bucket, "acme/support/3/adapter_model.safetensors")
    try:
        assert got.read() == data
    finally:
        got.close()
        got.release_conn()
    names = [o.object_name for o in s3.list_objects(bucket, prefix="acme/", recursive=True)]
    assert names == ["acme/support/3/adapter_model.safetensors"]


def test_wrong_credentials_are_refused(minio_server, bucket):
    from minio import Minio
    from minio.error import S3Error

    bad = Minio(f"127.0.0.1:{minio_server.port}", access_key=minio_server.access_key, secret_key="wrong-secret",
                secure=False)
    with pytest.raises(S3Error) as e:
        bad.list_objects(bucket).__next__()
    assert e.value.code in ("SignatureDoesNotMatch", "InvalidAccessKeyId")
