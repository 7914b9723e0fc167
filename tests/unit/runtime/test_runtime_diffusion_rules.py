"""Diffusion LoRAs go through the same adapter rules in the sidecar (the pipeline's checkpoint
headers, no torch) as in the runtime's diffusion engine: the two views of the pipeline agree, and a
hostile file is a refusal in both, never a safetensors library error."""

from __future__ import annotations

import struct

from lorafleet.contracts.adapter_rules import BaseModelInfo, Limits, adapter_problems
from test_runtime_diffusion import _engine, oracle, sd_adapters, sd_base  # noqa: F401 (fixtures)


def test_the_sidecar_view_of_a_pipeline_agrees_with_the_engine(sd_base):
    sidecar = BaseModelInfo.from_dir(sd_base)
    assert sidecar.task == "text-to-image" and set(sidecar.components) == {"unet", "text_encoder"}
    engine = _engine(sd_base)
    for comp, shapes in engine.base_shapes.items():
        assert all(sidecar.components[comp][m] == w for m, w in shapes.items()), comp
    # (test_runtime_diffusion.py holds the sidecar's verdicts on every adapter to the engine's)


def test_a_hostile_diffusion_file_is_a_refusal_not_a_library_error(sd_base, sd_adapters, tmp_path):
    import shutil

    import pytest

    from lorafleet.runtime.peft_format import AdapterFormatError

    d = shutil.copytree(sd_adapters["peft-meta"][0], tmp_path / "cut")
    w = next(d.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:-64])
    h = shutil.copytree(sd_adapters["peft-meta"][0], tmp_path / "huge")
    next(h.glob("*.safetensors")).write_bytes(struct.pack("<Q", 200_000_000) + b"{}")
    engine = _engine(sd_base)
    for path, reason in ((d, "truncated"), (h, "above the limit")):
        with pytest.raises(AdapterFormatError, match=reason) as e:
            engine.load_adapter(path)
        assert e.value.permanent
        assert reason in " ".join(map(str, adapter_problems(path, Limits(), BaseModelInfo.from_dir(sd_base))))
