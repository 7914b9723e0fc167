"""Small PEFT-format adapter directories and a tiny BERT-shaped base "model dir" for the adapter rules
and the sidecar's tests:
real safetensors files with the module names and shapes PEFT writes, no training needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

BASE_NAME = "lorafleet-test/tiny-bert"
HIDDEN = 16
LAYERS = 2


def write_base(d: Path, name: str | None = BASE_NAME, hidden: int = HIDDEN, layers: int = LAYERS) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tensors = {"embeddings.word_embeddings.weight": rng.standard_normal((50, hidden), dtype=np.float32)}
    for i in range(layers):
        for m in ("query", "key", "value"):
            tensors[f"encoder.layer.{i}.attention.self.{m}.weight"] = rng.standard_normal((hidden, hidden), dtype=np.float32)
            tensors[f"encoder.layer.{i}.attention.self.{m}.bias"] = np.zeros(hidden, dtype=np.float32)
        tensors[f"encoder.layer.{i}.intermediate.dense.weight"] = rng.standard_normal((4 * hidden, hidden), dtype=np.float32)
    save_file(tensors, str(d / "model.safetensors"))
    cfg = {"model_type": "bert", "hidden_size": hidden, "num_hidden_layers": layers}
    if name:
        cfg["_name_or_path"] = name
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def write_adapter(d: Path, *, r: int = 4, targets=("query", "value"), base_name: str | None = BASE_NAME,
                  hidden: int = HIDDEN, layers: int = LAYERS, seed: int = 1, pad_bytes: int = 0,
                  in_features: int | None = None, config: dict | None = None) -> Path:
    """An adapter for ``write_base``'s model; ``pad_bytes`` adds a random classification head of that
    size (a modules_to_save tensor) to make big adapters."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(layers):
        for m in targets:
            pre = f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}"
            tensors[f"{pre}.lora_A.weight"] = rng.standard_normal((r, in_features or hidden), dtype=np.float32)
            tensors[f"{pre}.lora_B.weight"] = rng.standard_normal((hidden, r), dtype=np.float32)
    if pad_bytes:
        rows = max(1, pad_bytes // (4 * hidden))
        tensors["base_model.model.classifier.weight"] = rng.standard_normal((rows, hidden), dtype=np.float32)
        tensors["base_model.model.classifier.bias"] = np.zeros(rows, dtype=np.float32)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets),
           "base_model_name_or_path": base_name, "task_type": "SEQ_CLS", "modules_to_save": ["classifier"]}
    cfg.update(config or {})
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d
