"""A merged pool's runtime over real HTTP: the adapter merged into the base at load answers under its
served name (and name@version) with PEFT's ``merge_and_unload`` model's greedy tokens, on the base
path (no adapter slot); the plain base model and every other adapter are not served there."""

from __future__ import annotations

import httpx
import pytest
import torch

from support.models import PeftOracle, make_generation_adapter, put_adapter, start_runtime

PROMPTS = ["hello world , how are", "please refund me , the invoice"]
NEW = 8


@pytest.fixture(scope="module")
def hot_adapter(tiny_llama, tmp_path_factory):
    return make_generation_adapter(tiny_llama, tmp_path_factory.mktemp("hot") / "hot", seed=11, r=4, alpha=16,
                                   targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"))


@pytest.fixture(scope="module")
def merged_server(tiny_llama, hot_adapter):
    srv = start_runtime(tiny_llama, served_model_name="hot-pool", merged_adapter_dir=str(hot_adapter),
                        merged_adapter_name="acme-chat", merged_adapter_version="3", merged_adapter_tenant="acme")
    with httpx.Client(base_url=srv.admin_url) as admin:
        assert admin.put("/admin/sync", json={"routesGeneration": 1, "preloadPending": 0}).json()["ready"]
    yield srv
    srv.stop()


@torch.inference_mode()
def _peft_merged_greedy(tiny_llama, adapter, prompt):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(adapter))
    model = model.merge_and_unload().eval()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def test_merged_adapter_answers_as_peft_merged_model(merged_server, tiny_llama, hot_adapter):
    want = {p: _peft_merged_greedy(tiny_llama, hot_adapter, p) for p in PROMPTS}
    base = PeftOracle(tiny_llama, "text-generation")
    assert any(want[p] != base.tok.decode(base.greedy(None, p, NEW), skip_special_tokens=True) for p in PROMPTS), \
        "the adapter must change the answers, or this test shows nothing"
    with httpx.Client(base_url=merged_server.url) as c:
        for model in ("acme-chat", "acme-chat@3"):
            for p in PROMPTS:
                r = c.post("/v1/completions", json={"model": model, "prompt": p, "max_tokens": NEW, "temperature": 0})
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == want[p]
                assert r.json()["model"] == "acme-chat@3"
        tgi = c.post("/generate", json={"inputs": PROMPTS[0], "parameters": {"adapter_id": "acme-chat",
                                                                             "max_new_tokens": NEW}})
        assert tgi.status_code == 200 and tgi.json()["generated_text"] == want[PROMPTS[0]]
        models = c.get("/v1/models").json()["data"]
    assert [(m["id"], m["merged"], m["versions"][0]["version"]) for m in models] == [("acme-chat", True, "3")]
    # The merged weights run on the base path: no adapter was registered or put into a slot.
    assert merged_server.rt.manager.all() == []
    tenants = {s.labels["tenant"] for s in merged_server.rt.metrics.requests.collect()[0].samples}
    assert "acme" in tenants


def test_the_plain_base_other_versions_and_other_adapters_are_refused(merged_server, gen_adapters):
    with httpx.Client(base_url=merged_server.url) as c:
        for model, words in (("hot-pool", "only acme-chat@3"), ("acme-chat@2", "version '2' is not here"),
                             ("gen0", "only acme-chat@3")):
            r = c.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", model
            assert words in r.json()["error"]["message"], r.json()
    # Unmerged LoRA over merged weights computes merged + LoRA, not what that adapter was trained
    # over: a merged pool refuses to load another adapter.
    with httpx.Client(base_url=merged_server.admin_url) as admin:
        r = put_adapter(admin, "gen0", "1", gen_adapters["gen0"])
        assert r.status_code == 409 and r.json()["error"]["code"] == "merged_pool"


def test_a_merged_adapter_that_cannot_be_merged_leaves_the_model_refused(tiny_llama, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": '
                                             '["q_proj"], "use_dora": true}')
    from lorafleet.runtime.lifecycle import Runtime
    from lorafleet.runtime.settings import RuntimeSettings

    rt = Runtime(RuntimeSettings.from_env({}, model_dir=str(tiny_llama), merged_adapter_dir=str(bad),
                                          merged_adapter_name="x", merged_adapter_version="1"))
    rt.load_in_background().join(120)
    assert rt.model_state == "refused", (rt.model_state, rt.model_error)
    assert str(bad) in rt.model_error
