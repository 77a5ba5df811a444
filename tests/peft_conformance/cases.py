"""fastseq's cases for PEFT's generic tests: tiny models built in process, SCL beside LoRA.

``TinyModels.from_pretrained(model_id, dtype=None)`` stands in for PEFT's
``transformers_class.from_pretrained`` (PEFT's tests download tiny hub models; this machine has
no hub): the same seed gives the same weights on every call, as a download would.
"""

from __future__ import annotations

import os

import torch
import transformers as tf
from peft import LoraConfig
from torch import nn

from fastseq import SCLPeftConfig


class FFN(nn.Module):
    """A plain FFN as fastseq's registry knows it (fc1 / activation_fn / fc2: the ``fc1-fc2`` style)."""

    def __init__(self, d_model: int, d_ffn: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ffn)
        self.activation_fn = nn.GELU()
        self.fc2 = nn.Linear(d_ffn, d_model)

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


class MLPWithFFNBlocks(nn.Module):
    """PEFT's test ``MLP`` (lin0, relu, lin1, log-softmax over 2 classes, ``dtype`` attribute) with
    two residual FFN blocks between lin0 and lin1, so that SCL has FFNs to adapt."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.blocks = nn.ModuleList([FFN(20, 32), FFN(20, 32)])
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        h = self.relu(self.lin0(X))
        for block in self.blocks:
            h = h + block(h)
        return self.sm(self.lin1(h))


TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)

BUILDERS = {
    "MLPWithFFNBlocks": MLPWithFFNBlocks,
    "tiny-LlamaForCausalLM": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **TEXT)),
    "tiny-GPT2LMHeadModel": lambda: tf.GPT2LMHeadModel(
        tf.GPT2Config(n_embd=32, n_inner=48, n_layer=2, n_head=4, vocab_size=128)),
    "tiny-BertModel": lambda: tf.BertModel(tf.BertConfig(**TEXT)),
}


class TinyModels:
    """``from_pretrained`` for the model ids above (PEFT's ``MockTransformerWrapper``, for our models)."""

    @classmethod
    def from_pretrained(cls, model_id, dtype=None):
        if os.path.isdir(model_id):  # a model saved with save_pretrained (merge tests reload it)
            architecture = tf.AutoConfig.from_pretrained(model_id).architectures[0]
            return getattr(tf, architecture).from_pretrained(model_id, dtype=dtype).eval()
        torch.manual_seed(0)  # the same weights on every call
        model = BUILDERS[model_id]()
        if hasattr(model, "config"):  # what from_pretrained records (PEFT saves and its tests compare it)
            model.config._name_or_path = model.name_or_path = model_id
        if dtype is not None:
            model = model.to(dtype)
            if isinstance(model, MLPWithFFNBlocks):
                model.dtype = dtype
        return model.eval()


# Few cases on purpose (the suite has a time budget): SCL's variants (placement, C trained or
# frozen, checkpoint levels 0/1/2, one FFN of two, a head) on the cheap MLP; the default SCL on
# the transformers models; one LoRA case per model as the control that the harness itself works.
# (test name, model id, config class, config kwargs), as PEFT's test_custom_models.TEST_CASES
CUSTOM_CASES = [
    ("MLP-FFN SCL parallel frozen C level 1", "MLPWithFFNBlocks", SCLPeftConfig, {"r": 4}),
    ("MLP-FFN SCL residual trained C level 0", "MLPWithFFNBlocks", SCLPeftConfig,
     {"r": 4, "placement": "residual", "train_compress": True, "checkpoint_level": 0}),
    ("MLP-FFN SCL one FFN level 2 + head", "MLPWithFFNBlocks", SCLPeftConfig,
     {"r": 4, "target_modules": ["blocks.1"], "checkpoint_level": 2, "modules_to_save": ["lin1"]}),
    ("MLP-FFN LoRA + head", "MLPWithFFNBlocks", LoraConfig, {"target_modules": ["fc1"], "modules_to_save": ["lin1"]}),
]

DECODER_MODELS = ["tiny-LlamaForCausalLM", "tiny-GPT2LMHeadModel"]
# (config class, config kwargs), as PEFT's test_decoder_models.ALL_CONFIGS
DECODER_CONFIGS = [
    (SCLPeftConfig, {"task_type": "CAUSAL_LM", "r": 8}),
    (LoraConfig, {"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "target_modules": None, "lora_dropout": 0.05,
                  "bias": "none"}),
]

FEATURE_EXTRACTION_MODELS = ["tiny-BertModel"]
FEATURE_EXTRACTION_CONFIGS = [
    (SCLPeftConfig, {"task_type": "FEATURE_EXTRACTION", "r": 8}),
    (LoraConfig, {"task_type": "FEATURE_EXTRACTION", "r": 8, "lora_alpha": 32, "target_modules": None,
                  "lora_dropout": 0.05, "bias": "none"}),
]
