"""lorafleet runtime: the batched multi-LoRA model server of a pool pod."""
