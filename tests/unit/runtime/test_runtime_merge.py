"""Merging an adapter into the base at load (merged pools): the weights equal PEFT's
``merge_and_unload`` bit for bit, in float32 and bfloat16, for plain, rank/alpha-patterned and rsLoRA
adapters; adapters that cannot be merged exactly are refused before anything changes."""

from __future__ import annotations

import pytest
import torch

from lorafleet.runtime.merge import MergeRefused, merge_adapter
from support.models import make_generation_adapter


def _peft_merged(base_dir, adapter_dir, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()


def _ours(base_dir, adapter_dir, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype).eval()
    changed = merge_adapter(model, adapter_dir)
    return model, changed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["plain", "patterned", "rslora"])
def test_merged_weights_equal_peft_merge_and_unload(tiny_llama, tmp_path, dtype, kind):
    kw = {"plain": {}, "patterned": {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
          "rslora": {"use_rslora": True}}[kind]
    adapter = make_generation_adapter(tiny_llama, tmp_path / kind, seed=7, r=4, alpha=8,
                                      targets=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"), **kw)
    want = _peft_merged(tiny_llama, adapter, dtype).state_dict()
    got, changed = _ours(tiny_llama, adapter, dtype)
    assert len(changed) == 2 * 5  # two layers, five targets
    got = got.state_dict()
    assert set(got) == set(want)
    differs = [k for k in want if not torch.equal(got[k], want[k])]
    assert differs == []
    # ...and the merge did something (a no-op merge would pass the equality above for a zero LoRA).
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=dtype).state_dict()
    assert not torch.equal(plain[f"model.layers.0.self_attn.q_proj.weight"], got["model.layers.0.self_attn.q_proj.weight"])


def test_an_adapter_with_trained_heads_is_refused_before_any_weight_changes(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    peft.save_pretrained(str(tmp_path / "heads"))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((MergeRefused, ValueError)) as e:
        merge_adapter(model, tmp_path / "heads")
    assert "lm_head" in str(e.value) or "modules_to_save" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
