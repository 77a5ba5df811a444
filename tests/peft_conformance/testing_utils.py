# Copyright 2023-present the HuggingFace Inc. team.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#
# fastseq: the three helpers of PEFT's tests/testing_utils.py that testing_common.py and our test
# modules use, copied from huggingface/peft at the commit README.md names. `get_state_dict` and
# `set_init_weights_false` are verbatim; `hub_online_once` is a no-op here because every model is
# built in process (PEFT's version toggles HF_HUB_OFFLINE around hub downloads). The rest of
# PEFT's file (dataset loaders, GPU and quantization markers) is left out: it needs `datasets`
# and accelerate's test utilities, which these tests never use.
from contextlib import contextmanager

from peft import (
    AdaLoraConfig,
    IA3Config,
    LNTuningConfig,
    LoraConfig,
    MissConfig,
    PromptLearningConfig,
    TinyLoraConfig,
    VBLoRAConfig,
)


def get_state_dict(model, unwrap_compiled=True):
    """
    Get the state dict of a model. If the model is compiled, unwrap it first.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    return model.state_dict()


def set_init_weights_false(config_cls, kwargs):
    # helper function that sets the config kwargs such that the model is *not* initialized as an identity transform
    kwargs = kwargs.copy()

    if issubclass(config_cls, PromptLearningConfig):
        return kwargs
    if config_cls in (LNTuningConfig, VBLoRAConfig):
        return kwargs
    if (config_cls == MissConfig) and (kwargs.get("init_weights") == "bat"):
        # don't override 'bat' init or else it's not being properly tested
        return kwargs

    if config_cls in (LoraConfig, AdaLoraConfig):
        kwargs["init_lora_weights"] = False
    elif config_cls == IA3Config:
        kwargs["init_ia3_weights"] = False
    elif config_cls == TinyLoraConfig:
        kwargs["init_weights"] = "uniform"
    else:
        kwargs["init_weights"] = False
    return kwargs


@contextmanager
def hub_online_once(model_id: str):
    # fastseq: no hub access at all (the models are built in process), so nothing to toggle.
    yield
