"""An S3 object whose body is longer than its listing said (overwritten between the listing and the
GET, or a server that lies) is refused at the listed size: nothing past it reaches the disk, and the
refusal is permanent (a refusal, not a crash or a retry)."""

from __future__ import annotations

import io

import pytest

from lorafleet.contracts.adapter_rules import Refused
from lorafleet.sidecar.storage import ObjectEntry, S3Storage


def test_a_body_longer_than_listed_is_refused_at_the_listed_size(minio_server, s3, bucket, tmp_path):
    body = b"x" * (3 << 20)
    s3.put_object(bucket, "acme/a/1/adapter_model.safetensors", io.BytesIO(body), len(body))
    storage = S3Storage(minio_server.endpoint, minio_server.access_key, minio_server.secret_key)
    uri = f"s3://{bucket}/acme/a/1/"
    listed = storage.listing(uri)
    assert listed == [ObjectEntry("adapter_model.safetensors", len(body))]
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(Refused, match=f"longer than the {1 << 20} bytes its listing says") as e:
        storage.fetch(uri, dest, entries=[ObjectEntry("adapter_model.safetensors", 1 << 20)])
    assert e.value.permanent
    assert (dest / "adapter_model.safetensors").stat().st_size <= 1 << 20
