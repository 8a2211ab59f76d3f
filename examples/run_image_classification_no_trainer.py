#!/usr/bin/env python
# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune (or train from scratch) a Focal Transformer for image classification with 🤗 Accelerate.

Modelled on transformers' `run_image_classification_no_trainer.py`; the same data and model options as
`run_image_classification.py` (whose loading and transforms it reuses). Runs unchanged on one CPU, one GPU or many
GPUs/nodes:

    accelerate launch examples/run_image_classification_no_trainer.py --model_name_or_path focal-tiny \\
        --train_dir my_images/train --validation_dir my_images/val --output_dir out \\
        --mixed_precision bf16 --gradient_accumulation_steps 2 --checkpointing_steps epoch

A model card is written to `--output_dir`; `--remote_code` adds the model code for `trust_remote_code=True` users;
`--push_to_hub [--hub_model_id you/name] [--hub_token ...]` checks the credentials before training.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import re
import shutil
import sys
from pathlib import Path

import evaluate
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.hf_argparser import string_to_bool

from focal_hf import hub
from focal_hf.folders import install, set_default_modes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_image_classification import (  # noqa: E402
    ACCURACY,
    LORA_CARD_ENTRY,
    AugmentationSeed,
    DataTrainingArguments,
    ModelArguments,
    add_example_index,
    collate_fn,
    load_data,
    load_model,
    make_transforms,
    model_card,
    with_lora_adapters,
)

logger = get_logger(__name__)
CHECKPOINT_NAME = re.compile(r"^(step|epoch)_\d+$")
PROGRESS = "progress.json"  # written last into a checkpoint: its presence marks a complete one


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", help="dataset name or path (datasets.load_dataset)")
    data.add_argument("--dataset_config_name")
    data.add_argument("--train_dir", help="folder of training images, one folder per label")
    data.add_argument("--validation_dir", help="folder of validation images, same layout")
    data.add_argument("--train_val_split", type=float, default=0.15)
    data.add_argument("--image_column_name", default="image")
    data.add_argument("--label_column_name", default="label")
    data.add_argument("--max_train_samples", type=int)
    data.add_argument("--max_eval_samples", type=int)
    data.add_argument("--crop_scale_min", type=float, default=0.08)
    data.add_argument("--no_horizontal_flip", action="store_true")
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="a converted folder or Hub model id")
    model.add_argument("--model_preset", help="train from scratch: an official architecture name")
    model.add_argument("--config_name", help="train from scratch: a config.json or folder")
    model.add_argument("--config_overrides", help="JSON of config attributes to override")
    model.add_argument("--image_processor_name")
    model.add_argument("--cache_dir")
    model.add_argument("--trust_remote_code", action="store_true")
    model.add_argument(
        "--ignore_mismatched_sizes",
        type=string_to_bool,
        nargs="?",
        const=True,
        default=True,
        help="replace a classifier of another size (e.g. ImageNet's 1000 classes); default true",
    )
    model.add_argument("--no_ignore_mismatched_sizes", dest="ignore_mismatched_sizes", action="store_false")
    model.add_argument(
        "--lora_rank",
        type=int,
        help="train LoRA adapters (PEFT) of this rank on every block's qkv and proj, and the classifier, instead of "
        "every weight; the saved model has the adapters merged in",
    )
    model.add_argument("--lora_alpha", type=float, help="LoRA's scale numerator (default: the rank)")
    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", required=True)
    train.add_argument("--per_device_train_batch_size", type=int, default=8)
    train.add_argument("--per_device_eval_batch_size", type=int, default=8)
    train.add_argument("--learning_rate", type=float, default=5e-5)
    train.add_argument("--weight_decay", type=float, default=0.0)
    train.add_argument("--num_train_epochs", type=int, default=3)
    train.add_argument("--max_train_steps", type=int, help="overrides --num_train_epochs")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--lr_scheduler_type", default="linear")
    train.add_argument("--num_warmup_steps", type=int, default=0)
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="default: accelerate's config")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--cpu", action="store_true", help="run on CPU even where an accelerator is available")
    train.add_argument("--checkpointing_steps", help="save the training state every N steps, or 'epoch'")
    train.add_argument(
        "--resume_from_checkpoint",
        help="a checkpoint folder written by --checkpointing_steps, or 'latest' (or the --output_dir itself) for the "
        "newest complete one in --output_dir",
    )
    train.add_argument("--with_tracking", action="store_true", help="log metrics with accelerate's trackers")
    train.add_argument("--report_to", default="all", help="trackers for --with_tracking")
    hub_group = parser.add_argument_group("sharing")
    hub_group.add_argument("--push_to_hub", action="store_true", help="upload --output_dir to the Hub at the end")
    hub_group.add_argument("--hub_model_id", help="the Hub repository (default: the name of --output_dir)")
    hub_group.add_argument("--hub_token", help="token for the Hub (pushing, private models and datasets)")
    hub_group.add_argument(
        "--remote_code",
        action="store_true",
        help="also save the model code and auto_map, for trust_remote_code=True users without focal_hf",
    )
    args = parser.parse_args(argv)
    if args.checkpointing_steps not in (None, "epoch") and not args.checkpointing_steps.isdigit():
        parser.error(f"--checkpointing_steps must be a number of steps or 'epoch', got {args.checkpointing_steps!r}")
    try:  # the shared dataclasses check data and model sources; the checkpoint is complete
        if args.resume_from_checkpoint is not None:
            args.resume_from_checkpoint = str(resolve_checkpoint(args.resume_from_checkpoint, args.output_dir))
        args.data = DataTrainingArguments(
            dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name,
            train_dir=args.train_dir,
            validation_dir=args.validation_dir,
            train_val_split=args.train_val_split,
            image_column_name=args.image_column_name,
            label_column_name=args.label_column_name,
            max_train_samples=args.max_train_samples,
            max_eval_samples=args.max_eval_samples,
            crop_scale_min=args.crop_scale_min,
            horizontal_flip=not args.no_horizontal_flip,
        )
        args.model = ModelArguments(
            model_name_or_path=args.model_name_or_path,
            model_preset=args.model_preset,
            config_name=args.config_name,
            config_overrides=args.config_overrides,
            image_processor_name=args.image_processor_name,
            cache_dir=args.cache_dir,
            token=args.hub_token,
            trust_remote_code=args.trust_remote_code,
            ignore_mismatched_sizes=args.ignore_mismatched_sizes,
            remote_code=args.remote_code,
            lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha,
        )
    except ValueError as error:
        parser.error(str(error))
    if args.push_to_hub:
        try:
            hub.check_repo_id(args.hub_model_id or Path(args.output_dir).absolute().name)
        except hub.HubError as error:
            parser.error(f"{error} Pass --hub_model_id.")
    return args


def complete_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The complete checkpoints (`step_N`/`epoch_N` with their progress file) in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        (json.loads((path / PROGRESS).read_text())["step"], path.stat().st_mtime, path)
        for path in folder.iterdir()
        if CHECKPOINT_NAME.match(path.name) and (path / PROGRESS).is_file()
    ]
    return [path for _, _, path in sorted(found)]


def resolve_checkpoint(checkpoint: str, output_dir: str) -> Path:
    """The checkpoint folder `--resume_from_checkpoint` means: 'latest' or the output folder give its newest complete
    checkpoint; an incomplete one (a save that was interrupted by an earlier version) is an error naming the newest
    complete one."""
    path = Path(checkpoint)
    if checkpoint == "latest" or (path.is_dir() and path.resolve() == Path(output_dir).resolve()):
        checkpoints = complete_checkpoints(output_dir)
        if not checkpoints:
            raise ValueError(f"--resume_from_checkpoint {checkpoint}: there is no complete checkpoint in {output_dir}.")
        return checkpoints[-1]
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {checkpoint!r} is not a checkpoint folder.")
    if not (path / PROGRESS).is_file():
        newest = complete_checkpoints(path.parent)
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint!r} is not a complete checkpoint (it has no {PROGRESS}: its save "
            f"was interrupted). "
            + (f"The newest complete one is {newest[-1]}." if newest else f"There is no complete one in {path.parent}.")
        )
    return path


def main(argv=None) -> dict:
    """Train and evaluate; returns the final metrics (on the main process)."""
    args = parse_args(argv)
    repo_id = None
    if args.push_to_hub:  # before any work: a write token and a reachable Hub
        repo_id = hub.check_push_access(args.hub_model_id or Path(args.output_dir).absolute().name, args.hub_token)
    accelerator = Accelerator(
        cpu=args.cpu or not torch.accelerator.is_available(),  # several CPU processes (torchrun) run as MULTI_CPU
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # same order after a resume
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    set_seed(args.seed)

    with accelerator.main_process_first():
        dataset = load_data(args.data, args.model.cache_dir, args.hub_token)
    labels = dataset["train"].features[args.label_column_name].names
    model, image_processor = load_model(args.model, labels)
    if args.lora_rank is not None:
        model = with_lora_adapters(model, args.lora_rank, args.lora_alpha)
    augmentation_seed = AugmentationSeed(args.seed)
    train_transforms, eval_transforms = make_transforms(image_processor, args.data, augmentation_seed)
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit is not None:
            dataset[split] = dataset[split].shuffle(seed=args.seed).select(range(min(limit, len(dataset[split]))))
    dataset["train"] = add_example_index(dataset["train"])
    dataset["train"].set_transform(train_transforms)
    dataset["validation"].set_transform(eval_transforms)
    train_dataloader = DataLoader(
        dataset["train"], shuffle=True, collate_fn=collate_fn, batch_size=args.per_device_train_batch_size
    )
    eval_dataloader = DataLoader(
        dataset["validation"], collate_fn=collate_fn, batch_size=args.per_device_eval_batch_size
    )

    no_decay = ("bias", "norm", "relative_position", "position_embeddings")
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # (with LoRA: adapters, classifier)
    groups = [
        {"params": [p for n, p in trained if not any(k in n for k in no_decay)], "weight_decay": args.weight_decay},
        {"params": [p for n, p in trained if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
    steps_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps, num_training_steps=max_train_steps
    )
    model, optimizer, train_dataloader, eval_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, scheduler
    )
    if args.with_tracking:
        accelerator.init_trackers(
            "focal_image_classification",
            {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
        )

    completed_steps, start_epoch, skip_batches = 0, 0, 0
    if accelerator.is_main_process:  # checkpoint saves a kill interrupted
        for leftover in Path(args.output_dir).glob(".*.new"):
            logger.warning(f"Removing {leftover}, an unfinished checkpoint save.")
            shutil.rmtree(leftover)
    if args.resume_from_checkpoint:
        completed_steps = int(json.loads((Path(args.resume_from_checkpoint) / PROGRESS).read_text())["step"])
        start_epoch = completed_steps // steps_per_epoch
        skip_batches = (completed_steps % steps_per_epoch) * args.gradient_accumulation_steps

    def save_checkpoint(name: str):
        """Save the training state into a hidden folder and rename it to `name` once complete: an interrupted save
        leaves no `name` folder."""
        folder = Path(args.output_dir) / name
        staging = folder.with_name(f".{name}.new")
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (staging / PROGRESS).write_text(json.dumps({"step": completed_steps}))
            install(staging, folder)
        accelerator.wait_for_everyone()

    progress = tqdm(range(max_train_steps), initial=completed_steps, disable=not accelerator.is_local_main_process)
    losses = []
    for epoch in range(start_epoch, num_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)
        augmentation_seed.epoch = epoch
        batches = train_dataloader
        if epoch == start_epoch and skip_batches:
            batches = accelerator.skip_first_batches(train_dataloader, skip_batches)
        batches = iter(batches)
        if args.resume_from_checkpoint and epoch == start_epoch:
            # Starting an epoch's loader draws from the random state. A checkpoint taken mid-epoch was saved after
            # that draw, so restore after starting the loader; one taken at an epoch's end, before.
            if skip_batches:
                batches = itertools.chain([next(batches)], batches)
                accelerator.load_state(args.resume_from_checkpoint)
            else:
                accelerator.load_state(args.resume_from_checkpoint)
                batches = iter(train_dataloader)
            accelerator.print(f"Resumed from {args.resume_from_checkpoint} at step {completed_steps}")
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                completed_steps += 1
                progress.update(1)
                loss_value = accelerator.gather(loss.detach()).mean().item()
                losses.append(loss_value)
                progress.set_postfix(loss=f"{loss_value:.4f}")
                if args.with_tracking:
                    accelerator.log({"train_loss": loss_value, "lr": scheduler.get_last_lr()[0]}, step=completed_steps)
                if args.checkpointing_steps and args.checkpointing_steps.isdigit():
                    if completed_steps % int(args.checkpointing_steps) == 0:
                        save_checkpoint(f"step_{completed_steps}")
            if completed_steps >= max_train_steps:
                break
        if args.checkpointing_steps == "epoch":
            save_checkpoint(f"epoch_{epoch}")
        if completed_steps >= max_train_steps:
            break

    metrics = evaluate_model(accelerator, model, eval_dataloader)
    metrics["train_losses"] = losses
    accelerator.print(f"eval accuracy {metrics['accuracy']:.4f}")
    if args.with_tracking:
        accelerator.log({"eval_accuracy": metrics["accuracy"]}, step=completed_steps)
        accelerator.end_training()

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if args.lora_rank is not None:  # saved and described as a plain model with the adapters in
        unwrapped = unwrapped.merge_and_unload()
    unwrapped.save_pretrained(
        args.output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save
    )
    if accelerator.is_main_process:
        image_processor.save_pretrained(args.output_dir)
        if args.remote_code:
            hub.add_remote_code(args.output_dir, unwrapped.config, image_processor)
        set_default_modes(args.output_dir)  # safetensors writes 0600 files
        with open(os.path.join(args.output_dir, "all_results.json"), "w") as handle:
            json.dump({"eval_accuracy": metrics["accuracy"]}, handle)
        hyperparameters = {
            "learning rate": args.learning_rate,
            "training steps": max_train_steps,
            "batch size per device": args.per_device_train_batch_size,
            "processes": accelerator.num_processes,
            "gradient accumulation steps": args.gradient_accumulation_steps,
            "mixed precision": accelerator.mixed_precision,
            "seed": args.seed,
        }
        if args.lora_rank is not None:
            hyperparameters[LORA_CARD_ENTRY] = args.lora_rank
        card = model_card(
            repo_id or Path(args.output_dir).name,
            unwrapped,
            args.model,
            args.data,
            hyperparameters,
            metrics["accuracy"],
        )
        card.save(os.path.join(args.output_dir, "README.md"))
        if repo_id:
            # the model, not the training state: checkpoints (and hidden staging folders) stay local
            exclude = ["step_*", "epoch_*", ".*"]
            hub.push_folder(args.output_dir, repo_id, args.hub_token, commit_message="End of training", exclude=exclude)
    return metrics


def evaluate_model(accelerator: Accelerator, model, eval_dataloader) -> dict:
    """Accuracy over the whole validation set, gathered from every process."""
    accuracy = evaluate.load(ACCURACY)
    model.eval()
    for batch in eval_dataloader:
        with torch.no_grad():
            logits = model(**batch).logits
        predictions, references = accelerator.gather_for_metrics((logits.argmax(dim=-1), batch["labels"]))
        accuracy.add_batch(predictions=np.asarray(predictions.cpu()), references=np.asarray(references.cpu()))
    return accuracy.compute()


if __name__ == "__main__":
    try:
        main()
    except hub.HubError as error:
        sys.exit(f"{Path(__file__).name}: error: {error}")
