"""Which runtime image a pool's pods get: its own spec.runtime.image, else the operator's vLLM runtime image
when its engine is vllm (or auto resolving to vLLM: text generation with a GPU, unquantized, not merged),
else the operator's torch runtime image; the chart's values reach the operator as its flags."""

from __future__ import annotations

import pytest

from lorafleet.contracts import names
from lorafleet.contracts.resources import BaseModelPoolSpec
from lorafleet.operator import manifests
from lorafleet.operator.cli import parse

IMAGES = manifests.RuntimeImages(torch="reg/runtime:7", vllm="reg/runtime-vllm:7")
GPU = {"limits": {"nvidia.com/gpu": 1}}


def _spec(task="text-generation", engine=None, image=None, resources=None, quantization=None, merged=False):
    runtime = {k: v for k, v in {"engine": engine, "image": image, "resources": resources}.items() if v is not None}
    model = {"uri": "s3://m/x/", "sha256": "a" * 64, "task": task}
    if quantization:
        model["quantization"] = quantization
    if merged:
        model["mergedAdapter"] = {"name": "acme-chat"}
    return BaseModelPoolSpec.model_validate({"model": model, "runtime": runtime})


def _image(spec) -> str:
    [rt] = manifests.deployment("p", "ns", "uid", spec, images=IMAGES)["spec"]["template"]["spec"]["containers"]
    return rt["image"]


@pytest.mark.parametrize("kw,want", [
    ({"engine": "vllm"}, "reg/runtime-vllm:7"),
    ({"engine": "vllm", "resources": GPU}, "reg/runtime-vllm:7"),
    ({"engine": "torch", "resources": GPU}, "reg/runtime:7"),
    ({"engine": "auto", "resources": GPU}, "reg/runtime-vllm:7"),  # auto on a GPU: vLLM
    ({"resources": {"requests": {"nvidia.com/gpu": "2"}, "limits": {"nvidia.com/gpu": "2"}}}, "reg/runtime-vllm:7"),
    ({}, "reg/runtime:7"),  # auto without a GPU: torch
    ({"resources": {"limits": {"nvidia.com/gpu": 0, "cpu": "4"}}}, "reg/runtime:7"),
    ({"resources": GPU, "quantization": "nf4"}, "reg/runtime:7"),  # the torch engine's bitsandbytes path
    ({"resources": GPU, "merged": True}, "reg/runtime:7"),  # the torch engine merges at load
    ({"resources": GPU, "task": "sequence-classification"}, "reg/runtime:7"),
    ({"resources": GPU, "task": "text-to-image"}, "reg/runtime:7"),
    ({"engine": "vllm", "image": "mine/vllm:1"}, "mine/vllm:1"),  # the pool's own image is kept
    ({"engine": "auto", "resources": GPU, "image": "mine/rt:2"}, "mine/rt:2"),
    ({"engine": "torch", "image": "mine/rt:3"}, "mine/rt:3"),
])
def test_the_runtime_image_follows_the_engine_unless_the_pool_names_one(kw, want):
    assert _image(_spec(**kw)) == want


def test_the_engine_the_operator_assumes_is_the_runtimes_rule():
    """``auto`` resolves, for the image, as the runtime resolves it in that image (lifecycle.choose_engine)."""
    from lorafleet.runtime.lifecycle import choose_engine
    from lorafleet.runtime.settings import RuntimeSettings

    for task in ("text-generation", "sequence-classification"):
        for quantization in ("none", "int8"):
            for gpu in (False, True):
                spec = _spec(task=task, quantization=quantization, resources=GPU if gpu else None)
                settings = RuntimeSettings.from_env({}, engine="auto", quantization=quantization)
                runtime = choose_engine(task, settings, has_vllm=lambda: True, has_gpu=lambda: gpu)
                assert manifests.pool_engine(spec) == runtime, (task, quantization, gpu)


def test_defaults_and_the_operators_flags():
    assert manifests.RuntimeImages() == manifests.RuntimeImages(names.DEFAULT_RUNTIME_IMAGE,
                                                                names.DEFAULT_RUNTIME_VLLM_IMAGE)
    assert _spec().runtime.image is None  # the CRD defaults nothing: the operator chooses
    args = parse(["--runtime-image", "a/rt:1", "--runtime-vllm-image", "a/vllm:1"])
    assert (args.runtime_image, args.runtime_vllm_image) == ("a/rt:1", "a/vllm:1")
    args = parse([])
    assert (args.runtime_image, args.runtime_vllm_image) == (names.DEFAULT_RUNTIME_IMAGE,
                                                            names.DEFAULT_RUNTIME_VLLM_IMAGE)
