#!/usr/bin/env python
# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune UperNet with a Focal Transformer backbone for semantic segmentation with the 🤗 Trainer.

Modelled on transformers' `examples/pytorch/semantic-segmentation/run_semantic_segmentation.py`:

    python examples/run_semantic_segmentation.py --model_name_or_path focal-tiny-converted \\
        --train_dir ade/train --validation_dir ade/val --reduce_labels --num_labels 150 \\
        --output_dir upernet-focal-tiny-ade --do_train --do_eval --crop_size 512 \\
        --per_device_train_batch_size 2 --learning_rate 6e-5 --weight_decay 0.01 --max_steps 160000 \\
        --lr_scheduler_type polynomial --warmup_steps 1500 --eval_strategy steps --eval_steps 16000

Data: `--dataset_name` (a Hub or local dataset with an image column and a segmentation-map column, e.g. ADE20K in
the `scene_parse_150` layout: `image`, `annotation`) or `--train_dir`/`--validation_dir` (folders holding `images/`
and `masks/`, paired by file name without extension). Segmentation maps are single-channel images of class indices;
255 is ignored. `--reduce_labels` is ADE20K's convention: 0 ("other") is ignored and the classes shift down by one.
Classes: `--id2label_file` (JSON `{"0": "wall", ...}`) or `--num_labels`.
Model: `--model_name_or_path` is a converted classification folder (its weights load into the backbone; UperNet's
heads and the backbone's per-stage norms start fresh) or a saved UperNet-Focal folder (trained further or evaluated);
`--model_preset` (e.g. `focal-tiny`) trains the backbone from scratch. `--config_overrides` (JSON) changes the
backbone's config, e.g. '{"drop_path_rate": 0.3}'.
Training augmentation (as mmsegmentation's ADE20K pipeline): random rescale (0.5-2x of `--base_size`), random crop
to `--crop_size` (redrawn while one class covers `--cat_max_ratio` of it; padded with ignored pixels), horizontal
flip, photometric distortion. Evaluation resizes images and
maps to `--eval_size` (default: the crop size) and reports mean IoU, mean and overall accuracy and per-class IoU, with
`evaluate`'s `mean_iou` definition (dataset-wide intersections and unions), accumulated batch by batch: no Hub
access and no per-pixel buffers.
The output folder (model, config, image processor) loads with `pipeline("image-segmentation", model=folder)` or
`UperNetForSemanticSegmentation.from_pretrained(folder)` once `focal_hf` is imported. A non-empty `--output_dir` is
refused unless the run continues it (`--resume_from_checkpoint latest` or a checkpoint path) or
`--overwrite_output_dir` trains anew into it (as in `run_image_classification.py`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    set_seed,
)
from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

import focal_hf
from focal_hf.dense import ALL_STAGES, enable_gradient_checkpointing, focal_backbone_config, load_backbone_weights
from focal_hf.folders import set_default_modes
from focal_hf.training import FocalTrainingArguments, prepare_output_dir

logger = logging.getLogger(__name__)
IGNORE_INDEX = 255
LABEL_COLUMN_CANDIDATES = ("annotation", "label", "labels", "mask", "segmentation", "semantic_map", "seg_map")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset name or path (`datasets.load_dataset`)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_dir: str | None = field(default=None, metadata={"help": "Training folder with images/ and masks/."})
    validation_dir: str | None = field(default=None, metadata={"help": "Validation folder, same layout."})
    train_val_split: float = field(default=0.15, metadata={"help": "Validation fraction when there is no split."})
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str | None = field(
        default=None,
        metadata={"help": f"Column holding the segmentation maps (default: the first of {LABEL_COLUMN_CANDIDATES})."},
    )
    id2label_file: str | None = field(default=None, metadata={"help": 'JSON file of class names: {"0": "wall", ...}.'})
    num_labels: int | None = field(default=None, metadata={"help": "Number of classes, if no --id2label_file."})
    reduce_labels: bool = field(
        default=False, metadata={"help": "Ignore class 0 and shift the others down by one (ADE20K's convention)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})
    crop_size: int = field(default=512, metadata={"help": "Side of the square training crops."})
    base_size: int | None = field(
        default=None, metadata={"help": "Shorter image side at scale 1 of the random rescale (default: crop size)."}
    )
    min_scale: float = field(default=0.5, metadata={"help": "Smallest random rescale factor."})
    max_scale: float = field(default=2.0, metadata={"help": "Largest random rescale factor."})
    cat_max_ratio: float = field(
        default=0.75, metadata={"help": "Redraw crops where one class covers this fraction or more (1: off)."}
    )
    horizontal_flip: bool = field(default=True, metadata={"help": "Flip training examples horizontally at random."})
    photometric_distortion: bool = field(
        default=True, metadata={"help": "Random brightness, contrast, saturation and hue changes in training."}
    )
    eval_size: int | None = field(default=None, metadata={"help": "Evaluation resize (square; default: crop size)."})

    def __post_init__(self):
        if self.dataset_name is None and self.train_dir is None:
            raise ValueError("Give the data: --dataset_name, or --train_dir (and optionally --validation_dir).")
        if self.dataset_name is not None and self.train_dir is not None:
            raise ValueError("Give either --dataset_name or --train_dir/--validation_dir, not both.")
        for folder in (self.train_dir, self.validation_dir):
            if folder is not None and not Path(folder).is_dir():
                raise ValueError(f"Data folder {folder!r} does not exist.")
        if (self.id2label_file is None) == (self.num_labels is None):
            raise ValueError('Give the classes: either --id2label_file (JSON {"0": "wall", ...}) or --num_labels.')
        if self.num_labels is not None and self.num_labels < 2:
            raise ValueError(f"--num_labels must be at least 2, got {self.num_labels}.")
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"Need 0 < --min_scale <= --max_scale, got {self.min_scale} and {self.max_scale}.")
        for name in ("crop_size", "base_size", "eval_size"):
            value = getattr(self, name)
            if value is not None and value < 32:
                raise ValueError(f"--{name} must be at least 32 pixels (the backbone's total stride), got {value}.")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"--cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}.")
        if not 0 < self.train_val_split < 1:
            raise ValueError(f"--train_val_split must be in (0, 1), got {self.train_val_split}.")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A converted classification folder, or a saved UperNet-Focal folder."}
    )
    model_preset: str | None = field(
        default=None, metadata={"help": f"Train from scratch: one of {sorted(focal_hf.original.OFFICIAL_MODELS)}."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "JSON of backbone config attributes, e.g. '{\"drop_path_rate\": 0.3}'."}
    )
    upernet_hidden_size: int = field(default=512, metadata={"help": "Channels of UperNet's decode head."})
    use_auxiliary_head: bool = field(default=True, metadata={"help": "Add UperNet's auxiliary FCN head (training)."})
    auxiliary_channels: int = field(default=256, metadata={"help": "Channels of the auxiliary head."})
    auxiliary_loss_weight: float = field(default=0.4, metadata={"help": "Weight of the auxiliary head's loss."})
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor name or folder."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and datasets are kept."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model."})
    ignore_mismatched_sizes: bool = field(
        default=True, metadata={"help": "For a saved UperNet folder: replace classifiers of another class count."}
    )

    def __post_init__(self):
        if (self.model_name_or_path is None) == (self.model_preset is None):
            raise ValueError("Give exactly one of --model_name_or_path and --model_preset.")
        if self.config_overrides is not None:
            try:
                overrides = json.loads(self.config_overrides)
            except json.JSONDecodeError as error:
                raise ValueError(f"--config_overrides is not valid JSON: {error}") from error
            if not isinstance(overrides, dict):
                raise ValueError(f"--config_overrides must be a JSON object, got {self.config_overrides!r}.")


# --------------------------------------------------------------------------------------------------- data
def folder_dataset(folder: str | os.PathLike) -> datasets.Dataset:
    """A dataset with `image` and `annotation` columns from `folder/images/*` and `folder/masks/*` (or
    `folder/annotations/*`), paired by file name without extension."""
    folder = Path(folder)
    mask_folder = next((folder / name for name in ("masks", "annotations") if (folder / name).is_dir()), None)
    if not (folder / "images").is_dir() or mask_folder is None:
        raise ValueError(f"{str(folder)!r} must hold an images/ folder and a masks/ (or annotations/) folder.")

    def files(path: Path) -> dict[str, Path]:
        return {file.stem: file for file in sorted(path.iterdir()) if file.suffix.lower() in IMAGE_SUFFIXES}

    images, masks = files(folder / "images"), files(mask_folder)
    unpaired = sorted(set(images) ^ set(masks))
    if unpaired:
        raise ValueError(
            f"In {str(folder)!r}, these files have no image or no mask of the same name: {unpaired[:10]}"
            + (f" (and {len(unpaired) - 10} more)" if len(unpaired) > 10 else "")
        )
    if not images:
        raise ValueError(f"No images in {str(folder / 'images')!r} (looked for {sorted(IMAGE_SUFFIXES)}).")
    stems = sorted(images)
    dataset = datasets.Dataset.from_dict(
        {"image": [str(images[stem]) for stem in stems], "annotation": [str(masks[stem]) for stem in stems]}
    )
    return dataset.cast_column("image", datasets.Image()).cast_column("annotation", datasets.Image())


def load_data(data_args: DataTrainingArguments, cache_dir: str | None) -> tuple[datasets.DatasetDict, str]:
    """The dataset with `train` and `validation` splits, and the name of its segmentation-map column."""
    if data_args.dataset_name is not None:
        dataset = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    else:
        dataset = datasets.DatasetDict({"train": folder_dataset(data_args.train_dir)})
        if data_args.validation_dir is not None:
            dataset["validation"] = folder_dataset(data_args.validation_dir)
    if "train" not in dataset:
        raise ValueError(f"The dataset has no 'train' split (it has {list(dataset)}).")
    columns = dataset["train"].column_names
    if data_args.image_column_name not in columns:
        raise ValueError(
            f"No image column {data_args.image_column_name!r} in the dataset (columns: {columns}); "
            f"pass --image_column_name."
        )
    label_column = data_args.label_column_name
    if label_column is None:
        label_column = next((name for name in LABEL_COLUMN_CANDIDATES if name in columns), None)
    if label_column not in columns:
        raise ValueError(
            f"No segmentation-map column {label_column or LABEL_COLUMN_CANDIDATES} in the dataset (columns: "
            f"{columns}); pass --label_column_name."
        )
    if "validation" not in dataset:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=0)
        dataset["train"], dataset["validation"] = split["train"], split["test"]
    return dataset, label_column


def load_id2label(data_args: DataTrainingArguments) -> dict[int, str]:
    """Class names by index, from `--id2label_file` or numbered after `--num_labels`."""
    if data_args.id2label_file is None:
        return {index: f"class_{index}" for index in range(data_args.num_labels)}
    with open(data_args.id2label_file, encoding="utf-8") as handle:
        raw = json.load(handle)
    try:
        id2label = {int(index): str(name) for index, name in raw.items()}
    except (AttributeError, ValueError) as error:
        raise ValueError(f'{data_args.id2label_file!r} must hold a JSON object {{"0": "wall", ...}}.') from error
    if sorted(id2label) != list(range(len(id2label))) or len(id2label) < 2:
        raise ValueError(f"{data_args.id2label_file!r} must number at least two classes 0, 1, ... without gaps.")
    return id2label


# -------------------------------------------------------------------------------------------------- model
def load_model(model_args: ModelArguments, data_args: DataTrainingArguments, id2label: dict[int, str]):
    """UperNet with a Focal backbone for `id2label`, and its image processor."""
    label2id = {name: index for index, name in id2label.items()}
    overrides = json.loads(model_args.config_overrides) if model_args.config_overrides else {}
    common = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision}
    head = {
        "hidden_size": model_args.upernet_hidden_size,
        "use_auxiliary_head": model_args.use_auxiliary_head,
        "auxiliary_channels": model_args.auxiliary_channels,
        "auxiliary_loss_weight": model_args.auxiliary_loss_weight,
        "loss_ignore_index": IGNORE_INDEX,
        "num_labels": len(id2label),
        "id2label": id2label,
        "label2id": label2id,
    }
    source = model_args.model_name_or_path
    if source is not None and AutoConfig.from_pretrained(source, **common).model_type == "upernet":
        if overrides:
            raise ValueError("--config_overrides applies to a new backbone, not to a saved UperNet folder.")
        model = UperNetForSemanticSegmentation.from_pretrained(
            source,
            num_labels=len(id2label),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **common,
        )
        if not isinstance(model.config.backbone_config, focal_hf.FocalConfig):
            raise ValueError(f"{source!r} is a UperNet whose backbone is not a Focal Transformer.")
    elif source is not None:  # a converted classification folder (raises a ValueError if it is not Focal)
        backbone_config = focal_backbone_config(source, out_features=ALL_STAGES, **overrides, **common)
        model = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone_config, **head))
        load_backbone_weights(model, source, **common)
    else:
        backbone_config = focal_hf.official_config(model_args.model_preset, out_features=list(ALL_STAGES), **overrides)
        backbone_config.num_labels = 2  # the classifier's 1000 ImageNet labels have no place in a backbone
        model = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone_config, **head))

    eval_size = data_args.eval_size or data_args.crop_size
    if model_args.image_processor_name is not None:
        image_processor = AutoImageProcessor.from_pretrained(model_args.image_processor_name, **common)
        image_processor.do_reduce_labels = data_args.reduce_labels
    else:  # ImageNet normalisation as the backbone was trained; resize to the evaluation size, maps by nearest
        image_processor = SegformerImageProcessorPil(
            size={"height": eval_size, "width": eval_size}, do_reduce_labels=data_args.reduce_labels
        )
    return model, image_processor


# ------------------------------------------------------------------------------------------- augmentation
class AugmentationSeed:
    """Seeds each training example's augmentation from (seed, epoch, example index), so a resumed run augments
    exactly as an uninterrupted one. The training loop sets `epoch`."""

    def __init__(self, seed: int):
        self.seed, self.epoch = seed, 0

    def rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}-{self.epoch}-{index}")


class EpochCallback(TrainerCallback):
    """Tells the augmentation which epoch the Trainer is in."""

    def __init__(self, augmentation_seed: AugmentationSeed):
        self.augmentation_seed = augmentation_seed

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.augmentation_seed.epoch = int(state.epoch or 0)


def segmentation_map(mask) -> Image.Image:
    """A segmentation map (PIL image or array of class indices) as a single-channel PIL image ("L" or "I")."""
    array = np.asarray(mask)
    if array.ndim == 3 and array.shape[-1] in (3, 4) and (array[..., :3] == array[..., :1]).all():
        array = array[..., 0]  # a grey map stored as RGB(A)
    if array.ndim != 2:
        raise ValueError(
            f"Segmentation maps must be single-channel images of class indices; got an array of shape {array.shape} "
            f"(colour-coded maps must first be converted to indices)."
        )
    return Image.fromarray(array if array.dtype == np.uint8 else array.astype(np.int32))  # mode "L" or "I"


def random_rescale(image: Image.Image, mask: Image.Image, base_size: int, scale_range, rng: random.Random):
    """Rescale so that the shorter side is `base_size * r` and the longer at most `4 * base_size * r`, `r` drawn
    uniformly from `scale_range` (mmsegmentation's `Resize(img_scale=(4 * base, base), ratio_range=...)`)."""
    ratio = rng.uniform(*scale_range)
    width, height = image.size
    scale = min(ratio * base_size / min(width, height), 4 * ratio * base_size / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.BILINEAR), mask.resize(size, Image.NEAREST)


def random_crop(
    image: Image.Image,
    mask: Image.Image,
    crop_size: int,
    rng: random.Random,
    cat_max_ratio: float = 1.0,
    ignored: tuple[int, ...] = (IGNORE_INDEX,),
):
    """A random `crop_size` square; where the image is smaller, padded at the right and bottom (image with 0, map with
    the ignore index). As mmsegmentation's `RandomCrop`, up to 10 draws look for a crop where no single class covers
    `cat_max_ratio` or more of the labelled pixels (the `ignored` values do not count); 1 disables that."""
    width, height = image.size
    mask_array = np.asarray(mask)
    for _ in range(10):
        left, top = rng.randint(0, max(width - crop_size, 0)), rng.randint(0, max(height - crop_size, 0))
        if cat_max_ratio >= 1:
            break
        labels, counts = np.unique(mask_array[top : top + crop_size, left : left + crop_size], return_counts=True)
        counts = counts[~np.isin(labels, ignored)]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    box = (left, top, left + crop_size, top + crop_size)  # PIL fills the part outside the image with 0
    image, mask = image.crop(box), mask.crop(box)
    if width - left < crop_size or height - top < crop_size:
        padding = np.ones((crop_size, crop_size), dtype=bool)
        padding[: height - top, : width - left] = False
        cropped = np.asarray(mask).copy()
        cropped[padding] = IGNORE_INDEX
        mask = Image.fromarray(cropped)
    return image, mask


def photometric_distortion(image: Image.Image, rng: random.Random) -> Image.Image:
    """mmsegmentation's `PhotoMetricDistortion`: each with probability 1/2, brightness +-32, contrast x[0.5, 1.5]
    (before or after the next two), saturation x[0.5, 1.5], hue +-18 degrees of 180."""

    def contrast(array):
        return array * rng.uniform(0.5, 1.5) if rng.random() < 0.5 else array

    array = np.asarray(image, dtype=np.float32)
    if rng.random() < 0.5:
        array = array + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    if contrast_first:
        array = contrast(array)
    hsv = np.asarray(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).convert("HSV"), dtype=np.float32)
    if rng.random() < 0.5:
        hsv[..., 1] = hsv[..., 1] * rng.uniform(0.5, 1.5)
    if rng.random() < 0.5:
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-18, 18) * 256 / 180) % 256
    channels = [Image.fromarray(channel) for channel in np.clip(hsv, 0, 255).astype(np.uint8).transpose(2, 0, 1)]
    array = np.asarray(Image.merge("HSV", channels).convert("RGB"), dtype=np.float32)
    if not contrast_first:
        array = contrast(array)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def check_labels(labels: list[torch.Tensor], num_labels: int, reduce_labels: bool) -> None:
    """Raise a `ValueError` unless every label is a class index below `num_labels` or the ignore index."""
    for label_map in labels:
        valid = label_map[label_map != IGNORE_INDEX]
        if valid.numel() and (valid.min() < 0 or valid.max() >= num_labels):
            raise ValueError(
                f"A segmentation map holds class {int(valid.max() if valid.max() >= num_labels else valid.min())}"
                f"{' (after --reduce_labels)' if reduce_labels else ''}, but the model has {num_labels} classes "
                f"(0 to {num_labels - 1}; {IGNORE_INDEX} is ignored): check --num_labels / --id2label_file and "
                f"--reduce_labels."
            )


def make_transforms(
    image_processor,
    data_args: DataTrainingArguments,
    label_column: str,
    augmentation_seed: AugmentationSeed,
    num_labels: int,
):
    """Training (rescale, crop, flip, photometric distortion, then the processor's normalisation and label reduction)
    and evaluation (the processor: resize, normalise) transforms; both check the labels against `num_labels`. The
    training split needs an `example_index` column."""
    image_column = data_args.image_column_name
    base_size = data_args.base_size or data_args.crop_size
    ignored = (IGNORE_INDEX, 0) if data_args.reduce_labels else (IGNORE_INDEX,)  # labels before the reduction

    def train_transforms(batch):
        images, maps = [], []
        for image, mask, index in zip(batch[image_column], batch[label_column], batch["example_index"]):
            rng = augmentation_seed.rng(index)
            image, mask = image.convert("RGB"), segmentation_map(mask)
            if image.size != mask.size:
                raise ValueError(f"Example {index}: image {image.size} and segmentation map {mask.size} differ.")
            image, mask = random_rescale(image, mask, base_size, (data_args.min_scale, data_args.max_scale), rng)
            image, mask = random_crop(image, mask, data_args.crop_size, rng, data_args.cat_max_ratio, ignored)
            if data_args.horizontal_flip and rng.random() < 0.5:
                image, mask = image.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
            if data_args.photometric_distortion:
                image = photometric_distortion(image, rng)
            images.append(image)
            maps.append(np.array(mask))  # writable: the processor reduces labels in place
        encoded = image_processor(images, segmentation_maps=maps, do_resize=False, return_tensors="pt")
        check_labels(encoded["labels"], num_labels, data_args.reduce_labels)
        return {"pixel_values": list(encoded["pixel_values"]), "labels": list(encoded["labels"])}

    def eval_transforms(batch):
        images = [image.convert("RGB") for image in batch[image_column]]
        maps = [np.array(segmentation_map(mask)) for mask in batch[label_column]]
        encoded = image_processor(images, segmentation_maps=maps, return_tensors="pt")
        check_labels(encoded["labels"], num_labels, data_args.reduce_labels)
        return {"pixel_values": list(encoded["pixel_values"]), "labels": list(encoded["labels"])}

    return train_transforms, eval_transforms


def collate_fn(examples):
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.stack([example["labels"] for example in examples]).long(),
    }


# ------------------------------------------------------------------------------------------------- metric
class MeanIoU:
    """Mean IoU as `evaluate`'s `mean_iou` defines it, accumulated batch by batch: per class, the intersection and
    union areas (and the predicted and true areas) are summed over the whole dataset, pixels labelled
    `ignore_index` left out; IoU = intersection / union and accuracy = intersection / true area per class, their
    means over the classes where they are defined (`nan` elsewhere), overall accuracy = all intersections / all
    labelled pixels. Works offline and in constant memory, unlike buffering every prediction."""

    def __init__(self, num_labels: int, ignore_index: int = IGNORE_INDEX):
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}.")
        self.num_labels, self.ignore_index = num_labels, ignore_index
        self.reset()

    def reset(self) -> None:
        self.area_intersect = np.zeros(self.num_labels, dtype=np.int64)
        self.area_pred_label = np.zeros(self.num_labels, dtype=np.int64)
        self.area_label = np.zeros(self.num_labels, dtype=np.int64)

    def update(self, predictions, references) -> None:
        """Add a batch: predicted and true class maps of the same shape (arrays or tensors)."""
        predictions = predictions.cpu().numpy() if isinstance(predictions, torch.Tensor) else np.asarray(predictions)
        references = references.cpu().numpy() if isinstance(references, torch.Tensor) else np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"Predictions {predictions.shape} and references {references.shape} differ in shape.")
        keep = references != self.ignore_index
        predictions, references = predictions[keep].astype(np.int64), references[keep].astype(np.int64)
        in_range = (references >= 0) & (references < self.num_labels)  # as np.histogram's range does
        hits = predictions[(predictions == references) & in_range]
        self.area_intersect += np.bincount(hits, minlength=self.num_labels)[: self.num_labels]
        valid_predictions = predictions[(predictions >= 0) & (predictions < self.num_labels)]
        self.area_pred_label += np.bincount(valid_predictions, minlength=self.num_labels)[: self.num_labels]
        self.area_label += np.bincount(references[in_range], minlength=self.num_labels)[: self.num_labels]

    def compute(self) -> dict:
        """`mean_iou`, `mean_accuracy`, `overall_accuracy` (floats) and `per_category_iou`, `per_category_accuracy`."""
        area_union = self.area_pred_label + self.area_label - self.area_intersect
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = self.area_intersect / area_union
            accuracy = self.area_intersect / self.area_label
            overall = self.area_intersect.sum() / self.area_label.sum()
        mean_iou = float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan")
        mean_accuracy = float(np.nanmean(accuracy)) if not np.isnan(accuracy).all() else float("nan")
        return {
            "mean_iou": mean_iou,
            "mean_accuracy": mean_accuracy,
            "overall_accuracy": float(overall),
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
        }


def make_compute_metrics(id2label: dict[int, str]):
    """A Trainer `compute_metrics` for `batch_eval_metrics=True`: accumulates each batch, reports at the last."""
    metric = MeanIoU(len(id2label))

    def compute_metrics(prediction, compute_result: bool = True) -> dict:
        metric.update(prediction.predictions, prediction.label_ids)
        if not compute_result:
            return {}
        result = metric.compute()
        metric.reset()
        metrics = {name: result[name] for name in ("mean_iou", "mean_accuracy", "overall_accuracy")}
        for index, name in id2label.items():
            metrics[f"iou_{name}"] = float(result["per_category_iou"][index])
            metrics[f"accuracy_{name}"] = float(result["per_category_accuracy"][index])
        return metrics

    return compute_metrics


def predicted_classes(logits, labels):
    """Keep only the argmax of the (full-resolution) logits for the metric."""
    return logits.argmax(dim=1)


# --------------------------------------------------------------------------------------------------- main
def main(args: list[str] | None = None) -> dict:
    """Run the example; returns the final metrics."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, FocalTrainingArguments))
    if args is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)

    if training_args.do_train and training_args.per_device_train_batch_size < 2:
        raise ValueError(
            "UperNet's BatchNorm layers cannot train on single images: use --per_device_train_batch_size 2 or more."
        )
    prepare_output_dir(training_args)
    dataset, label_column = load_data(data_args, model_args.cache_dir)
    id2label = load_id2label(data_args)
    model, image_processor = load_model(model_args, data_args, id2label)
    if getattr(training_args, "activation_checkpointing", None) or training_args.gradient_checkpointing:
        # the Trainer would enable checkpointing on the whole model, which UperNet refuses: checkpoint the backbone
        checkpointing_kwargs = getattr(training_args, "activation_checkpointing_kwargs", None)
        enable_gradient_checkpointing(model, checkpointing_kwargs or training_args.gradient_checkpointing_kwargs)
        for name in ("activation_checkpointing", "gradient_checkpointing"):  # the new name and its deprecated alias
            if hasattr(training_args, name):
                setattr(training_args, name, False)

    augmentation_seed = AugmentationSeed(training_args.seed)
    train_transforms, eval_transforms = make_transforms(
        image_processor, data_args, label_column, augmentation_seed, num_labels=len(id2label)
    )
    for split, wanted, limit, transform in (
        ("train", training_args.do_train, data_args.max_train_samples, train_transforms),
        ("validation", training_args.do_eval, data_args.max_eval_samples, eval_transforms),
    ):
        if not wanted:
            continue
        if limit is not None:
            dataset[split] = (
                dataset[split].shuffle(seed=training_args.seed).select(range(min(limit, len(dataset[split]))))
            )
        if split == "train":
            size = len(dataset[split])
            if training_args.world_size == 1 and size % training_args.per_device_train_batch_size == 1 and size > 1:
                # a last batch of one image would fail in UperNet's BatchNorm: leave one example out
                logger.info("Leaving one of %d training examples out so that no batch holds a single image.", size)
                dataset[split] = dataset[split].select(range(size - 1))
            dataset[split] = dataset[split].add_column("example_index", list(range(len(dataset[split]))))
        dataset[split].set_transform(transform)

    training_args.remove_unused_columns = False  # the transforms need the image and map columns
    training_args.batch_eval_metrics = True  # accumulate the metric batch by batch instead of buffering all logits
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"] if training_args.do_train else None,
        eval_dataset=dataset["validation"] if training_args.do_eval else None,
        compute_metrics=make_compute_metrics(id2label),
        preprocess_logits_for_metrics=predicted_classes,
        processing_class=image_processor,
        data_collator=collate_fn,
        callbacks=[EpochCallback(augmentation_seed)],
    )
    metrics = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # model.safetensors, config.json and preprocessor_config.json
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        if trainer.is_world_process_zero():
            set_default_modes(training_args.output_dir)  # safetensors writes 0600 files
        metrics.update(result.metrics)
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    if training_args.push_to_hub:
        trainer.push_to_hub(finetuned_from=model_args.model_name_or_path, tasks="image-segmentation")
    return metrics


if __name__ == "__main__":
    main()
