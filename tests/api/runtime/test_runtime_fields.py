"""Every OpenAI and TGI request field either computes what the reference does or is refused with 400
naming it: penalties, logit_bias, logprobs with real values, stop strings, usage in streams, TGI's
sampling rule and details, the chat template's own BOS. Oracle: HF/PEFT on the same adapter."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch

from support.metrics import metric
from support.models import put_adapter, start_runtime

PROMPT = "hello world , how are"
NEW = 6


@pytest.fixture(scope="module")
def chat_llama(tiny_llama, tmp_path_factory):
    """The tiny Llama with a chat template that starts with ``{{ bos_token }}`` (as Llama-3's does)."""
    out = tmp_path_factory.mktemp("chat-llama") / "model"
    shutil.copytree(tiny_llama, out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
                            "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
    cfg_path.write_text(json.dumps(cfg))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return out


@pytest.fixture(scope="module")
def server(chat_llama, gen_adapters):
    srv = start_runtime(chat_llama, device_slots=4, max_batch_size=8, max_batch_delay_ms=2)
    with httpx.Client(base_url=srv.admin_url) as admin:
        for name in ("gen0", "gen1", "gen2"):
            assert put_adapter(admin, name, "1", gen_adapters[name]).status_code == 200
        assert admin.put("/admin/sync", json={"routesGeneration": 1, "preloadPending": 0}).json()["ready"]
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def peft(chat_llama, gen_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chat_llama))
    models = {}

    def model(name):
        if name not in models:
            base = AutoModelForCausalLM.from_pretrained(str(chat_llama))
            models[name] = PeftModel.from_pretrained(base, str(gen_adapters[name])).eval()
        return models[name]

    return tok, model


@pytest.fixture()
def c(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@torch.inference_mode()
def _manual_greedy(model, ids: list[int], n: int, adjust) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by hand over the model's logits, ``adjust(logits, generated)`` applied each step."""
    out, raws = [], []
    for _ in range(n):
        logits = model(torch.tensor([ids + out])).logits[0, -1].float()
        raws.append(logits)
        out.append(int(adjust(logits.clone(), out).argmax()))
    return out, raws


def test_repetition_penalty_matches_hf_generate_in_both_apis(c, peft):
    tok, model = peft
    ids = tok(PROMPT)["input_ids"]
    want = model("gen0").generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=NEW, do_sample=False, repetition_penalty=1.8, pad_token_id=0)
    want_text = tok.decode(want[0, len(ids):], skip_special_tokens=True)
    r = c.post("/v1/completions", json={"model": "gen0", "prompt": PROMPT, "max_tokens": NEW, "temperature": 0,
                                        "repetition_penalty": 1.8})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want_text
    r = c.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "gen0", "max_new_tokens": NEW,
                                                                    "repetition_penalty": 1.8}})
    assert r.json()["generated_text"] == want_text


def test_presence_and_frequency_penalties_count_output_tokens_as_openai_defines(c, peft):
    tok, model = peft
    ids = tok(PROMPT)["input_ids"]

    def penalize(logits, out):
        if out:
            counts = torch.bincount(torch.tensor(out), minlength=logits.shape[-1]).float()
            logits -= 1.5 * counts + 0.7 * (counts > 0).float()
        return logits

    want, _ = _manual_greedy(model("gen1"), ids, NEW, penalize)
    plain, _ = _manual_greedy(model("gen1"), ids, NEW, lambda x, _: x)
    r = c.post("/v1/completions", json={"model": "gen1", "prompt": PROMPT, "max_tokens": NEW, "temperature": 0,
                                        "frequency_penalty": 1.5, "presence_penalty": 0.7})
    assert r.json()["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
    assert want != plain, "the penalties must change this answer for the test to mean anything"


def test_completion_logprobs_are_the_models_own(c, peft):
    tok, model = peft
    ids = tok(PROMPT)["input_ids"]
    out, raws = _manual_greedy(model("gen2"), ids, NEW, lambda x, _: x)
    r = c.post("/v1/completions", json={"model": "gen2", "prompt": PROMPT, "max_tokens": NEW, "temperature": 0,
                                        "logprobs": 3}).json()
    lp = r["choices"][0]["logprobs"]
    assert lp["tokens"] == [tok.decode([t]) for t in out]
    for j, raw in enumerate(raws):
        ref = torch.log_softmax(raw, -1)
        assert lp["token_logprobs"][j] == pytest.approx(float(ref[out[j]]), abs=1e-4)
        assert len(lp["top_logprobs"][j]) <= 3
        best = max(lp["top_logprobs"][j].values())
        assert best == pytest.approx(float(ref.max()), abs=1e-4)
    assert lp["text_offset"][0] == 0


def test_chat_logprobs_streamed_usage_and_one_bos(c, peft):
    tok, model = peft
    msgs = [{"role": "user", "content": "where is my parcel"}]
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids.count(tok.bos_token_id) == 1
    want = model("gen0").generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    r = c.post("/v1/chat/completions", json={"model": "gen0", "messages": msgs, "max_tokens": NEW,
                                             "temperature": 0, "logprobs": True, "top_logprobs": 2}).json()
    assert r["usage"]["prompt_tokens"] == len(ids)  # the template's BOS, no second one
    assert r["choices"][0]["message"]["content"] == tok.decode(want, skip_special_tokens=True)
    content = r["choices"][0]["logprobs"]["content"]
    assert [x["token"] for x in content] == [tok.decode([t]) for t in want]
    assert all(len(x["top_logprobs"]) == 2 and x["logprob"] <= 0 for x in content)
    with c.stream("POST", "/v1/chat/completions", json={"model": "gen0", "messages": msgs, "max_tokens": NEW,
                                                        "temperature": 0, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as s:
        chunks = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == NEW
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks[:-1]) == \
        tok.decode(want, skip_special_tokens=True)


def test_logit_bias_and_min_tokens(c, peft):
    tok, _ = peft
    target = tok("fox")["input_ids"][-1]
    r = c.post("/v1/completions", json={"model": "gen1", "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                                        "logit_bias": {str(target): 100}}).json()
    assert r["choices"][0]["text"] == tok.decode([target] * 4)
    eos = tok.eos_token_id
    r = c.post("/v1/completions", json={"model": "gen1", "prompt": PROMPT, "max_tokens": 10, "temperature": 0,
                                        "logit_bias": {str(eos): 100}, "min_tokens": 3}).json()
    assert r["usage"]["completion_tokens"] == 4 and r["choices"][0]["finish_reason"] == "stop"
    r = c.post("/v1/completions", json={"model": "gen1", "prompt": PROMPT, "max_tokens": 2,
                                        "logit_bias": {"999999": 1}})
    assert r.status_code == 400 and "999999" in r.json()["error"]["message"]


def test_stop_strings_openai_cuts_tgi_keeps(c, peft):
    tok, model = peft
    ids = tok(PROMPT)["input_ids"]
    out, _ = _manual_greedy(model("gen2"), ids, NEW, lambda x, _: x)
    full = tok.decode(out, skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop and full.find(stop) >= 0
    r = c.post("/v1/completions", json={"model": "gen2", "prompt": PROMPT, "max_tokens": NEW, "temperature": 0,
                                        "stop": [stop]}).json()
    assert r["choices"][0]["text"] == full[:full.find(stop)] and r["choices"][0]["finish_reason"] == "stop"
    r = c.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "gen2", "max_new_tokens": NEW,
                                                                    "stop": [stop], "details": True}}).json()
    text = r["generated_text"]
    assert text.endswith(stop) and full.startswith(text)  # TGI stops at a token whose text ends the stop
    assert r["details"]["finish_reason"] == "stop_sequence"


def test_tgi_details_logprobs_prefill_top_tokens_and_its_sampling_rule(c, peft):
    tok, model = peft
    ids = tok(PROMPT)["input_ids"]
    out, raws = _manual_greedy(model("gen0"), ids, NEW, lambda x, _: x)
    r = c.post("/generate", json={"inputs": PROMPT, "parameters": {
        "adapter_id": "gen0", "max_new_tokens": NEW, "details": True, "decoder_input_details": True,
        "top_n_tokens": 2}}).json()
    d = r["details"]
    assert [t["id"] for t in d["tokens"]] == out and d["seed"] is None  # greedy: no seed
    for j, raw in enumerate(raws):
        assert d["tokens"][j]["logprob"] == pytest.approx(float(torch.log_softmax(raw, -1)[out[j]]), abs=1e-4)
        assert len(d["top_tokens"][j]) == 2
    with torch.inference_mode():
        plog = torch.log_softmax(model("gen0")(torch.tensor([ids])).logits[0].float(), -1)
    assert [p["id"] for p in d["prefill"]] == ids and d["prefill"][0]["logprob"] is None
    for k in range(1, len(ids)):
        assert d["prefill"][k]["logprob"] == pytest.approx(float(plog[k - 1, ids[k]]), abs=1e-4)
    # TGI samples whenever a warper is set, even with do_sample false; the seed it used is reported.
    r = c.post("/generate", json={"inputs": PROMPT, "parameters": {
        "adapter_id": "gen0", "max_new_tokens": NEW, "do_sample": False, "temperature": 0.7, "details": True}}).json()
    seed = r["details"]["seed"]
    assert isinstance(seed, int)
    again = c.post("/generate", json={"inputs": PROMPT, "parameters": {
        "adapter_id": "gen0", "max_new_tokens": NEW, "temperature": 0.7, "seed": seed}}).json()
    assert again["generated_text"] == r["generated_text"]
    # top_k=1 sampling is greedy whatever the seed
    r = c.post("/generate", json={"inputs": PROMPT, "parameters": {
        "adapter_id": "gen0", "max_new_tokens": NEW, "do_sample": True, "top_k": 1, "seed": 5}}).json()
    assert r["generated_text"] == tok.decode(out, skip_special_tokens=True)
    r = c.post("/generate_stream", json={"inputs": PROMPT, "parameters": {"adapter_id": "gen0",
                                                                           "decoder_input_details": True}})
    assert r.status_code == 400


def test_seeded_openai_sampling_repeats(c):
    body = {"model": "gen1", "prompt": PROMPT, "max_tokens": NEW, "temperature": 1.3, "top_p": 0.9, "top_k": 20,
            "seed": 1234}
    a = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
    b = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert a == b


@pytest.mark.parametrize("path,body,field", [
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, "response_format"),
    # Structured output is the vllm engine's: the torch engine refuses it, naming the field.
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "a", "schema": {"type": "object"}}}},
     "`response_format` is not supported: type 'json_schema'"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_object"}},
     "`response_format` is not supported: type 'json_object'"),
    # Malformed ones are refused by both engines, naming what is wrong.
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema"}}, "`response_format.json_schema` must be given"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
     "`response_format.json_schema.schema` must be a JSON schema object"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "xml"}}, "`response_format.type` must be"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "structural_tag", "format": {}}},
     "type 'structural_tag' is not exposed"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "image_url"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": {}}}},
     "`parameters.grammar` is not supported"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a+"}}},
     "`parameters.grammar` is not supported"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "xml", "value": "<a/>"}}},
     "`parameters.grammar.type` must be json, json_object or regex"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": 5}}},
     "`parameters.grammar.value` must be a regular expression"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": "{not json"}}},
     "`parameters.grammar.value` is a string that is not JSON"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": [1]}}},
     "`parameters.grammar.value` must be a JSON schema"),
    ("/generate", {"inputs": "x", "parameters": {"watermark": True}}, "watermark"),
    ("/generate", {"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}}, "best_of"),
    ("/generate", {"inputs": "x", "parameters": {"top_p": 1.0}}, "top_p"),
    ("/generate", {"inputs": "x", "parameters": {"nonsense": 1}}, "nonsense"),
])
def test_fields_it_cannot_honour_are_refused_naming_them(c, path, body, field):
    if path.startswith("/v1"):
        body = {"model": "gen0", **body}
    else:
        body["parameters"] = {"adapter_id": "gen0", **body["parameters"]}
    r = c.post(path, json=body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]


def test_response_format_text_is_plain_generation(c):
    plain = {"model": "gen0", "prompt": PROMPT, "max_tokens": NEW, "temperature": 0}
    want = c.post("/v1/completions", json=plain).json()["choices"][0]["text"]
    r = c.post("/v1/completions", json={**plain, "response_format": {"type": "text"}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    chat = {"model": "gen0", "messages": [{"role": "user", "content": "x"}], "max_tokens": NEW, "temperature": 0}
    want = c.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    r = c.post("/v1/chat/completions", json={**chat, "response_format": {"type": "text"}})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want


def _batches(url: str) -> tuple[float, float, float]:
    """(forwards, rows, forwards of at most one row) the generation batch-size histogram has counted."""
    task = "text-generation"
    return (metric(url, "lorafleet_runtime_batch_size_count", task=task),
            metric(url, "lorafleet_runtime_batch_size_sum", task=task),
            metric(url, "lorafleet_runtime_batch_size_bucket", task=task, le="1.0"))


def test_the_batch_size_metric_counts_each_row_of_a_step_once(server, c):
    """One request alone: each of its steps ran one row, its first (prefill) step and its last (after
    which the row retires) too."""
    before = _batches(server.metrics_url)
    r = c.post("/v1/completions", json={"model": "gen0", "prompt": PROMPT, "max_tokens": NEW, "temperature": 0,
                                        "ignore_eos": True})
    assert r.status_code == 200, r.text
    after = _batches(server.metrics_url)
    steps, rows, one_row = (a - b for a, b in zip(after, before))
    assert steps == NEW and rows == NEW and one_row == NEW, (steps, rows, one_row)
