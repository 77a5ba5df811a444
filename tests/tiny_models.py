"""Tiny random transformers models, one per registered architecture, for adapter tests."""

from __future__ import annotations

import torch
import transformers as tf

TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=16, patch_size=8, num_channels=3)


def _decoder(config_cls, **extra):
    return lambda: tf.AutoModelForCausalLM.from_config(config_cls(num_key_value_heads=2, **TEXT, **extra))


BUILDERS = {
    "llama": _decoder(tf.LlamaConfig),
    "gemma": _decoder(tf.GemmaConfig, head_dim=8),
    "gemma2": _decoder(tf.Gemma2Config, head_dim=8),
    "gemma3": _decoder(tf.Gemma3TextConfig, head_dim=8, sliding_window=8),
    "qwen2": _decoder(tf.Qwen2Config),
    "qwen3": _decoder(tf.Qwen3Config, head_dim=8),
    "mistral": _decoder(tf.MistralConfig),
    "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(num_labels=3, **TEXT)),
    "roberta": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(num_labels=3, pad_token_id=1, **TEXT)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_inner=48, n_layer=2, n_head=4, vocab_size=128)),
    "siglip": lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION)),
    "vit": lambda: tf.ViTForImageClassification(tf.ViTConfig(num_labels=3, **VISION)),
}
# The paper's plain layer (residual placement, C trained), what the older tests describe; the
# library's default is the parallel placement with C frozen (tests/test_scl_variants.py).
PLAIN_SCL = dict(placement="residual", train_compress=True)
HEADS = {"bert": ("classifier",), "roberta": ("classifier",), "vit": ("classifier",)}
VISION_ARCHS = {"siglip", "vit"}


def build(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = BUILDERS[arch]()
    model.eval()  # no dropout: outputs must be comparable exactly
    return model


def inputs(arch: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if arch in VISION_ARCHS:
        return {"pixel_values": torch.randn(batch, 3, VISION["image_size"], VISION["image_size"], generator=g)}
    return {"input_ids": torch.randint(3, TEXT["vocab_size"], (batch, seq), generator=g)}


def output_tensor(arch: str, out) -> torch.Tensor:
    if arch == "siglip":
        return torch.cat([out.last_hidden_state.flatten(1), out.pooler_output], dim=1)
    return out.logits


def loss_of(arch: str, out) -> torch.Tensor:
    t = output_tensor(arch, out)
    return (t.float() ** 2).mean()


def train_steps(model, arch: str, steps: int = 2, lr: float = 1e-2, opt_cls=torch.optim.AdamW):
    """``steps`` optimizer steps on ``loss_of`` (inputs on the model's device): (losses, per-step
    {name: grad clone})."""
    opt = opt_cls([p for p in model.parameters() if p.requires_grad], lr=lr)
    dev = next(model.parameters()).device
    losses, grads = [], []
    for step in range(steps):
        opt.zero_grad()
        loss = loss_of(arch, model(**{k: v.to(dev) for k, v in inputs(arch, seed=step).items()}))
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    return losses, grads


def hf_trainer_steps(model, out_dir, steps: int = 2) -> None:
    """``steps`` HF Trainer steps of a tiny 3-label text classifier (BERT-style inputs)."""
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Toy(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"input_ids": torch.randint(3, 128, (6,)), "labels": torch.tensor(i % 3)}

    args = TrainingArguments(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, learning_rate=1e-2, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=Toy()).train()
