"""Which engine runs a pool's model (``spec.runtime.engine``: auto, torch or vllm), and the refusal of an
engine the runtime cannot run: the runtime's readiness and ``GET /admin/model`` say why, and the pool's
ModelReady condition shows it."""

from __future__ import annotations

import pytest

from lorafleet.runtime.architectures import UnsupportedModel
from lorafleet.runtime.lifecycle import Runtime, choose_engine, choose_front
from lorafleet.runtime.settings import RuntimeSettings


def _choose(engine: str, task: str, *, vllm: bool, gpu: bool, **settings) -> str:
    return choose_engine(task, RuntimeSettings(engine=engine, **settings), has_vllm=lambda: vllm,
                         has_gpu=lambda: gpu)


def test_auto_is_vllm_only_for_text_generation_on_a_gpu_with_vllm_installed():
    assert _choose("auto", "text-generation", vllm=True, gpu=True) == "vllm"
    assert _choose("auto", "text-generation", vllm=True, gpu=False) == "torch"
    assert _choose("auto", "text-generation", vllm=False, gpu=True) == "torch"
    for task in ("sequence-classification", "text-to-image"):
        assert _choose("auto", task, vllm=True, gpu=True) == "torch"
    # A quantized or merged base is the torch engine's (the vllm engine refuses both).
    assert _choose("auto", "text-generation", vllm=True, gpu=True, quantization="nf4") == "torch"
    assert _choose("auto", "text-generation", vllm=True, gpu=True, merged_adapter_dir="/m", merged_adapter_name="m",
                   merged_adapter_version="1") == "torch"


def test_auto_front_is_a_front_process_where_the_model_computes_in_a_model_process():
    """auto: the HTTP front process for text generation and classification on CPU (the model in a model
    process), also while the task is not known yet; inline on a GPU, with vLLM, for text-to-image and where
    the model stays in the server's process. An explicit choice is kept."""
    cpu = RuntimeSettings()
    for task in ("text-generation", "sequence-classification", None):
        assert choose_front(cpu, task) == "process"
    assert choose_front(cpu, "text-to-image") == "inline"
    assert choose_front(RuntimeSettings(device="cuda"), "text-generation") == "inline"
    assert choose_front(RuntimeSettings(engine="vllm"), "text-generation") == "inline"
    assert choose_front(RuntimeSettings(model_process="inline"), "text-generation") == "inline"
    assert choose_front(RuntimeSettings(front="inline"), "text-generation") == "inline"
    assert choose_front(RuntimeSettings(front="process", device="cuda"), "text-to-image") == "process"


def test_an_explicit_engine_is_honoured_or_refused():
    assert _choose("torch", "text-generation", vllm=True, gpu=True) == "torch"
    assert _choose("vllm", "text-generation", vllm=True, gpu=False) == "vllm"  # vLLM's CPU build
    with pytest.raises(UnsupportedModel, match="vLLM is not installed in this runtime image"):
        _choose("vllm", "text-generation", vllm=False, gpu=True)
    with pytest.raises(UnsupportedModel, match="text-generation pools only; this pool's task is sequence-class"):
        _choose("vllm", "sequence-classification", vllm=True, gpu=True)


def test_the_engine_setting_comes_from_the_pod_environment_and_is_checked():
    assert RuntimeSettings.from_env({"LORAFLEET_ENGINE": "vllm"}).engine == "vllm"
    assert RuntimeSettings.from_env({}).engine == "auto"
    with pytest.raises(ValueError, match="LORAFLEET_ENGINE='tgi': expected one of auto, torch, vllm"):
        RuntimeSettings.from_env({"LORAFLEET_ENGINE": "tgi"})


def test_vllm_where_it_is_not_installed_is_the_runtimes_refusal(tiny_llama):
    from lorafleet.runtime.lifecycle import vllm_installed

    assert not vllm_installed(), "the main virtualenv has no vLLM (it has its own: tools/venv-vllm)"
    rt = Runtime(RuntimeSettings.from_env({}, model_dir=str(tiny_llama), engine="vllm"))
    rt.load_in_background().join(timeout=60)
    ok, why = rt.ready()
    assert not ok and "engine vllm: vLLM is not installed" in why
    status = rt.model_status()
    assert status.state == "refused" and "spec.runtime.engine to torch or auto" in status.message


def test_max_rank_rounds_up_to_a_rank_vllm_takes_and_above_512_is_refused():
    from lorafleet.runtime.vllm_engine import lora_rank_for  # imports without vLLM

    assert [lora_rank_for(r) for r in (1, 2, 8, 9, 64, 300, 321, 512)] == [1, 8, 8, 16, 64, 320, 512, 512]
    with pytest.raises(UnsupportedModel, match="cache.maxRank 513 is above the largest LoRA rank vLLM serves"):
        lora_rank_for(513)
