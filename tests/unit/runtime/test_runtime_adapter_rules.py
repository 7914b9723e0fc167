"""The runtime applies the same adapter rules as the sidecar (contracts/adapter_rules.py): its view of
the loaded model agrees with the sidecar's view of the checkpoint, what one refuses the other refuses
with the same reason, content refusals are permanent, and no file makes a registration raise."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorafleet.contracts.adapter_rules import BaseModelInfo, Limits, adapter_problems
from lorafleet.contracts.runtime_api import AdapterLoadRequest
from lorafleet.runtime.multilora import LoRAModelPatch
from lorafleet.runtime.tiers import AdapterManager


@pytest.fixture(scope="module")
def patch(tiny_llama):
    return LoRAModelPatch(AutoModelForCausalLM.from_pretrained(tiny_llama), slots=4, max_rank=16)


def _copy(src, dst, **config):
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps(cfg | config))
    return dst


def test_the_checkpoint_view_and_the_loaded_model_view_agree(tiny_llama, gen_adapters, patch):
    sidecar = BaseModelInfo.from_dir(tiny_llama)
    runtime = patch.base_info()
    linear = {m: w for m, w in runtime.weights.items() if runtime.kinds[m] == "Linear"}
    assert linear and all(sidecar.weights[m] == w for m, w in linear.items() if m in sidecar.weights)
    assert {m for m in linear if "layers" in m} <= set(sidecar.weights)
    limits = Limits(max_rank=16)
    for name, d in gen_adapters.items():
        assert adapter_problems(d, limits, sidecar) == adapter_problems(d, limits, runtime) == [], name


def test_the_runtime_refuses_what_the_sidecar_refuses_permanently(tmp_path, tiny_llama, gen_adapters, patch):
    m = AdapterManager("text-generation", 8, check=patch.check)
    sidecar = BaseModelInfo.from_dir(tiny_llama)
    cases = {"dora": {"use_dora": True}, "fifo": {"fan_in_fan_out": True}, "regex": {"target_modules": "(q|k)*"},
             "nested": {"target_modules": "(q_proj|v_proj)+"}, "rank": {"r": 4, "rank_pattern": {}}}
    for name, config in cases.items():
        d = _copy(gen_adapters["gen0"], tmp_path / name, **config)
        entry, _ = m.register(name, "1", AdapterLoadRequest(path=str(d), sha256="0" * 64, tenant="t"))
        sidecar_says = [p.message for p in adapter_problems(d, Limits(max_rank=16), sidecar)]
        assert entry.error_kind == "permanent" and sidecar_says, name
        assert all(reason in entry.error for reason in sidecar_says), (name, entry.error)


def test_hostile_files_never_make_a_registration_raise(tmp_path, gen_adapters, patch):
    m = AdapterManager("text-generation", 8, check=patch.check)
    bomb = _copy(gen_adapters["gen0"], tmp_path / "bomb")
    (bomb / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000)
    huge = _copy(gen_adapters["gen0"], tmp_path / "huge")
    (huge / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 150_000_000) + b"{" + b" " * 1000)
    cut = _copy(gen_adapters["gen0"], tmp_path / "cut")
    w = cut / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    for d, reason in ((bomb, "nested too deeply"), (huge, "above the limit"), (cut, "truncated")):
        entry, _ = m.register(d.name, "1", AdapterLoadRequest(path=str(d), sha256="0" * 64, tenant="t"))
        assert reason in entry.error and entry.error_kind == "permanent", entry.error
    good, _ = m.register("good", "1", AdapterLoadRequest(path=str(gen_adapters["gen1"]), sha256="1" * 64, tenant="t"))
    assert good.error is None and m.host_adapter(good).modules
    assert isinstance(next(iter(m.host_adapter(good).modules.values())).a, torch.Tensor)
