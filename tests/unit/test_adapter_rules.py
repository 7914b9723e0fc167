"""The adapter rules (contracts/adapter_rules.py), the one definition of a servable adapter that
``lorafleet push``, the sidecar and the runtime apply: each rule on real files written with the
safetensors package, each refusal with a reason a tenant can act on."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from lorafleet.contracts.adapter_rules import (MAX_ADAPTER_HEADER_BYTES, BaseModelInfo, Limits, Refused,
                                               adapter_problems, check_adapter, fit_problems, listing_problems,
                                               path_problem, read_safetensors_header, regex_problem)
from support.peft_dirs import BASE_NAME, HIDDEN, write_adapter, write_base

LIMITS = Limits(max_rank=8, max_adapter_bytes=1 << 20)


@pytest.fixture
def base(tmp_path):
    return BaseModelInfo.from_dir(write_base(tmp_path / "base"), "s3://models/tiny/", "f" * 64)


def problems(d, base=None, limits=LIMITS):
    return " | ".join(str(p) for p in adapter_problems(d, limits, base))


def edit_config(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def write_tensors(d, tensors: dict, **config):
    """Replace an adapter's weights file with ``tensors`` (numpy arrays) and update its config."""
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return edit_config(d, **config) if config else d


def raw_safetensors(path, header: dict, data: bytes = b"", length: int | None = None):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return path


# --------------------------------------------------------------------------------------- good


def test_a_good_adapter_passes_with_and_without_the_base(tmp_path, base):
    d = write_adapter(tmp_path / "a", pad_bytes=4096)
    assert adapter_problems(d, LIMITS, base) == []
    assert adapter_problems(d, LIMITS, None) == []
    layout = check_adapter(d, LIMITS, base)
    q = "bert.encoder.layer.0.attention.self.query"
    assert layout.modules[q] == ((4, HIDDEN), (HIDDEN, 4)) and layout.scales[q] == 2.0  # alpha 8 / r 4
    assert layout.heads["classifier"] == {"weight": (64, HIDDEN), "bias": (64,)}
    assert layout.labels == [f"LABEL_{i}" for i in range(64)] and layout.settings.task == "sequence-classification"


# ------------------------------------------------------------------------------- files and paths


def test_pickle_weights_are_refused(tmp_path, base):
    d = write_adapter(tmp_path / "a")
    (d / "adapter_model.bin").write_bytes(b"\x80\x04evil")
    assert "adapter_model.bin: pickle weights are refused" in problems(d, base)


def test_symlinks_are_refused_inside_and_as_the_directory(tmp_path, base):
    d = write_adapter(tmp_path / "a")
    os.symlink("/etc/passwd", d / "notes.txt")
    assert "notes.txt: symlinks are refused" in problems(d, base)
    os.symlink(write_adapter(tmp_path / "b"), tmp_path / "link")
    assert "the adapter directory is a symlink" in problems(tmp_path / "link", base)


@pytest.mark.parametrize("key", ["../evil", "a/../../evil", "/etc/passwd", "a//b", "./x"])
def test_paths_leaving_the_directory_are_refused(key):
    assert "leaves the adapter directory" in path_problem(key)
    assert [p.category for p in listing_problems([(key, 1)], LIMITS)] == ["path"]


def test_size_above_max_adapter_bytes_is_refused(tmp_path, base):
    d = write_adapter(tmp_path / "a", pad_bytes=2 << 20)
    assert "above maxAdapterBytes (1048576)" in problems(d, base)
    assert adapter_problems(d, Limits(max_rank=8, max_adapter_bytes=None), base) == []


# ----------------------------------------------------------------------------------- the config


def test_missing_malformed_or_hostile_config_is_refused(tmp_path, base):
    d = write_adapter(tmp_path / "a")
    (d / "adapter_config.json").write_text("{not json")
    assert "adapter_config.json is malformed" in problems(d, base)
    (d / "adapter_config.json").write_text("[1, 2]")
    assert "not a JSON object" in problems(d, base)
    (d / "adapter_config.json").write_bytes(b'{"r": "\xff"}')
    assert "adapter_config.json is malformed" in problems(d, base)
    # A nested-JSON bomb exhausts the parser's recursion: a refusal, not a RecursionError.
    (d / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "adapter_config.json: nested too deeply to parse" in problems(d, base)
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "pad": "x" * (2 << 20)}))
    assert "too big for a config file" in problems(d, base)
    (d / "adapter_config.json").unlink()
    assert "adapter_config.json is missing" in problems(d, base)
    d2 = write_adapter(tmp_path / "b", config={"r": "four", "target_modules": [], "lora_alpha": True})
    text = problems(d2, base)
    assert "r must be a positive integer" in text and "target_modules must be a non-empty list" in text
    assert "lora_alpha must be a positive number" in text


@pytest.mark.parametrize("option,value,reason", [
    ("use_dora", True, "DoRA is not supported"),
    ("fan_in_fan_out", True, "fan_in_fan_out (Conv1D bases such as GPT-2) is not supported"),
    ("bias", "all", "trained biases"),
    ("lora_bias", True, "lora_bias is not supported"),
    ("layer_replication", [[0, 2]], "layer_replication is not supported"),
    ("alora_invocation_tokens", [1, 2], "activated LoRA"),
    ("init_lora_weights", "pissa_niter_4", "rewrites the base model's weights"),
    ("peft_type", "PREFIX_TUNING", "peft_type 'PREFIX_TUNING' is not supported (only LORA)"),
    ("task_type", "TOKEN_CLS", "task_type 'TOKEN_CLS' is not served"),
])
def test_lora_options_the_runtime_does_not_compute_are_refused(tmp_path, base, option, value, reason):
    d = write_adapter(tmp_path / "a", config={option: value})
    assert reason in problems(d, base)
    assert reason in problems(d)  # without the base too: push and the runtime see it as well


def test_rank_limits_and_the_rank_each_module_must_have(tmp_path, base):
    assert "rank r=16 is above maxRank (8)" in problems(write_adapter(tmp_path / "a", r=16), base)
    d = write_adapter(tmp_path / "b", r=4, config={"rank_pattern": {"value": 12}})
    text = problems(d, base)
    assert "rank_pattern['value']=12 is above maxRank (8)" in text
    # PEFT gives "value" modules rank 12 (rank_pattern), the files hold rank 4: not what PEFT computes.
    assert "module bert.encoder.layer.0.attention.self.value: rank 4 differs from the r=12" in text
    assert "attention.self.query: rank" not in text
    d = write_adapter(tmp_path / "c", r=4, config={"r": 2, "rank_pattern": {r"layer\.\d\.attention\.self\.(query|value)": 4}})
    assert problems(d, base) == ""


def test_target_modules_the_base_lacks_are_refused(tmp_path, base):
    d = write_adapter(tmp_path / "a", targets=("query", "gate_proj"))
    text = problems(d, base)
    assert "target_modules ['gate_proj'] are not modules of the base model" in text
    assert "gate_proj: the base model has no such module" in text
    d = write_adapter(tmp_path / "b", config={"target_modules": r".*\.(q_proj|v_proj)"})
    assert "target_modules regex '.*\\\\.(q_proj|v_proj)' matches no module" in problems(d, base)
    d = write_adapter(tmp_path / "c", config={"target_modules": r".*attention\.self\.(query|value)"})
    assert problems(d, base) == ""


@pytest.mark.parametrize("regex,reason", [
    ("(query", "is not a valid regex"),
    ("(a+)+$", "repeats a group that itself repeats"),
    ("(query|value)*", "repeats a group that itself repeats or alternates"),
    ("q" * 600, "characters long"),
    (".*a.*b.*c.*d", "has 4 unbounded repetitions (at most 3"),
])
def test_bad_or_catastrophic_regexes_are_refused_before_matching(tmp_path, base, regex, reason):
    d = write_adapter(tmp_path / "a", config={"target_modules": regex})
    assert reason in problems(d, base)
    d = write_adapter(tmp_path / "b", config={"rank_pattern": {regex: 4}})
    assert reason in problems(d, base)


def test_regexes_people_write_for_peft_pass():
    for ok in (r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$", r"model\.layers\.\d+\.self_attn\.q_proj",
               r"(.*\.)?(q_proj|v_proj)"):
        assert regex_problem(ok, "target_modules") is None, ok


def test_base_model_mismatch_is_refused_and_matches_are_documented(tmp_path, base):
    d = write_adapter(tmp_path / "a", base_name="meta-llama/Llama-2-7b-hf")
    assert "base_model_name_or_path 'meta-llama/Llama-2-7b-hf' does not match the pool's model" in problems(d, base)
    for ok in (BASE_NAME, "s3://models/tiny/", "s3://models/tiny", "f" * 64, "tiny-bert",
               "/home/me/checkpoints/anything", None):
        assert base.accepts_name(ok or ""), ok
    nameless = BaseModelInfo.build("", "s3://m/x/", "f" * 64, base.weights)
    assert nameless.accepts_name("meta-llama/Llama-2-7b-hf")  # a base without a name: shapes decide


# ---------------------------------------------------------------------------------- the tensors


def test_shapes_that_do_not_fit_the_base_are_refused(tmp_path, base):
    d = write_adapter(tmp_path / "a", in_features=32)
    assert "do not fit the base weight [16, 16]" in problems(d, base)
    assert problems(d) == ""  # push (no base) cannot know


def test_embedding_lora_dora_vectors_and_stray_tensors_are_refused(tmp_path, base):
    rng = np.random.default_rng(0)
    pre = "base_model.model.bert.encoder.layer.0.attention.self.query"
    good = {f"{pre}.lora_A.weight": rng.standard_normal((4, 16), dtype=np.float32),
            f"{pre}.lora_B.weight": rng.standard_normal((16, 4), dtype=np.float32)}
    d = write_tensors(write_adapter(tmp_path / "a"), {
        **good, "base_model.model.bert.embeddings.word_embeddings.lora_embedding_A": np.ones((4, 50), np.float32),
        "base_model.model.bert.embeddings.word_embeddings.lora_embedding_B": np.ones((16, 4), np.float32)})
    assert "LoRA on embeddings is not supported" in problems(d, base)
    d = write_tensors(write_adapter(tmp_path / "b"), {**good, f"{pre}.lora_magnitude_vector": np.ones(16, np.float32)})
    assert "DoRA is not supported" in problems(d, base)
    d = write_tensors(write_adapter(tmp_path / "c"), {**good, f"{pre}.lora_A.extra": np.ones(2, np.float32)})
    assert "not a LoRA weight nor a modules_to_save weight/bias" in problems(d, base)
    d = write_tensors(write_adapter(tmp_path / "d"), {**good, "base_model.model.pooler.dense.weight":
                                                     np.ones((16, 16), np.float32)})
    assert "module 'pooler.dense' is not in modules_to_save" in problems(d, base)
    d = write_tensors(write_adapter(tmp_path / "e"), {f"{pre}.lora_A.weight": np.ones((4, 16), np.int32),
                                                     f"{pre}.lora_B.weight": good[f"{pre}.lora_B.weight"]})
    assert "dtype I32 is not a float type" in problems(d, base)
    d = write_tensors(write_adapter(tmp_path / "f"), {f"{pre}.lora_A.weight": good[f"{pre}.lora_A.weight"]})
    assert "has only one of lora_A/lora_B" in problems(d, base)
    d = write_tensors(write_adapter(tmp_path / "g"), {**good, "base_model.model.classifier.weight":
                                                     np.ones(64, np.float32)})
    assert "head classifier: needs a 2-D weight" in problems(d, base)


def test_labels_must_match_the_head(tmp_path, base):
    d = write_adapter(tmp_path / "a", pad_bytes=3 * 4 * HIDDEN)  # a 3-label head
    (d / "labels.json").write_text(json.dumps(["a", "b"]))
    assert "2 label names but the classifier head has 3 outputs" in problems(d, base)
    (d / "labels.json").write_text("[" * 50_000 + "]" * 50_000)
    assert "labels.json: nested too deeply to parse" in problems(d, base)
    (d / "labels.json").write_text(json.dumps({"id2label": {"0": "x", "1": "y", "2": "z"}}))
    assert check_adapter(d, LIMITS, base).labels == ["x", "y", "z"]


# ---------------------------------------------------------------------------- safetensors files


def test_truncated_or_lying_safetensors_files_are_refused(tmp_path, base):
    d = write_adapter(tmp_path / "a")
    w = d / "adapter_model.safetensors"
    whole = w.read_bytes()
    w.write_bytes(whole[:-10])
    assert "adapter_model.safetensors: truncated" in problems(d, base)
    w.write_bytes(whole + b"\0" * 8)
    assert "has trailing bytes" in problems(d, base)
    w.write_bytes(whole[:5])
    assert "shorter than its 8-byte header length" in problems(d, base)
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(Refused, match="does not fit the file"):
        read_safetensors_header(p)


@pytest.mark.parametrize("entry,data,reason", [
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 999]}, 16, "does not take 999 bytes"),
    ({"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}, 16, "malformed entry"),
    ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, 4, "malformed entry"),
    ({"dtype": "Q4", "shape": [4], "data_offsets": [0, 2]}, 2, "dtype 'Q4', which is not read here"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [4, 20]}, 20, "starts at byte 4, expected 0"),
])
def test_safetensors_headers_are_checked_as_the_library_checks_them(tmp_path, entry, data, reason):
    p = raw_safetensors(tmp_path / "x.safetensors", {"t": entry}, b"\0" * data)
    with pytest.raises(Refused, match=reason):
        read_safetensors_header(p)


def test_overlapping_tensors_and_hostile_headers_are_refused(tmp_path):
    p = raw_safetensors(tmp_path / "x.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
                        b"\0" * 16)
    with pytest.raises(Refused, match="overlapping or gapped"):
        read_safetensors_header(p)
    p.write_bytes(struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(Refused, match="nested too deeply"):
        read_safetensors_header(p)
    raw_safetensors(p, {"__metadata__": {"format": {"nested": 1}}})
    with pytest.raises(Refused, match="__metadata__ must map strings to strings"):
        read_safetensors_header(p)
    # A header above the limit is refused before it is read (the library itself stops at 100 MB).
    big = {"__metadata__": {"pad": "x" * (MAX_ADAPTER_HEADER_BYTES + 1024)}}
    raw_safetensors(p, big)
    with pytest.raises(Refused, match=f"above the limit of {MAX_ADAPTER_HEADER_BYTES}"):
        read_safetensors_header(p)


def test_a_file_these_rules_pass_is_one_the_safetensors_library_reads(tmp_path):
    from safetensors import safe_open

    d = write_adapter(tmp_path / "a", pad_bytes=1024)
    header = read_safetensors_header(d / "adapter_model.safetensors")
    with safe_open(str(d / "adapter_model.safetensors"), framework="numpy") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == {k: v.shape for k, v in header.items()}


# ------------------------------------------------------------------------ the runtime's view


def test_the_loaded_models_view_refuses_what_only_it_can_know(tmp_path, base):
    """The runtime describes its loaded model (exact module paths and classes); the same rules then
    refuse LoRA on a non-Linear module and paths that only a suffix would match."""
    d = write_adapter(tmp_path / "a")
    kinds = {m: "Linear" for m in base.weights} | {"embeddings.word_embeddings": "Embedding"}
    loaded = BaseModelInfo.build("", "", "", {f"bert.{m}": w for m, w in base.weights.items()},
                                 {f"bert.{m}": k for m, k in kinds.items()}, exact_paths=True,
                                 task="sequence-classification")
    assert problems(d, loaded) == "no classifier head (modules_to_save): a classification pool needs one; " \
                                  "train the adapter with task_type SEQ_CLS"
    d = write_adapter(tmp_path / "b", pad_bytes=4 * 4 * HIDDEN)
    assert problems(d, loaded) == "head classifier: the base model has no such module"
    layout = check_adapter(d, LIMITS)
    emb = "bert.embeddings.word_embeddings"
    text = " | ".join(map(str, fit_problems({emb: ((4, 16), (50, 4))}, layout.heads, layout.settings, LIMITS, loaded)))
    assert f"module {emb}: is a Embedding in the base model; LoRA is served on Linear layers only" in text
    short = {m[len("bert."):]: v for m, v in layout.modules.items()}
    text = " | ".join(map(str, fit_problems(short, {}, layout.settings, LIMITS, loaded)))
    assert "encoder.layer.0.attention.self.query: the base model has no such module" in text


def test_every_problem_is_reported_together_and_refusals_are_permanent(tmp_path, base):
    d = write_adapter(tmp_path / "a", r=16, base_name="other/model", config={"use_dora": True})
    (d / "w.pt").write_bytes(b"x")
    found = adapter_problems(d, LIMITS, base)
    assert {p.category for p in found} >= {"rank", "base_model", "unsupported", "pickle"}
    with pytest.raises(Refused) as e:
        check_adapter(d, LIMITS, base)
    assert e.value.permanent and all(p.message in e.value.reason for p in found)
