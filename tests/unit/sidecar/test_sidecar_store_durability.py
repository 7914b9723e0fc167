"""The cache's durability: an installed entry is servable at once and on disk with its marker soon
after; after a crash, an entry without its marker is verified again (kept if whole, removed if torn)."""

from __future__ import annotations

import os

from lorafleet.contracts.cache import CacheLayout
from lorafleet.contracts.digest import directory_digest
from lorafleet.sidecar.metrics import Metrics
from lorafleet.sidecar.storage import Storages
from lorafleet.sidecar.store import ContentStore
from lorafleet.contracts.adapter_rules import Limits

from support.peft_dirs import write_adapter


def _store(root) -> ContentStore:
    store = ContentStore(CacheLayout(root), Storages(), Limits(), Metrics())
    store.scan()
    return store


def test_installed_entry_gets_its_durable_marker(tmp_path):
    src = write_adapter(tmp_path / "src" / "a", seed=1)
    digest = directory_digest(src)
    store = _store(tmp_path / "cache")
    path = store.install_adapter(digest, src.as_uri(), None)
    assert directory_digest(path) == digest  # servable as soon as install returns
    assert store.wait_durable(30)
    assert store.layout.durable_marker(digest).exists()
    assert store.metrics.registry.get_sample_value("lorafleet_sidecar_durable_seconds_count") == 1


def test_restart_verifies_unmarked_entries_and_drops_torn_ones(tmp_path):
    cache = tmp_path / "cache"
    store = _store(cache)
    digests = []
    for i, name in enumerate(["whole", "torn", "marked"]):
        src = write_adapter(tmp_path / "src" / name, seed=i)
        digests.append(directory_digest(src))
        store.install_adapter(digests[-1], src.as_uri(), None)
    assert store.wait_durable(30)
    whole, torn, marked = digests
    layout = store.layout
    # What a power loss before the background fsync can leave: no markers, one file cut short.
    layout.durable_marker(whole).unlink()
    layout.durable_marker(torn).unlink()
    weights = layout.adapter_dir(torn) / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    # A marked entry is trusted without reading it again (this corruption is not looked for).
    (layout.adapter_dir(marked) / "adapter_config.json").write_text("{}")

    restarted = _store(cache)
    assert set(restarted.entries()) == {whole, marked}
    assert not layout.adapter_dir(torn).exists()
    assert layout.durable_marker(whole).exists()  # verified again, then made durable
    assert not layout.durable_marker(torn).exists()
    assert list(layout.tmp.iterdir()) == []


def test_removed_entry_loses_its_marker_first(tmp_path):
    src = write_adapter(tmp_path / "src" / "a", seed=3)
    digest = directory_digest(src)
    store = _store(tmp_path / "cache")
    store.install_adapter(digest, src.as_uri(), None)
    assert store.wait_durable(30)
    store.remove(digest)
    assert not store.layout.durable_marker(digest).exists()
    assert not store.layout.adapter_dir(digest).exists()
    # A stale marker with no entry (a crash between the two steps) is cleaned up by the next scan.
    store.layout.durable_marker(digest).touch()
    _store(tmp_path / "cache")
    assert not store.layout.durable_marker(digest).exists()
