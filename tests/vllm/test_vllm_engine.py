"""The vLLM engine behind the runtime's real HTTP server: greedy answers equal PEFT's for adapters of
mixed ranks decoding in one batch (more adapters than device slots) through the unmodified openai and
huggingface_hub clients; an unknown or unloaded adapter is a 404, never the base model; a re-registered
version gets a new LoRA id; what vLLM cannot compute exactly is a 400; settings it cannot take are refused."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lorafleet.localstack.procs import wait_for
from lorafleet.runtime.generation import FALLBACK_CHAT_PROMPT, FALLBACK_CHAT_TEMPLATE
from support.models import PeftOracle, make_generation_suite, put_adapter, start_runtime

PROMPTS = ["hello world , how are", "please refund me , the invoice"]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
CHAT_PROMPT = "".join(FALLBACK_CHAT_TEMPLATE.format(**m) for m in MESSAGES) + FALLBACK_CHAT_PROMPT
NEW = 8
N_ADAPTERS = 5  # ranks 8, 4, 16 (rank_pattern, rsLoRA), 2 (alpha_pattern), 8/16 (rank_pattern)


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory):
    return make_generation_suite(model, tmp_path_factory.mktemp("vllm-adapters"), N_ADAPTERS)


@pytest.fixture(scope="module")
def expected(model, adapters):
    """PEFT's greedy text and token count for every (adapter or None, prompt)."""
    oracle = PeftOracle(model, "text-generation")
    out = {}
    for name, path in [(None, None), *adapters.items()]:
        for p in (*PROMPTS, CHAT_PROMPT):
            ids = oracle.greedy(path, p, NEW)
            out[name, p] = oracle.tok.decode(ids, skip_special_tokens=True)
    return out


@pytest.fixture(scope="module")
def server(model, adapters):
    # Two device slots for five adapters: vLLM swaps adapters in and out of its slots between steps.
    srv = start_runtime(model, engine="vllm", vllm_gpu_memory_utilization=0.3,  # a shared card
                        device_slots=2, host_adapters=8, max_rank=16, max_batch_size=8,
                        max_queue_delay_ms=0)
    with httpx.Client(base_url=srv.admin_url) as admin:
        for name, path in adapters.items():
            assert put_adapter(admin, name, "1", path).status_code == 200
        assert admin.put("/admin/sync", json={"routesGeneration": 1, "preloadPending": 0}).json()["ready"]
    yield srv
    srv.stop()


def _client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_mixed_batch_of_adapters_answers_as_peft(server, adapters, expected):
    """Every adapter and the base model at once (one batch), completions, chat and streaming alike."""
    client = _client(server)
    names = [None, *adapters]

    def completion(job):
        name, prompt = job
        r = client.completions.create(model=name or server.rt.base_name, prompt=prompt, max_tokens=NEW,
                                      temperature=0)
        return r.choices[0].text, r.usage.completion_tokens, r.model

    def chat(name):
        r = client.chat.completions.create(model=name or server.rt.base_name, messages=MESSAGES, max_tokens=NEW,
                                           temperature=0)
        return r.choices[0].message.content

    def streamed(name):
        chunks = client.completions.create(model=name or server.rt.base_name, prompt=PROMPTS[0], max_tokens=NEW,
                                           temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks)

    def streamed_chat(name):
        chunks = client.chat.completions.create(model=name or server.rt.base_name, messages=MESSAGES,
                                                max_tokens=NEW, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks)

    jobs = [(n, p) for n in names for p in PROMPTS]
    with ThreadPoolExecutor(len(jobs) + 3 * len(names)) as pool:
        completions = pool.map(completion, jobs)
        chats, streams, chat_streams = pool.map(chat, names), pool.map(streamed, names), pool.map(streamed_chat, names)
        completions, chats, streams, chat_streams = list(completions), list(chats), list(streams), list(chat_streams)
    for (name, prompt), (text, n_tokens, served) in zip(jobs, completions):
        assert text == expected[name, prompt], (name, prompt)
        assert served == (f"{name}@1" if name else server.rt.base_name)
        assert n_tokens <= NEW
    for name, text, stream, chat_stream in zip(names, chats, streams, chat_streams):
        assert text == expected[name, CHAT_PROMPT], name
        assert chat_stream == text
        assert stream == expected[name, PROMPTS[0]], name
    # The adapters differ from each other and from the base model: a wrong adapter could not pass.
    assert len({expected[n, PROMPTS[1]] for n in names}) == len(names)


def test_40_concurrent_clients_while_an_adapter_is_unloaded_and_loaded_again(server, adapters, expected):
    """Every answer is its own adapter's (PEFT's text) or, for the adapter being churned while it is out,
    a 404: never another tenant's answer, never the base model's for an adapter."""
    import random
    import threading

    import openai

    client = _client(server)
    churned = "gen4"
    stop = threading.Event()
    cycles = [0]

    def churn():
        with httpx.Client(base_url=server.admin_url, timeout=60) as admin:
            while not stop.is_set():
                assert admin.delete(f"/admin/adapters/{churned}/1").status_code == 200
                assert put_adapter(admin, churned, "1", adapters[churned]).status_code == 200
                cycles[0] += 1

    rng = random.Random(5)
    jobs = [(rng.choice([None, *adapters]), rng.choice(PROMPTS)) for _ in range(40)]

    def ask(job):
        name, prompt = job
        try:
            r = client.completions.create(model=name or server.rt.base_name, prompt=prompt, max_tokens=NEW,
                                          temperature=0)
            return r.choices[0].text
        except openai.NotFoundError:
            return 404

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    try:
        with ThreadPoolExecutor(40) as pool:
            answers = list(pool.map(ask, jobs))
    finally:
        stop.set()
        t.join(timeout=120)
    assert cycles[0] >= 1
    for (name, prompt), answer in zip(jobs, answers):
        if answer == 404:
            assert name == churned, (name, prompt)
        else:
            assert answer == expected[name, prompt], (name, prompt)
    assert sum(a != 404 for a in answers) >= 30


def test_huggingface_inference_client_with_adapter_id(server, expected, monkeypatch):
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # it would block requests to our loopback server
    client = InferenceClient(model=server.url)
    assert client.text_generation(PROMPTS[0], adapter_id="gen1", max_new_tokens=NEW) == expected["gen1", PROMPTS[0]]
    streamed = "".join(client.text_generation(PROMPTS[1], adapter_id="gen2", max_new_tokens=NEW, stream=True))
    assert streamed == expected["gen2", PROMPTS[1]]


def test_logprobs_are_the_models_raw_logprobs(server, model, adapters):
    """OpenAI logprobs from the vLLM engine: the log-softmax of PEFT's own logits for each chosen token."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    r = _client(server).completions.create(model="gen2", prompt=PROMPTS[1], max_tokens=3, temperature=0,
                                           logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 3 and all(len(t) >= 1 for t in lp.top_logprobs)
    oracle = PeftOracle(model, "text-generation")
    ids = oracle.tok(PROMPTS[1])["input_ids"] + oracle.greedy(adapters["gen2"], PROMPTS[1], 3)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model)), str(adapters["gen2"])).eval()
    with torch.no_grad():
        logits = pm(torch.tensor([ids])).logits[0].float()
    n = len(ids) - 3
    want = [float(torch.log_softmax(logits[n - 1 + j], -1)[ids[n + j]]) for j in range(3)]
    assert lp.token_logprobs == pytest.approx(want, abs=1e-4)


def test_a_stop_token_ends_the_answer_as_in_the_torch_engine(server, model, adapters):
    """``stop_token_ids``: the answer ends with that token (its text kept, as the torch engine sends it),
    finish_reason stop, and it counts as a completion token."""
    oracle = PeftOracle(model, "text-generation")
    ids = oracle.greedy(adapters["gen1"], PROMPTS[0], NEW)
    at = next(j for j in range(2, NEW) if ids[j] not in ids[:j])  # its first occurrence
    r = _client(server).completions.create(model="gen1", prompt=PROMPTS[0], max_tokens=NEW, temperature=0,
                                           extra_body={"stop_token_ids": [ids[at]]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == at + 1
    assert r.choices[0].text == oracle.tok.decode(ids[: at + 1], skip_special_tokens=True)


def test_no_first_token_within_the_queue_delay_bound_is_429(server):
    import openai

    settings = server.rt.engine.settings
    settings.max_queue_delay_ms = 1  # no first token comes within a millisecond
    try:
        with pytest.raises(openai.RateLimitError) as e:
            _client(server).completions.create(model="gen0", prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
        assert e.value.code == "queue_timeout"
    finally:
        settings.max_queue_delay_ms = 0
    r = _client(server).completions.create(model="gen0", prompt=PROMPTS[0], max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_unknown_adapter_is_404_never_the_base(server):
    import openai

    client = _client(server)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nobody", prompt=PROMPTS[0], max_tokens=2, temperature=0)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gen0@7", messages=MESSAGES, max_tokens=2, temperature=0)


def test_what_vllm_cannot_compute_exactly_is_400(server):
    r = httpx.post(server.url + "/generate", timeout=60,
                   json={"inputs": PROMPTS[0], "parameters": {"adapter_id": "gen0", "max_new_tokens": 2,
                                                              "typical_p": 0.5, "do_sample": True}})
    assert r.status_code == 400 and "typical_p" in r.json()["error"]["message"], r.text


def test_unloaded_adapter_is_404_and_leaves_vllm_and_a_new_registration_gets_a_new_id(server, adapters, expected):
    import openai

    client = _client(server)
    engine, manager = server.rt.engine, server.rt.manager
    old_key = manager.resolve("gen3@1").key
    wait_for(lambda: old_key in engine.loras(), timeout=60, what="gen3 in vLLM")
    with httpx.Client(base_url=server.admin_url, timeout=60) as admin:
        assert admin.delete("/admin/adapters/gen3/1").status_code == 200
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gen3", prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
        wait_for(lambda: old_key not in engine.loras(), timeout=60, what="gen3 removed from vLLM")
        # Registered again: a new LoRA id (vLLM's slots and prefix cache are keyed by it), same answers.
        assert put_adapter(admin, "gen3", "1", adapters["gen3"]).status_code == 200
    new_key = manager.resolve("gen3@1").key
    assert new_key != old_key
    r = client.completions.create(model="gen3", prompt=PROMPTS[1], max_tokens=NEW, temperature=0)
    assert r.choices[0].text == expected["gen3", PROMPTS[1]]


def test_settings_vllm_cannot_take_are_refused_at_startup(model, adapters):
    from lorafleet.runtime.lifecycle import Runtime
    from lorafleet.runtime.settings import RuntimeSettings

    rt = Runtime(RuntimeSettings.from_env({}, model_dir=str(model), engine="vllm", max_rank=1024,
                                          max_model_len=100_000, merged_adapter_dir=str(adapters["gen0"]),
                                          merged_adapter_name="gen0", merged_adapter_version="1"))
    rt.load_in_background().join(timeout=120)
    status = rt.model_status()
    assert status.state == "refused", status
    assert "cache.maxRank 1024 is above the largest LoRA rank vLLM serves (512)" in status.message
    assert "maxModelLen 100000 is above the model's max_position_embeddings 256" in status.message
    assert "a merged pool (spec.model.mergedAdapter)" in status.message


def test_sampling_parameters_map_to_vllms_or_are_refused_by_name():
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind

    from lorafleet.runtime.engine_api import SamplingParams, StructuredOutput
    from lorafleet.runtime.vllm_engine import vllm_sampling

    def vp(**kw):
        return vllm_sampling(SamplingParams(max_new_tokens=5, **kw), VSamplingParams, RequestOutputKind.DELTA)

    greedy = vp(temperature=0.7, sample=False, top_p=0.5, stop_ids={7, 3}, logprobs=2)  # TGI: no do_sample
    assert greedy.temperature == 0 and greedy.top_p == 1.0 and greedy.stop_token_ids == [3, 7]
    assert greedy.logprobs == 2 and greedy.max_tokens == 5 and not greedy.detokenize
    sampled = vp(temperature=0.7, sample=True, top_p=0.5, top_k=4, min_p=0.1, seed=11, repetition_penalty=1.2,
                 presence_penalty=0.5, frequency_penalty=0.25, logit_bias={5: -2.0}, min_tokens=2)
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.min_p, sampled.seed) == (0.7, 0.5, 4, 0.1, 11)
    assert (sampled.repetition_penalty, sampled.presence_penalty, sampled.frequency_penalty) == (1.2, 0.5, 0.25)
    assert sampled.logit_bias == {5: -2.0} and sampled.min_tokens == 2
    assert vp(logprobs=1, logprob_mode="processed").logprobs == 1  # greedy, no penalty: raw == processed
    assert vp().structured_outputs is None
    assert vp(structured=StructuredOutput("json_object")).structured_outputs.json_object is True
    assert vp(structured=StructuredOutput("json_schema", SCHEMA)).structured_outputs.json == SCHEMA
    for kw, named in (({"typical_p": 0.5}, "typical_p"),
                      ({"frequency_penalty": 0.5, "penalty_style": "tgi"}, "TGI's `frequency_penalty`"),
                      ({"logprobs": 1, "logprob_mode": "processed", "sample": True, "temperature": 0.5},
                       "TGI's logprobs after sampling")):
        with pytest.raises(ValueError, match=named):
            vp(**kw)


SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                           "sure": {"type": "boolean"}},
          "required": ["answer", "sure"], "additionalProperties": False}


def constrained_greedy(model, adapter, prompt_ids: list[int], schema: dict | None, max_new: int,
                       regex: str | None = None) -> list[int]:
    """vLLM's structured-output semantics written out: at each step PEFT's logits with every token the
    grammar (xgrammar's JSON-schema grammar, any whitespace, as vLLM compiles it; or xgrammar's grammar of
    ``regex``) does not allow masked, then the greedy pick, until an end-of-sequence token or ``max_new``
    tokens."""
    import json

    import torch
    import xgrammar as xgr
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    base = AutoModelForCausalLM.from_pretrained(str(model))
    pm = PeftModel.from_pretrained(base, str(adapter)).eval()
    vocab = base.config.vocab_size
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab))
    ctx = (compiler.compile_regex(regex) if regex is not None
           else compiler.compile_json_schema(json.dumps(schema), any_whitespace=True))
    matcher, mask = xgr.GrammarMatcher(ctx), xgr.allocate_token_bitmask(1, vocab)
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new):
            logits = pm(torch.tensor([ids])).logits[:, -1].float()
            matcher.fill_next_token_bitmask(mask)
            xgr.apply_token_bitmask_inplace(logits, mask)
            t = int(logits[0].argmax())
            out.append(t)
            if t == tok.eos_token_id:
                break
            assert matcher.accept_token(t)
            ids.append(t)
    return out


def test_response_format_json_schema_and_json_object_are_vllms_structured_outputs(server, model, adapters):
    """Chat with ``json_schema`` (streamed too) and a completion with ``json_object``: the text is the greedy
    answer under the grammar's mask, token for token, and parses (against the schema)."""
    import json

    import jsonschema

    from lorafleet.runtime.generation import chat_prompt_ids, completion_prompt_ids
    from lorafleet.runtime.protocol import ChatMessage

    client, tok = _client(server), server.rt.engine.tokenizer
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    max_new = 128  # the grammar allows any whitespace between tokens, which a random model likes
    r = client.chat.completions.create(model="gen1", messages=MESSAGES, max_tokens=max_new, temperature=0,
                                       response_format=fmt)
    want = constrained_greedy(model, adapters["gen1"], chat_prompt_ids(tok, [ChatMessage(**m) for m in MESSAGES]),
                              SCHEMA, max_new)
    text = r.choices[0].message.content
    assert text == tok.decode(want, skip_special_tokens=True)
    assert r.choices[0].finish_reason == "stop", text  # the grammar ended it: a whole JSON value
    jsonschema.validate(json.loads(text), SCHEMA)
    chunks = client.chat.completions.create(model="gen1", messages=MESSAGES, max_tokens=max_new, temperature=0,
                                            response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text

    r = client.completions.create(model="gen2", prompt=PROMPTS[0], max_tokens=max_new, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    want = constrained_greedy(model, adapters["gen2"], completion_prompt_ids(tok, PROMPTS[0]), {"type": "object"},
                              max_new)
    assert r.choices[0].text == tok.decode(want, skip_special_tokens=True)
    assert r.choices[0].text.lstrip().startswith("{")
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].text), dict)


def test_a_schema_vllm_cannot_compile_is_400_naming_response_format(server):
    """Refused when vLLM takes the request (its grammar backend), before any token: streamed or not."""
    for stream in (False, True):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "gen0", "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "stream": stream,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_response_format" and err["message"].startswith("`response_format`: ")
        assert "nonsense" in err["message"]


def test_tgi_grammar_json_and_regex_are_vllms_structured_outputs(server, model, adapters, monkeypatch):
    """TGI's ``parameters.grammar`` through the unmodified huggingface_hub client: ``json`` (the schema as an
    object, and as a string holding it) and ``regex`` give the greedy answer under the grammar's mask, token
    for token; a malformed grammar and a regex the backend cannot compile are 400s naming the grammar."""
    import json
    import re

    import jsonschema
    from huggingface_hub import InferenceClient, constants

    from lorafleet.runtime.generation import completion_prompt_ids

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # it would block requests to our loopback server
    client, tok = InferenceClient(model=server.url), server.rt.engine.tokenizer
    max_new = 128
    # The grammar allows any whitespace between JSON tokens, which a random model may like to the end of
    # max_new: take the first adapter and prompt whose constrained answer (the oracle's) ends within it.
    for name, prompt in (("gen3", PROMPTS[1]), ("gen2", PROMPTS[0]), ("gen1", PROMPTS[0]), ("gen4", PROMPTS[1])):
        ids = constrained_greedy(model, adapters[name], completion_prompt_ids(tok, prompt), SCHEMA, max_new)
        if ids[-1] == tok.eos_token_id:
            break
    else:
        pytest.fail("no adapter's constrained greedy answer ended within max_new tokens")
    want = tok.decode(ids, skip_special_tokens=True)
    for value in (SCHEMA, json.dumps(SCHEMA)):
        text = client.text_generation(prompt, adapter_id=name, max_new_tokens=max_new,
                                      grammar={"type": "json", "value": value})
        assert text == want
        jsonschema.validate(json.loads(text), SCHEMA)

    prompt_ids = completion_prompt_ids(tok, PROMPTS[1])

    pattern = r"(yes|no), [a-z]{2,6}[.!]"
    want = tok.decode(constrained_greedy(model, adapters["gen1"], prompt_ids, None, 32, regex=pattern),
                      skip_special_tokens=True)
    text = client.text_generation(PROMPTS[1], adapter_id="gen1", max_new_tokens=32,
                                  grammar={"type": "regex", "value": pattern})
    assert text == want and re.fullmatch(pattern, text), text
    streamed = "".join(client.text_generation(PROMPTS[1], adapter_id="gen1", max_new_tokens=32, stream=True,
                                              grammar={"type": "regex", "value": pattern}))
    assert streamed == text

    for grammar, says in (({"type": "regex", "value": "(unclosed"}, "`parameters.grammar`: "),
                          ({"type": "ebnf", "value": "root ::= a"}, "`parameters.grammar.type` must be")):
        r = httpx.post(server.url + "/generate", timeout=60, json={
            "inputs": PROMPTS[0], "parameters": {"adapter_id": "gen0", "max_new_tokens": 4, "grammar": grammar}})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_grammar" and says in r.json()["error"]["message"], r.text
