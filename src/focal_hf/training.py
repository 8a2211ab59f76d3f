# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""What the 🤗 Trainer examples (`examples/run_image_classification.py`, `examples/run_semantic_segmentation.py`)
share: their training arguments and the check of `--output_dir` before any work."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class FocalTrainingArguments(TrainingArguments):
    """transformers' `TrainingArguments` with `--overwrite_output_dir` (which transformers v5 dropped) and
    `--resume_from_checkpoint latest`; `prepare_output_dir` applies them."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into a non-empty --output_dir, deleting the earlier run's checkpoint-* folders."},
    )


def prepare_output_dir(training_args: FocalTrainingArguments) -> None:
    """Refuse to train into a non-empty `--output_dir` unless resuming from it (`--resume_from_checkpoint`, where
    `latest` picks its newest checkpoint) or `--overwrite_output_dir` is given, as transformers' examples did: the
    new run would otherwise overwrite some files of the earlier one and leave its later checkpoints mixed in.
    Call it before any work; in distributed runs every process calls it (the main process first)."""
    with training_args.main_process_first(desc="checking --output_dir"):
        output = Path(training_args.output_dir)
        if training_args.resume_from_checkpoint == "latest":
            last = get_last_checkpoint(output) if output.is_dir() else None
            if last is None:
                raise ValueError(f"--resume_from_checkpoint latest: there is no checkpoint-* folder in {output}.")
            training_args.resume_from_checkpoint = last
        if not training_args.do_train or training_args.resume_from_checkpoint is not None:
            return
        if not output.is_dir() or not any(output.iterdir()):
            return
        if not training_args.overwrite_output_dir:
            names = sorted(path.name for path in output.iterdir())
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise ValueError(
                f"--output_dir {output} is not empty (it holds {shown}): "
                f"pass --resume_from_checkpoint latest to continue that run, --overwrite_output_dir to train anew "
                f"into it (its checkpoints are deleted), or another --output_dir."
            )
        if training_args.process_index == 0:
            for checkpoint in sorted(output.glob("checkpoint-*")):
                logger.warning(f"--overwrite_output_dir: deleting {checkpoint} of the earlier run.")
                shutil.rmtree(checkpoint)
