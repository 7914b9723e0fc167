"""Adapter tiers: PEFT files parsed with their ranks and scales, host LRU, device slots with reference
counts and pinning, version choice by weight, and loads that stay fast as the registry grows."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.contracts.runtime_api import AdapterLoadRequest
from lorafleet.runtime.multilora import SlotAllocator
from lorafleet.runtime.peft_format import AdapterFormatError, load_adapter_dir
from lorafleet.runtime.settings import RuntimeSettings
from lorafleet.runtime.tiers import AdapterManager, AdapterUnavailable, ModelNotFound


def _req(path, tenant="t", weight=100, sha="0" * 64, pinned=False):
    return AdapterLoadRequest(path=str(path), sha256=sha, tenant=tenant, weight=weight, pinned=pinned)


def test_peft_files_parse_with_rank_and_alpha_patterns_and_rslora(gen_adapters):
    # gen2: r=16, alpha=16, rank_pattern o_proj=4, use_rslora; gen3: r=2, alpha=32, alpha_pattern k_proj=4
    a = load_adapter_dir(gen_adapters["gen2"])
    raw = load_file(str(gen_adapters["gen2"] / "adapter_model.safetensors"))
    q = a.modules["model.layers.0.self_attn.q_proj"]
    o = a.modules["model.layers.1.self_attn.o_proj"]
    assert (q.rank, o.rank) == (16, 4)
    assert q.scale == pytest.approx(16 / math.sqrt(16)) and o.scale == pytest.approx(16 / math.sqrt(4))
    b = raw["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(q.b, b.t() * q.scale)
    k = load_adapter_dir(gen_adapters["gen3"]).modules["model.layers.0.self_attn.k_proj"]
    assert k.scale == pytest.approx(4 / 2)
    assert a.task == "text-generation" and a.max_rank == 16


def test_classifier_heads_and_label_names(cls_adapters):
    a = load_adapter_dir(cls_adapters["cls3"])
    assert set(a.heads) == {"classifier"} and a.heads["classifier"]["weight"].shape[0] == 5
    assert a.labels == [f"cls3-label{i}" for i in range(5)]
    assert a.task == "sequence-classification"


def test_bad_adapters_are_refused_with_the_reason(tmp_path, gen_adapters):
    with pytest.raises(AdapterFormatError, match="adapter_config.json is missing"):
        load_adapter_dir(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(AdapterFormatError, match="is not supported \\(only LORA\\)"):
        load_adapter_dir(tmp_path)
    cfg = json.loads((gen_adapters["gen0"] / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg | {"r": 4}))
    (tmp_path / "adapter_model.safetensors").write_bytes((gen_adapters["gen0"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterFormatError, match="rank 8 differs from the r=4"):
        load_adapter_dir(tmp_path)


def test_slots_in_use_are_never_evicted_and_pinned_ones_stay():
    s = SlotAllocator(2)
    assert s.acquire("a") == (1, True) and s.acquire("b") == (2, True)
    assert s.acquire("c") is None, "both slots referenced by in-flight work"
    s.release("a")
    assert s.acquire("c") == (1, True) and s.evictions == 1, "the unreferenced one makes room"
    assert s.slot_of("a") is None
    s.release("c")
    s.release("b")
    s.pin("b", True)
    assert s.acquire("d") == (1, True), "pinned b keeps its slot, c is evicted"
    s.release("d")
    assert s.acquire("b") == (2, False), "still resident, no rewrite"
    s.drop("b")
    assert s.slot_of("b") == 2, "dropped while referenced: kept until released"
    s.release("b")
    assert s.slot_of("b") is None and 2 in s.free


def test_versions_by_weight_pinned_versions_and_failed_loads(gen_adapters, tmp_path):
    m = AdapterManager("text-generation", 8)
    m.register("acme", "1", _req(gen_adapters["gen0"], weight=0))
    m.register("acme", "2", _req(gen_adapters["gen1"], weight=100, sha="1" * 64))
    assert {m.resolve("acme").version for _ in range(20)} == {"2"}
    assert m.resolve("acme@1").version == "1"
    with pytest.raises(ModelNotFound, match="holds versions: 1, 2"):
        m.resolve("acme@3")
    with pytest.raises(ModelNotFound):
        m.resolve("other")
    entry, changed = m.register("acme", "2", _req(gen_adapters["gen1"], weight=100, sha="1" * 64))
    assert not changed, "same version and digest: idempotent"
    bad, _ = m.register("broken", "1", _req(tmp_path))
    assert bad.error and m.state(bad) == "failed"
    with pytest.raises(AdapterUnavailable, match="broken@1 failed to load"):
        m.resolve("broken")
    assert bad.error_kind == "permanent", "the content is refused: loading it again cannot help"
    cls, _ = m.register("wrongtask", "1", _req(tmp_path / "nope"))
    assert "does not exist" in cls.error and cls.error_kind == "transient"
    assert m.listing("i").adapters[-1].error_kind == "transient"
    m.unregister("acme", "2")
    assert m.resolve("acme").version == "1", "the remaining version serves, even at weight 0"


def test_host_tier_is_lru_and_reloads_evicted_adapters(gen_adapters):
    m = AdapterManager("text-generation", 2)
    entries = [m.register(f"a{i}", "1", _req(gen_adapters[f"gen{i}"]))[0] for i in range(3)]
    assert [m.state(e) for e in entries] == ["registered", "host", "host"]
    assert m.host_evictions == 1
    host = m.host_adapter(entries[0])
    assert host.modules and m.state(entries[0]) == "host"


def test_host_load_time_stays_flat_as_the_registry_grows(gen_adapters):
    m = AdapterManager("text-generation", 2000)
    path = gen_adapters["gen1"]
    times = []
    for i in range(300):
        t0 = time.perf_counter()
        m.register(f"t{i}", "1", _req(path, tenant=f"t{i}"))
        times.append(time.perf_counter() - t0)
    first, last = sorted(times[:50])[25], sorted(times[-50:])[25]
    assert last < max(3 * first, 0.005), (first, last)
    assert last < 0.025


def test_settings_from_env_and_flags():
    env = {"LORAFLEET_MODEL_DIR": "/m", "LORAFLEET_MAX_BATCH_SIZE": "8", "LORAFLEET_DEVICE_SLOTS": "4",
           "LORAFLEET_MAX_BATCH_DELAY_MS": "2.5", "LORAFLEET_TASK": "text-generation"}
    s = RuntimeSettings.from_env(env, device_slots=16)
    assert (s.model_dir, s.max_batch_size, s.device_slots, s.max_batch_delay_ms) == ("/m", 8, 16, 2.5)
    with pytest.raises(ValueError, match="LORAFLEET_MAX_QUEUE='lots': expected an integer of at least 1"):
        RuntimeSettings.from_env({"LORAFLEET_MAX_QUEUE": "lots"})
    with pytest.raises(ValueError, match="LORAFLEET_TASK='chat': expected one of .*; LORAFLEET_DEVICE_SLOTS='0': expected an integer of at least 1"):
        RuntimeSettings.from_env({"LORAFLEET_TASK": "chat", "LORAFLEET_DEVICE_SLOTS": "0"})
    assert RuntimeSettings.from_env({}).max_queue_delay_ms == 2000.0  # the documented default
    assert RuntimeSettings.from_env({"LORAFLEET_MAX_QUEUE_DELAY_MS": "250"}).max_queue_delay_ms == 250.0
    assert RuntimeSettings.from_env({"LORAFLEET_MAX_QUEUE_DELAY_MS": "250"}, max_queue_delay_ms=0).max_queue_delay_ms == 0
    with pytest.raises(ValueError, match="LORAFLEET_MAX_QUEUE_DELAY_MS='-1': expected a number of at least 0"):
        RuntimeSettings.from_env({"LORAFLEET_MAX_QUEUE_DELAY_MS": "-1"})


def test_torch_threads_leave_the_event_loop_a_core_on_cpu(monkeypatch):
    from lorafleet.runtime.lifecycle import torch_threads

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert torch_threads(RuntimeSettings.from_env({})) == 7
    assert torch_threads(RuntimeSettings.from_env({"LORAFLEET_TORCH_THREADS": "3"})) == 3
    assert torch_threads(RuntimeSettings.from_env({}, device="cuda")) == 0  # torch's default there
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert torch_threads(RuntimeSettings.from_env({})) == 1
    with pytest.raises(ValueError, match="LORAFLEET_TORCH_THREADS='-2': expected an integer of at least 0"):
        RuntimeSettings.from_env({"LORAFLEET_TORCH_THREADS": "-2"})


def test_requests_are_counted_per_version_for_the_sidecars_rates(gen_adapters):
    m = AdapterManager("text-generation", 4)
    m.register("a", "1", _req(gen_adapters["gen0"], weight=100))
    m.register("a", "2", _req(gen_adapters["gen1"], weight=0))
    for _ in range(3):
        m.resolve("a")
    m.resolve("a@2")
    with pytest.raises(ModelNotFound):
        m.resolve("b")
    counts = {(s.name, s.version): s.requests for s in m.listing("i").adapters}
    assert counts == {("a", "1"): 3, ("a", "2"): 1}
    # Registered again (new content): its count starts over, which the sidecar reads as a reset.
    m.register("a", "1", _req(gen_adapters["gen1"], sha="1" * 64))
    assert {(s.name, s.version): s.requests for s in m.listing("i").adapters}[("a", "1")] == 0


def test_a_new_digest_for_a_registered_version_unloads_the_old_one(gen_adapters):
    """The engine hears of the replaced registration as of an unregistered one (it frees the old key's slot,
    and vLLM its LoRA id); requests already resolve to the new one when it hears."""
    events = []

    def heard(kind, e):
        events.append((kind, e.key, m.resolve("acme@1").key))

    m = AdapterManager("text-generation", 8, on_event=heard)
    old, _ = m.register("acme", "1", _req(gen_adapters["gen0"]))
    new, changed = m.register("acme", "1", _req(gen_adapters["gen1"], sha="1" * 64))
    assert changed and new.key != old.key
    assert events == [("loaded", old.key, old.key), ("unloaded", old.key, new.key), ("loaded", new.key, new.key)]
