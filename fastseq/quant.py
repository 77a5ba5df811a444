"""Quantized backbones: bitsandbytes NF4 / int8 frozen weights under SCL (docs/design.md §2).

* `bnb_config(quantization, compute_dtype)` -> a transformers ``BitsAndBytesConfig`` for
  ``from_pretrained(..., quantization_config=...)`` (hub ids and local folders).
* `quantize_model(model, quantization, compute_dtype)` quantizes a model built in memory
  (the tiny test models) through the same official path: ``save_pretrained`` to a
  temporary folder and ``from_pretrained(..., quantization_config=...)`` back.
* `prepare_for_kbit_training(model)`: PEFT's ``prepare_model_for_kbit_training`` without
  PEFT: freeze the base, keep half-precision norm weights in fp32, enable input grads so
  activation checkpointing works on a frozen embedding.

The task head (``lm_head``, ``classifier``, ``score``, ...) is never quantized: it is what a
classification task trains. Every failure raises `QuantizationError` with what to do.
"""

from __future__ import annotations

import importlib.util
import tempfile

import torch
from torch import nn

QUANTIZATIONS = ("none", "int8", "nf4")

#: module name suffixes kept in floating point (task heads and output embeddings)
HEAD_MODULES = ("lm_head", "classifier", "score", "embed_out", "qa_outputs")


class QuantizationError(ValueError):
    """A quantized backbone cannot be built or used as asked; the message says what to do."""


def check_quantization(quantization: str) -> str:
    if quantization not in QUANTIZATIONS:
        raise QuantizationError(
            f"unknown quantization {quantization!r}; valid values are {', '.join(QUANTIZATIONS)} "
            f"('none' keeps the backbone in floating point, 'int8' is bitsandbytes LLM.int8, "
            f"'nf4' is bitsandbytes 4-bit NormalFloat as in QLoRA)"
        )
    return quantization


def require_bitsandbytes():
    """Import bitsandbytes or raise a QuantizationError that says how to install it."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError(
            "quantized backbones need bitsandbytes, which is not installed: pip install 'fastseq[quant]'"
        )
    from ._quiet import quiet_bitsandbytes_kernel_notice

    quiet_bitsandbytes_kernel_notice()
    try:
        import bitsandbytes
    except Exception as exc:  # a broken install raises all sorts of errors at import
        raise QuantizationError(f"bitsandbytes is installed but cannot be imported ({exc}); "
                                f"reinstall it with pip install -U 'fastseq[quant]'") from exc
    return bitsandbytes


def _as_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise QuantizationError(f"unknown compute dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def check_device(quantization: str, device: str | torch.device = "cpu") -> None:
    """Raise a QuantizationError when bitsandbytes cannot run `quantization` on `device`.

    Probes the real kernels on a tiny tensor (bitsandbytes registers its ops per device type),
    so the answer is the installed bitsandbytes' own.
    """
    check_quantization(quantization)
    if quantization == "none":
        return
    require_bitsandbytes()
    import bitsandbytes.functional as bnbf

    dev = torch.device(device)
    if dev.type == "meta":
        raise QuantizationError(f"{quantization} needs real weights; the meta device holds none (materialise the model "
                                f"on cpu or cuda first)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuantizationError(f"device {dev} asked for {quantization} but CUDA is not available; use device='cpu'")
    try:
        probe = torch.linspace(-1, 1, 128, device=dev)
        if quantization == "nf4":
            packed, state = bnbf.quantize_4bit(probe, blocksize=64, quant_type="nf4")
            bnbf.dequantize_4bit(packed, state)
        else:
            bnbf.int8_vectorwise_quant(probe.view(2, 64).to(torch.float16))
    except Exception as exc:
        raise QuantizationError(
            f"bitsandbytes cannot run {quantization} on {dev.type} ({type(exc).__name__}: {exc}); "
            f"use quantization='none' on this device or a CPU/CUDA device"
        ) from exc


def bnb_config(quantization: str, compute_dtype=torch.float32, double_quant: bool = True,
               skip_modules: tuple[str, ...] | list[str] = HEAD_MODULES):
    """A ``transformers.BitsAndBytesConfig`` for `quantization` ("nf4" or "int8").

    nf4: 4-bit NormalFloat, blocksize 64, compute in `compute_dtype`, double quantization of the
    absmax constants (``double_quant``). int8: LLM.int8 (threshold 6.0, int8 weights with a
    per-row fp32 scale). `skip_modules` stay floating point (the task heads by default).
    """
    check_quantization(quantization)
    if quantization == "none":
        raise QuantizationError("quantization='none' has no BitsAndBytesConfig; load the model without one")
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    dt = _as_dtype(compute_dtype)
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dt,
                                  bnb_4bit_use_double_quant=bool(double_quant),
                                  llm_int8_skip_modules=list(skip_modules))
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))


def quantize_model(model: nn.Module, quantization: str, compute_dtype=torch.float32, double_quant: bool = True,
                   device: str | torch.device = "cpu") -> nn.Module:
    """Quantize an in-memory transformers model: save it, reload it with a bitsandbytes config.

    Attention and FFN projections become ``Linear4bit`` / ``Linear8bitLt``; embeddings, norms
    and the task head (`HEAD_MODULES`) stay in `compute_dtype`. Returns a new model (the
    argument is left untouched); ``quantization="none"`` returns `model` cast to the dtype.
    """
    check_quantization(quantization)
    dt = _as_dtype(compute_dtype)
    if quantization == "none":
        return model.to(dt)
    check_device(quantization, device)
    if not hasattr(model, "save_pretrained"):
        raise QuantizationError(f"quantize_model needs a transformers PreTrainedModel, got {type(model).__name__}")
    cfg = bnb_config(quantization, dt, double_quant=double_quant)
    with tempfile.TemporaryDirectory(prefix="fastseq-quant-") as tmp:
        model.save_pretrained(tmp)
        quantized = type(model).from_pretrained(tmp, quantization_config=cfg, device_map={"": str(torch.device(device))},
                                                dtype=dt)
    quantized.eval()
    keep_cpu_layout(quantized)
    if not any(is_bnb_linear(m) for m in quantized.modules()):
        raise QuantizationError(f"{type(model).__name__} has no linear layer bitsandbytes could quantize")
    return quantized


def keep_cpu_layout(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes from repacking 4-bit weights in place on AVX512-BF16 CPUs.

    ``Linear4bit.forward`` in eval mode with a no-grad input converts its weight to a CPU
    inference layout (mutating ``weight.data``); that layout fails for widths not divisible
    by 32 and is not the NF4 layout the fused SCL path dequantizes. Frozen weights must stay
    bit-identical while adapters train, so fastseq turns the conversion off.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def is_bnb_linear(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4")


def quantized_module_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_bnb_linear(m)]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def _output_like_input(_module, args, out):
    if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor) and out.dtype != args[0].dtype:
        return out.to(args[0].dtype)
    return out


def prepare_for_kbit_training(model: nn.Module, norms_fp32: bool = True, activation_checkpointing: bool = False) -> nn.Module:
    """Make a (quantized) backbone ready for adapter training, without PEFT. In place; returns it.

    * freezes every parameter of the base model (an SCL adapter already injected, and its
      trainable head, stay trainable);
    * with `norms_fp32`, casts fp16/bf16 LayerNorm/RMSNorm weights to fp32 (their statistics
      are the part of a half-precision model that training is sensitive to);
    * enables input grads (``enable_input_require_grads``): the embedding output requires grad,
      so activation checkpointing (non-reentrant or reentrant) sees a graph to recompute;
    * with `activation_checkpointing`, turns on the model's own layer checkpointing.
    """
    keep_cpu_layout(model)
    keep = set()
    if getattr(model, "fastseq_adapter", None) is not None:
        from .adapters import scl_parameter_names

        keep = set(scl_parameter_names(model))  # every active SCL adapter's (fedsa-scl has two)
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    if norms_fp32:
        for module in model.modules():
            if not _is_norm(module):
                continue
            cast = False
            for param in module.parameters(recurse=False):
                if param.dtype in (torch.float16, torch.bfloat16):
                    param.data = param.data.float()
                    cast = True
            if cast and not getattr(module, "_fastseq_norm_hook", False):
                # fp32 weights promote the norm's output to fp32; hand the next (half-precision)
                # layer the dtype it got before, so only the normalisation itself runs in fp32.
                module.register_forward_hook(_output_like_input)
                module._fastseq_norm_hook = True
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    else:
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embed is None:
            raise QuantizationError(f"{type(model).__name__} has no input embeddings to enable input grads on")
        embed.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    if activation_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable")
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
