#!/usr/bin/env python
# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune (or train from scratch) a Focal Transformer for image classification with the 🤗 Trainer.

Modelled on transformers' `examples/pytorch/image-classification/run_image_classification.py`:

    python examples/run_image_classification.py --model_name_or_path focal-tiny \\
        --train_dir my_images/train --validation_dir my_images/val --output_dir focal-tiny-finetuned \\
        --do_train --do_eval --num_train_epochs 5 --learning_rate 5e-5 --eval_strategy epoch --save_strategy epoch \\
        --load_best_model_at_end --metric_for_best_model accuracy

Data: `--dataset_name` (any Hub/local image-classification dataset with an image and a ClassLabel column) or
`--train_dir`/`--validation_dir` (folders of `<label>/<image>` files, read with `datasets`' `imagefolder`).
Model: `--model_name_or_path` (a converted folder or Hub id) or, from scratch, `--model_preset` (an official name,
e.g. `focal-tiny`) / `--config_name` (a config.json), with `--config_overrides` as JSON.
Sharing: a model card is written to `--output_dir`; `--remote_code` adds the model code for `trust_remote_code=True`
users; `--push_to_hub [--hub_model_id you/name] [--hub_token ...]` checks the credentials before training.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import evaluate
import numpy as np
import torch
import transformers
from huggingface_hub import EvalResult, ModelCard
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    set_seed,
)

import focal_hf
from focal_hf import hub
from focal_hf.folders import set_default_modes
from focal_hf.image_processing_focal import to_8_bit
from focal_hf.training import FocalTrainingArguments, prepare_output_dir

logger = logging.getLogger(__name__)
ACCURACY = str(Path(__file__).resolve().parent / "metrics" / "accuracy")


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset name or path (`datasets.load_dataset`)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_dir: str | None = field(default=None, metadata={"help": "Folder of training images, one folder per label."})
    validation_dir: str | None = field(default=None, metadata={"help": "Folder of validation images, same layout."})
    train_val_split: float = field(default=0.15, metadata={"help": "Validation fraction when there is no split."})
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the labels (a ClassLabel)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})
    crop_scale_min: float = field(default=0.08, metadata={"help": "Smallest area fraction of the random crop."})
    horizontal_flip: bool = field(default=True, metadata={"help": "Flip training images horizontally at random."})

    def __post_init__(self):
        if self.dataset_name is None and self.train_dir is None:
            raise ValueError("Give the data: --dataset_name, or --train_dir (and optionally --validation_dir).")
        for folder in (self.train_dir, self.validation_dir):
            if folder is not None and not Path(folder).is_dir():
                raise ValueError(f"Data folder {folder!r} does not exist.")
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"--crop_scale_min must be in (0, 1], got {self.crop_scale_min}.")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "A converted folder or Hub model id."})
    model_preset: str | None = field(
        default=None, metadata={"help": f"Train from scratch: one of {sorted(focal_hf.original.OFFICIAL_MODELS)}."}
    )
    config_name: str | None = field(default=None, metadata={"help": "Train from scratch: a config.json or folder."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "JSON of config attributes to override, e.g. '{\"embed_dim\": 32}'."}
    )
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor name or folder."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and datasets are kept."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model."})
    token: str | None = field(
        default=None, metadata={"help": "Hugging Face token for private models and datasets (default: the login's)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from the model's repository."})
    remote_code: bool = field(
        default=False,
        metadata={
            "help": "Also save the model code and auto_map to --output_dir (and the Hub), so the model loads with "
            "trust_remote_code=True where focal_hf is not installed."
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=True, metadata={"help": "Replace a classifier of another size (e.g. ImageNet's 1000 classes)."}
    )
    lora_rank: int | None = field(
        default=None,
        metadata={
            "help": "Train LoRA adapters (PEFT) of this rank on every block's qkv and proj, and the classifier, "
            "instead of every weight; the saved model has the adapters merged in."
        },
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA's scale numerator (default: the rank)."})

    def __post_init__(self):
        sources = [self.model_name_or_path, self.model_preset, self.config_name]
        if sum(source is not None for source in sources) != 1:
            raise ValueError("Give exactly one of --model_name_or_path, --model_preset and --config_name.")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"--lora_rank must be a positive integer, got {self.lora_rank}.")
        if self.lora_alpha is not None and self.lora_rank is None:
            raise ValueError("--lora_alpha needs --lora_rank (LoRA is off without it).")


def check_class_folders(folder: str) -> None:
    """Every class folder (`<label>/`) under `folder` holds an image: `imagefolder` would silently drop the label."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    extensions = set(ImageFolder.EXTENSIONS)
    classes = [path for path in sorted(Path(folder).iterdir()) if path.is_dir() and not path.name.startswith(".")]
    empty = [
        str(path)
        for path in classes
        if not any(file.suffix.lower() in extensions and file.is_file() for file in path.rglob("*"))
    ]
    if empty:
        raise ValueError(
            f"Class folder(s) without images: {', '.join(empty)}. Add images to them or remove them (image files "
            f"end in .jpg, .png, ...)."
        )


def read_image(value) -> Image.Image:
    """An RGB image from a dataset's image column read undecoded (`load_data`); an unreadable or truncated file is
    an error naming it."""
    if not isinstance(value, Image.Image):
        try:
            value = datasets.Image().decode_example(value)
        except Exception as error:
            raise ValueError(f"Cannot read image {value.get('path') or '(embedded bytes)'}: {error}") from error
    return to_8_bit(value).convert("RGB")


def load_data(
    data_args: DataTrainingArguments, cache_dir: str | None, token: str | None = None
) -> datasets.DatasetDict:
    """The dataset with `train` and `validation` splits, its columns checked, images left undecoded for
    `read_image`."""
    if data_args.dataset_name is not None:
        dataset = datasets.load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir, token=token
        )
    else:
        for folder in (data_args.train_dir, data_args.validation_dir):
            if folder is not None:
                check_class_folders(folder)
        data_files = {"train": os.path.join(data_args.train_dir, "**")}
        if data_args.validation_dir is not None:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        dataset = datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir)
    if "train" not in dataset:
        raise ValueError(f"The dataset has no 'train' split (it has {list(dataset)}).")
    columns = dataset["train"].column_names
    for kind, name in (("image", data_args.image_column_name), ("label", data_args.label_column_name)):
        if name not in columns:
            raise ValueError(
                f"No {kind} column {name!r} in the dataset (columns: {columns}); pass --{kind}_column_name."
            )
    if not isinstance(dataset["train"].features[data_args.label_column_name], datasets.ClassLabel):
        raise ValueError(
            f"Column {data_args.label_column_name!r} holds no class labels "
            f"({dataset['train'].features[data_args.label_column_name]}): a ClassLabel column is needed."
        )
    if "validation" not in dataset:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=0)
        dataset["train"], dataset["validation"] = split["train"], split["test"]
    if isinstance(dataset["train"].features[data_args.image_column_name], datasets.Image):
        dataset = dataset.cast_column(data_args.image_column_name, datasets.Image(decode=False))
    return dataset


def load_model(model_args: ModelArguments, labels: list[str]):
    """The model (pretrained or new) with a classifier for `labels`, and its image processor."""
    label2id = {label: index for index, label in enumerate(labels)}
    id2label = dict(enumerate(labels))
    overrides = json.loads(model_args.config_overrides) if model_args.config_overrides else {}
    common = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "trust_remote_code": model_args.trust_remote_code,
        "token": model_args.token,
    }
    if model_args.model_name_or_path is not None:
        config = AutoConfig.from_pretrained(
            model_args.model_name_or_path,
            num_labels=len(labels),
            label2id=label2id,
            id2label=id2label,
            **overrides,
            **common,
        )
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **common,
        )
    else:
        kwargs = {"num_labels": len(labels), "label2id": label2id, "id2label": id2label, **overrides}
        if model_args.model_preset is not None:
            config = focal_hf.official_config(model_args.model_preset, **kwargs)
        else:
            config = AutoConfig.from_pretrained(model_args.config_name, **kwargs, **common)
        model = AutoModelForImageClassification.from_config(config)
    # the official evaluation transform at the model's image size, unless the user names a processor
    for_model = focal_hf.FocalImageProcessor.for_image_size(model.config.image_size)
    processor_source = model_args.image_processor_name or model_args.model_name_or_path
    if processor_source is None:
        return model, for_model
    image_processor = AutoImageProcessor.from_pretrained(processor_source, **common)
    if model_args.image_processor_name is None and image_processor.crop_size != for_model.crop_size:
        logger.info(f"Image size {model.config.image_size}: evaluating with crops of {dict(for_model.crop_size)}.")
        image_processor.size, image_processor.crop_size = for_model.size, for_model.crop_size
    return model, image_processor


LORA_CARD_ENTRY = "LoRA rank (qkv, proj; merged)"  # the model card's line for --lora_rank


def with_lora_adapters(model, rank: int, alpha: float | None):
    """`model` wrapped by PEFT with LoRA adapters of `rank` on every block's `qkv` and `proj`; only they and the
    classifier (a trainable copy) train."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=["qkv", "proj"], modules_to_save=["classifier"])
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(f"LoRA of rank {rank}: training {trainable:,} of {total:,} weights ({trainable / total:.2%}).")
    return model


def random_resized_crop(
    image: Image.Image, size: tuple[int, int], scale: tuple[float, float], rng: random.Random
) -> Image.Image:
    """Inception-style crop: a random area fraction in `scale` and aspect ratio in [3/4, 4/3], resized to `size`."""
    width, height = image.size
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        crop_w, crop_h = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
            break
    else:  # fall back to the whole image
        left, top, crop_w, crop_h = 0, 0, width, height
    return image.resize(size[::-1], Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))


class AugmentationSeed:
    """Seeds each training example's augmentation from (seed, epoch, example index) — not from a running random
    state, which data loaders draw ahead of training — so a resumed run augments exactly as an uninterrupted one.
    The training loop sets `epoch`."""

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


def add_example_index(split: datasets.Dataset) -> datasets.Dataset:
    """The split with an `example_index` column (what `AugmentationSeed` seeds from)."""
    return split.add_column("example_index", list(range(len(split))))


def make_transforms(image_processor, data_args: DataTrainingArguments, augmentation_seed: AugmentationSeed):
    """Training (random-resized-crop, flip, then the processor's scaling/normalisation) and evaluation transforms.
    The training split needs an `example_index` column (`add_example_index`)."""
    crop = image_processor.crop_size
    size = (crop["height"], crop["width"])
    image_column, label_column = data_args.image_column_name, data_args.label_column_name

    def train_transforms(batch):
        images = []
        for image, index in zip(batch[image_column], batch["example_index"]):
            rng = augmentation_seed.rng(index)
            image = random_resized_crop(read_image(image), size, (data_args.crop_scale_min, 1.0), rng)
            if data_args.horizontal_flip and rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            images.append(image)
        pixel_values = image_processor(images, do_resize=False, do_center_crop=False, return_tensors="pt")
        return {"pixel_values": list(pixel_values["pixel_values"]), "labels": batch[label_column]}

    def eval_transforms(batch):
        images = [read_image(image) for image in batch[image_column]]
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": list(pixel_values), "labels": batch[label_column]}

    return train_transforms, eval_transforms


def model_card(
    model_id: str,
    model,
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    hyperparameters: dict,
    accuracy: float | None,
) -> ModelCard:
    """The model card of a fine-tuned (or newly trained) folder; `model_id` is its Hub repo id when pushed, else the
    folder name. Metadata only states what is known: the base model and dataset when they are Hub ids, the measured
    validation accuracy; no license is invented."""
    config = model.config
    base = model_args.model_name_or_path
    base_on_hub = base is not None and not Path(base).exists()
    dataset_on_hub = data_args.dataset_name is not None and not Path(data_args.dataset_name).exists()
    if base is not None:
        origin = f"fine-tuned from [{base}](https://huggingface.co/{base})"
        if not base_on_hub:
            origin = f"fine-tuned from a local `{Path(base).name}`"
    else:
        origin = f"trained from scratch ({model_args.model_preset or model_args.config_name})"
    data = f"`{data_args.dataset_name}`" if data_args.dataset_name else "a local image folder"
    labels = list(config.id2label.values())
    shown = ", ".join(f"`{label}`" for label in labels[:20]) + (", ..." if len(labels) > 20 else "")
    height, width = config.image_size_2d
    kind = "Focal-fast" if config.attention_type == "focal_fast" else "Focal"
    summary = (
        f"A Focal Transformer image classifier ({kind} attention, {model.num_parameters() / 1e6:.1f}M parameters, "
        f"{height}x{width} px) {origin} on {data}. {len(labels)} classes: {shown}."
    )
    lines = [f"- {name}: {value}" for name, value in hyperparameters.items()]
    sections = "## Training\n\nWith focal-hf's fine-tuning example, on these settings:\n\n" + "\n".join(lines)
    eval_results = []
    if accuracy is not None:
        sections += f"\n\nAccuracy on the validation split: {accuracy:.4f}."
        eval_results.append(
            EvalResult(
                task_type="image-classification",
                dataset_type=data_args.dataset_name or "imagefolder",
                dataset_name=data_args.dataset_name or Path(data_args.validation_dir or data_args.train_dir).name,
                dataset_split="validation",
                metric_type="accuracy",
                metric_value=accuracy,
            )
        )
    return hub.model_card(
        model_id,
        summary,
        sections,
        remote_code=model_args.remote_code,
        datasets=[data_args.dataset_name] if dataset_on_hub else [],
        base_model=base if base_on_hub else None,
        eval_results=eval_results,
    )


class CardTrainer(Trainer):
    """A `Trainer` whose model card (written to `output_dir`, and what `push_to_hub` uploads) is `model_card`'s."""

    def __init__(self, *args, model_card: Callable[[], ModelCard], **kwargs):
        super().__init__(*args, **kwargs)
        self.card_builder = model_card

    def create_model_card(self, **kwargs):
        if self.is_world_process_zero():
            self.card_builder().save(os.path.join(self.args.output_dir, "README.md"))

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        try:  # at construction, before training: e.g. no right to create repositories in that namespace
            super().init_hf_repo(token=token, private=private)
        except HfHubHTTPError as error:
            raise hub.HubError(f"Cannot create the Hub repository {self.args.hub_model_id!r}: {error}") from error


def collate_fn(examples):
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }


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
    if training_args.use_cpu or not torch.accelerator.is_available():
        training_args.dataloader_pin_memory = False  # nothing to pin to (and no warning at every run)
    if training_args.push_to_hub:  # before any work: a valid repo id, a write token, a reachable Hub
        repo_id = training_args.hub_model_id or Path(training_args.output_dir).absolute().name
        training_args.hub_model_id = hub.check_push_access(repo_id, training_args.hub_token)
    prepare_output_dir(training_args)

    dataset = load_data(data_args, model_args.cache_dir, model_args.token)
    labels = dataset["train"].features[data_args.label_column_name].names
    model, image_processor = load_model(model_args, labels)
    if model_args.lora_rank is not None:
        model = with_lora_adapters(model, model_args.lora_rank, model_args.lora_alpha)
    augmentation_seed = AugmentationSeed(training_args.seed)
    train_transforms, eval_transforms = make_transforms(image_processor, data_args, augmentation_seed)
    if training_args.do_train:
        if data_args.max_train_samples is not None:
            dataset["train"] = (
                dataset["train"]
                .shuffle(seed=training_args.seed)
                .select(range(min(data_args.max_train_samples, len(dataset["train"]))))
            )
        dataset["train"] = add_example_index(dataset["train"])
        dataset["train"].set_transform(train_transforms)
    if training_args.do_eval:
        if data_args.max_eval_samples is not None:
            dataset["validation"] = (
                dataset["validation"]
                .shuffle(seed=training_args.seed)
                .select(range(min(data_args.max_eval_samples, len(dataset["validation"]))))
            )
        dataset["validation"].set_transform(eval_transforms)

    accuracy = evaluate.load(ACCURACY)  # a local copy of the Hub's `accuracy`: works offline

    def compute_metrics(prediction):
        return accuracy.compute(predictions=np.argmax(prediction.predictions, axis=1), references=prediction.label_ids)

    training_args.remove_unused_columns = False  # the transforms need the image column
    hyperparameters = {
        "learning rate": training_args.learning_rate,
        "epochs": training_args.num_train_epochs,
        "batch size per device": training_args.per_device_train_batch_size,
        "seed": training_args.seed,
    }
    if model_args.lora_rank is not None:
        hyperparameters[LORA_CARD_ENTRY] = model_args.lora_rank
    metrics = {}
    trainer = CardTrainer(
        model_card=lambda: model_card(
            training_args.hub_model_id or Path(training_args.output_dir).name,
            model,
            model_args,
            data_args,
            hyperparameters,
            metrics.get("eval_accuracy"),
        ),
        model=model,
        args=training_args,
        train_dataset=dataset["train"] if training_args.do_train else None,
        eval_dataset=dataset["validation"] if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=collate_fn,
        callbacks=[EpochCallback(augmentation_seed)],
    )
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        if model_args.lora_rank is not None:  # saved, evaluated and described as a plain model with the adapters in
            model = trainer.model = trainer.model_wrapped = trainer.model.merge_and_unload()
        # model.safetensors, config.json and the image processor; not pushed yet: the one push comes at the end,
        # with the model card (and the code)
        trainer.save_model(_internal_call=True)
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
    if model_args.remote_code and trainer.is_world_process_zero():
        hub.add_remote_code(training_args.output_dir, model.config, image_processor)
    trainer.create_model_card()  # README.md, pushed or not
    if training_args.push_to_hub:
        try:
            trainer.push_to_hub(commit_message="End of training")
        except Exception as error:  # the folder is complete: say how to upload it later
            private, exclude = bool(training_args.hub_private_repo), ["_*", "checkpoint-*"]  # as Trainer uploads
            raise hub.upload_failed(training_args.output_dir, trainer.hub_model_id, error, private, exclude) from error
    return metrics


if __name__ == "__main__":
    try:
        main()
    except hub.HubError as error:
        sys.exit(f"{Path(__file__).name}: error: {error}")
