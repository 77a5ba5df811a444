"""Image classification tasks: ``brain-tumor`` / ``image-folder`` (folders of images or a hub
dataset) and ``synthetic-image`` (generated, learnable)."""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Sequence

import torch

from .base import (
    DataError,
    Task,
    TaskData,
    finish_splits,
    load_hub_dataset,
    looks_like_hub_id,
    register_task,
    require_path,
)
from .text_classification import classification_loss, evaluate_classification

logger = logging.getLogger("fastseq.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_TRAIN_DIRS = ("training", "train")
_TEST_DIRS = ("testing", "test")


def _pil():
    try:
        from PIL import Image  # noqa: PLC0415
    except ImportError as e:
        raise DataError("image tasks need Pillow: `pip install pillow`.") from e
    return Image


def _decodes(path: str) -> bool:
    """True when the file fully decodes (JPEGs are decoded at reduced size: fast)."""
    Image = _pil()
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (64, 64))
            img.load()
        return True
    except Exception:  # noqa: BLE001 - any decoder error means "skip this file"
        return False


def _processor_size(processor: Any, default: int) -> tuple[int, int]:
    """(height, width) an image processor resizes to (dict or SizeDict ``size``), else default."""
    size = getattr(processor, "size", None)
    if isinstance(size, int):
        return size, size
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    if size is not None:
        if get("height") and get("width"):
            return int(get("height")), int(get("width"))
        if get("shortest_edge"):
            return int(get("shortest_edge")), int(get("shortest_edge"))
    return default, default


def model_image_size(model: Any) -> tuple[int, int] | None:
    """(height, width) from ``config.image_size`` or ``config.vision_config.image_size``."""
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "image_size", None)
    if size is None:
        size = getattr(getattr(cfg, "vision_config", None), "image_size", None)
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None


class ImageClassificationTask(Task):
    kind = "image-classification"
    processor_use = "optional"  # without one, collate resizes to the model's input size
    metric_for_selection = "accuracy"
    greater_is_better = True

    def __init__(self, image_size: int = 224, **options: Any) -> None:
        super().__init__(**options)
        if image_size < 4:
            raise DataError(f"image_size must be >= 4, got {image_size}.")
        self.image_size = image_size

    def prepare_batch(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Resize ``pixel_values`` (bilinear) to the model's ``image_size`` when they differ, so
        that ``processor=None`` batches fit any ViT/SigLIP config."""
        size = model_image_size(model)
        pv = batch.get("pixel_values")
        if size is not None and pv is not None and tuple(pv.shape[-2:]) != size:
            batch = dict(batch)
            batch["pixel_values"] = torch.nn.functional.interpolate(pv, size=size, mode="bilinear",
                                                                    align_corners=False)
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return classification_loss(model, self.prepare_batch(model, batch))

    def evaluate(self, model: torch.nn.Module, examples: Sequence[dict], processor: Any,
                 batch_size: int = 16) -> dict[str, float]:
        return evaluate_classification(self, model, examples, processor, batch_size)


@register_task("image-folder")
@register_task("brain-tumor")
class ImageFolderTask(ImageClassificationTask):
    """Images in class folders. Layouts: ``Training/<class>/*`` + ``Testing/<class>/*``
    (Kaggle brain-tumor MRI; also ``train``/``test``), or ``<class>/*`` with a seeded 10%
    test split; or a hub id whose rows have ``image`` and ``label``. Files that do not decode
    are skipped, counted in ``TaskData.info["skipped_images"]`` and reported in one warning.
    ``collate`` uses the image processor (SigLIP/ViT) or, with ``processor=None``, resizes to
    ``image_size`` and normalizes with mean 0.5 / std 0.5."""

    name = "brain-tumor"

    def load(self, data_path: str | None = None, seed: int = 0, max_examples: int | None = None) -> TaskData:
        if data_path is None:
            raise DataError(
                f"task {self.name!r} has no offline copy: download the Kaggle dataset "
                "masoudnickparvar/brain-tumor-mri-dataset (Training/ and Testing/ folders) and pass "
                "data_path= its folder, or any folder of <class>/* images, or a hub id."
            )
        source = str(data_path)
        if looks_like_hub_id(source):
            return self._load_hub(source, seed, max_examples)
        root = require_path(source, "folder")
        if not os.path.isdir(root):
            raise DataError(f"{root} is a file; pass a folder laid out as Training/<class>/* or <class>/*.")
        subdirs = {d.lower(): d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))}
        train_dir = next((subdirs[d] for d in _TRAIN_DIRS if d in subdirs), None)
        test_dir = next((subdirs[d] for d in _TEST_DIRS if d in subdirs), None)
        skipped: list[str] = []
        if train_dir is not None:
            train_classes = self._classes(os.path.join(root, train_dir))
            test_classes = self._classes(os.path.join(root, test_dir)) if test_dir else []
            names = sorted(set(train_classes) | set(test_classes))
            train = self._scan(os.path.join(root, train_dir), names, skipped)
            test = self._scan(os.path.join(root, test_dir), names, skipped) if test_dir else None
        else:
            names = self._classes(root)
            train, test = self._scan(root, names, skipped), None
        if skipped:
            logger.warning("%s: skipped %d image file(s) that could not be decoded (e.g. %s).",
                           root, len(skipped), skipped[0])
        train, test = finish_splits(train, test, seed, max_examples, root)
        return TaskData(train, test, [e["label"] for e in train], names,
                        {"source": root, "skipped_images": len(skipped), "skipped_files": skipped},
                        test_partition_keys=[e["label"] for e in test])

    @staticmethod
    def _classes(folder: str) -> list[str]:
        names = sorted(d for d in os.listdir(folder)
                       if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))
        if not names:
            raise DataError(f"{folder}: no class folders found; expected <class>/<image files>.")
        return names

    @staticmethod
    def _scan(folder: str, names: list[str], skipped: list[str]) -> list[dict]:
        out = []
        for label, cls in enumerate(names):
            cdir = os.path.join(folder, cls)
            if not os.path.isdir(cdir):
                continue
            for f in sorted(os.listdir(cdir)):
                path = os.path.join(cdir, f)
                if not f.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isfile(path):
                    continue
                if _decodes(path):
                    out.append({"image": path, "label": label})
                else:
                    skipped.append(path)
        return out

    def _load_hub(self, hub_id: str, seed: int, max_examples: int | None) -> TaskData:
        splits = load_hub_dataset(hub_id)
        if "train" not in splits or not splits["train"]:
            raise DataError(f"{hub_id}: no non-empty 'train' split (splits: {sorted(splits)}).")
        found = list(splits["train"][0].keys())
        if "image" not in found or "label" not in found:
            raise DataError(f"{hub_id}: missing column(s); columns found: {found}; expected: ['image', 'label'].")
        convert = lambda rows: [{"image": r["image"], "label": int(r["label"])} for r in rows]  # noqa: E731
        train = convert(splits["train"])
        test = convert(splits["test"]) if "test" in splits else None
        names = [str(i) for i in range(1 + max(e["label"] for e in train + (test or [])))]
        train, test = finish_splits(train, test, seed, max_examples, hub_id)
        return TaskData(train, test, [e["label"] for e in train], names, {"source": hub_id, "skipped_images": 0},
                        test_partition_keys=[e["label"] for e in test])

    def _open(self, image: Any):
        Image = _pil()
        if isinstance(image, str):
            try:
                with Image.open(image) as img:
                    return img.convert("RGB")
            except Exception as e:  # noqa: BLE001
                raise DataError(f"could not decode image {image!r} ({e}); remove or replace the file.") from e
        if hasattr(image, "convert"):
            return image.convert("RGB")
        raise DataError(f"unsupported image value of type {type(image).__name__}; expected a path or a PIL image.")

    def collate(self, examples: Sequence[dict], processor: Any) -> dict[str, torch.Tensor]:
        if not examples:
            raise DataError("collate() got an empty list of examples.")
        images = [self._open(e["image"]) for e in examples]
        if processor is not None:
            pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        else:
            import numpy as np  # noqa: PLC0415

            Image = _pil()
            arrays = [np.asarray(img.resize((self.image_size, self.image_size), Image.BILINEAR), dtype=np.float32)
                      for img in images]
            pixel_values = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
            pixel_values = (pixel_values - 0.5) / 0.5
        return {"pixel_values": pixel_values.float(),
                "labels": torch.tensor([int(e["label"]) for e in examples], dtype=torch.long)}


@register_task("synthetic-image")
class SyntheticImageTask(ImageClassificationTask):
    """Generated images: the label (0..3) is the quadrant (top-left, top-right, bottom-left,
    bottom-right) that is bright, on Gaussian noise. ``image_size`` (32), ``num_examples``
    (800), ``noise`` (0.5). The processor is ignored except for its target size, to which the
    images are resized. Partition key: the label."""

    name = "synthetic-image"
    NUM_CLASSES = 4

    def __init__(self, image_size: int = 32, num_examples: int = 800, noise: float = 0.5,
                 **options: Any) -> None:
        super().__init__(image_size=image_size, **options)
        self.num_examples, self.noise = num_examples, noise

    def load(self, data_path: str | None = None, seed: int = 0, max_examples: int | None = None) -> TaskData:
        if data_path is not None:
            raise DataError("the synthetic-image task generates its data; do not pass data_path.")
        n = self.num_examples if max_examples is None else min(self.num_examples, max_examples)
        g = torch.Generator().manual_seed(seed)
        s, h = self.image_size, self.image_size // 2
        examples = []
        for i in range(n):
            label = i % self.NUM_CLASSES
            img = torch.randn(3, s, s, generator=g) * self.noise - 0.5
            r, c = divmod(label, 2)
            img[:, r * h:(r + 1) * h, c * h:(c + 1) * h] += 1.5
            examples.append({"pixel_values": img, "label": label})
        random.Random(seed).shuffle(examples)
        train, test = finish_splits(examples, None, seed, None, "synthetic-image")
        names = ["top_left", "top_right", "bottom_left", "bottom_right"]
        return TaskData(train, test, [e["label"] for e in train], names, {"source": "generated"},
                        test_partition_keys=[e["label"] for e in test])

    def collate(self, examples: Sequence[dict], processor: Any = None) -> dict[str, torch.Tensor]:
        if not examples:
            raise DataError("collate() got an empty list of examples.")
        pixel_values = torch.stack([e["pixel_values"] for e in examples]).float()
        if processor is not None:
            size = _processor_size(processor, self.image_size)
            if tuple(pixel_values.shape[-2:]) != size:
                pixel_values = torch.nn.functional.interpolate(pixel_values, size=size, mode="bilinear",
                                                               align_corners=False)
        return {"pixel_values": pixel_values,
                "labels": torch.tensor([int(e["label"]) for e in examples], dtype=torch.long)}
