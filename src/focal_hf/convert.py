# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""Convert official Focal Transformer checkpoints to Hugging Face folders (safetensors), optionally on the Hub.

    focal-convert --model-name focal-tiny --checkpoint focal-tiny-is224-ws7.pth
    focal-convert --config my_focal.yaml --checkpoint my_focal.pth --output-dir my-focal
    focal-convert --checkpoint output/ckpt_epoch_299.pth --output-dir my-focal   # its config saved in it
    focal-convert --model-name focal-base --checkpoint focal-base-is224-ws7.pth --push-to-hub you/focal-base \\
        --remote-code

The folder holds `config.json` (with the ImageNet-1K class names for 1000-class models), `model.safetensors`,
`preprocessor_config.json` and a model card; it is written to a temporary folder, reloaded and checked against the
converted model, then renamed into place, so a failure leaves nothing behind. With --push-to-hub the repository id
and the Hub credentials are checked before anything is converted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import EvalResult, ModelCard

from . import hub
from .configuration_focal import FocalConfig
from .folders import FolderError, FolderLock, check_writable, install, new_staging, not_writable, recover
from .image_processing_focal import FocalImageProcessor
from .modeling_focal import FocalForImageClassification
from .original import (
    config_from_original,
    convert_original_state_dict,
    image_processor_from_original,
    load_original_state_dict,
    official_config,
    saved_original_config,
)

logger = logging.getLogger("focal_hf.convert")

OFFICIAL_URL = "https://projects4jw.blob.core.windows.net/model/focal-transformer/imagenet1k/{}"
OFFICIAL_FILES = {
    **{
        f"focal-{size}{suffix}": f"focal-{size}{suffix}-is224-ws7.pth"
        for size in ("tiny", "small", "base")
        for suffix in ("", "-useconv")
    },
    **{f"focal-fast-{size}": f"focalv2-{size}-useconv-is224-ws7.pth" for size in ("tiny", "small", "base")},
}
# the official YAML (microsoft/Focal-Transformer configs/) of each official checkpoint
OFFICIAL_CONFIGS = {
    **{
        f"focal-{size}{suffix}": f"focal_{size}{suffix.replace('-', '_')}_patch4_window7_224.yaml"
        for size in ("tiny", "small", "base")
        for suffix in ("", "-useconv")
    },
    **{f"focal-fast-{size}": f"focalv2_{size}_useconv_patch4_window7_224.yaml" for size in ("tiny", "small", "base")},
}
OFFICIAL_REPOSITORY = "https://github.com/microsoft/Focal-Transformer"
OFFICIAL_LICENSE = "mit"  # the official repository's LICENSE (MIT), which covers its released checkpoints
# reported by the official repository (ImageNet-1K top-1 at 224 px)
REPORTED_TOP1 = {
    "focal-tiny": 82.2,
    "focal-small": 83.6,
    "focal-base": 84.0,
    "focal-tiny-useconv": 82.7,
    "focal-small-useconv": 83.8,
    "focal-base-useconv": 84.2,
    "focal-fast-tiny": 82.4,
    "focal-fast-small": 83.6,
    "focal-fast-base": 84.0,
}
CACHE = Path(os.environ.get("FOCAL_HF_CACHE", Path.home() / ".cache" / "focal_hf"))


class ConversionError(Exception):
    """A conversion that cannot go on; its message says why and what to do."""


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1K class names, in class-index order (package data)."""
    return json.loads(resources.files("focal_hf").joinpath("data/imagenet1k_labels.json").read_text("utf-8"))


def fetch_checkpoint(checkpoint: str | None, model_name: str | None) -> Path:
    """A local checkpoint path: the file given, or the given/official URL downloaded (progress bar) and cached."""
    url = checkpoint
    if checkpoint is None:
        url = OFFICIAL_URL.format(OFFICIAL_FILES[model_name])
    elif urlparse(checkpoint).scheme not in ("http", "https"):
        path = Path(checkpoint)
        if not path.is_file():
            raise ConversionError(f"Checkpoint {checkpoint!r} does not exist.")
        return path
    target = CACHE / Path(urlparse(url).path).name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(target.suffix + ".part")
        try:
            torch.hub.download_url_to_file(url, str(partial), progress=True)
        except Exception as error:  # no network, 403 PublicAccessNotPermitted, ...
            partial.unlink(missing_ok=True)
            raise ConversionError(
                f"Could not download {url} ({type(error).__name__}: {error}). The official host has been reported to "
                f"refuse public access ('PublicAccessNotPermitted'); pass a local copy with --checkpoint PATH."
            ) from error
        partial.replace(target)
    return target


@dataclass
class CardInfo:
    """What the model card of a converted folder says beyond the model itself."""

    model_id: str  # the Hub repository id when pushing, else the folder name
    official_name: str | None = None  # --model-name: an official ImageNet-1K checkpoint
    config_source: str = ""  # the official config it was built from (Markdown: "`file.yaml`", "saved in `x.pth`")
    license: str | None = None  # --license (official checkpoints: the official repository's)
    datasets: list[str] = field(default_factory=list)  # --dataset (official checkpoints: imagenet-1k)
    remote_code: bool = False


def model_card(
    info: CardInfo, config: FocalConfig, processor: FocalImageProcessor, checkpoint: str, num_parameters: int
) -> ModelCard:
    """The model card (README.md) of a converted folder. Official checkpoints get the official repository's license,
    ImageNet-1K and the authors' top-1; others only the license and datasets the user passed."""
    kind = "Focal-fast (official `focalv2`)" if config.attention_type == "focal_fast" else "Focal (official `focal`)"
    license, datasets, eval_results = info.license, info.datasets, []
    official = f"[microsoft/Focal-Transformer]({OFFICIAL_REPOSITORY})"
    if info.official_name:
        origin = f"the official `{info.official_name}` ImageNet-1K checkpoint of {official}"
        license, datasets = OFFICIAL_LICENSE, ["imagenet-1k"]
        top1 = REPORTED_TOP1[info.official_name]
        eval_results = [
            EvalResult(
                task_type="image-classification",
                dataset_type="imagenet-1k",
                dataset_name="ImageNet-1K",
                dataset_split="validation",
                metric_type="accuracy",
                metric_name="Top-1 accuracy (%)",
                metric_value=top1,
                source_name="microsoft/Focal-Transformer (reported by the authors)",
                source_url=OFFICIAL_REPOSITORY,
            )
        ]
        facts = [
            f"ImageNet-1K top-1: {top1} % at 224 px, as reported by the authors for the official checkpoint (not "
            f"re-measured after conversion).",
            "License: MIT, the official repository's.",
        ]
    else:
        origin = f"a checkpoint in the format of {official} (not one of the official ImageNet-1K releases)"
        facts = [f"License: {license}." if license else "License: not stated."]
        facts += [f"Training data: {', '.join(datasets)}."] if datasets else []
    height, width = config.image_size_2d
    facts += [
        f"Parameters: {num_parameters / 1e6:.1f}M; built for {height}x{width} px inputs (any size of at least "
        f"{config.total_stride} px runs); {config.num_labels} classes.",
    ]
    crop, size = processor.crop_size, processor.size
    if not processor.do_resize:
        transform = "no resizing"
    elif processor.do_center_crop:
        transform = f"shorter side to {size['shortest_edge']}, centre crop {crop['height']}x{crop['width']}"
    else:
        transform = f"resize to {size['height']}x{size['width']}"
    summary = (
        f"A Focal Transformer image classifier (*Focal Self-attention for Local-Global Interactions in Vision "
        f"Transformers*, Yang et al., NeurIPS 2021, [arXiv:2107.00641](https://arxiv.org/abs/2107.00641)) with "
        f"{kind} attention, converted from {origin}.\n\n" + "\n".join(f"- {fact}" for fact in facts)
    )
    reference = "focal_transformer_v2.py" if config.attention_type == "focal_fast" else "focal_transformer.py"
    sections = f"""## Conversion and parity

Converted with `focal-convert` (focal-hf) from `{checkpoint}` with the official config {info.config_source}: the
official state dict was renamed to the focal-hf layout and the buffers the official code saves were dropped (they
are recomputed from the config).

- The focal-hf model code matches the official implementation (`classification/{reference}`) within a maximum
  absolute difference of 1e-4 (float32) on the logits, the pooled output and every stage's output, on focal-hf's
  reference inputs (the official code run on randomised weights of this architecture family).
- This folder was reloaded after writing and reproduces the converted model exactly (maximum difference 0).
- The image processor is the official evaluation transform ({transform}, ImageNet mean and std).
"""
    return hub.model_card(
        info.model_id,
        summary,
        sections,
        remote_code=info.remote_code,
        license=license,
        datasets=datasets,
        eval_results=eval_results,
    )


def read_checkpoint(path: Path) -> Mapping:
    """`load_original_state_dict(path)`, a file that is no official checkpoint as a `ConversionError`."""
    try:
        return load_original_state_dict(path)
    except ValueError as error:
        raise ConversionError(str(error)) from error


def convert(
    config: FocalConfig,
    checkpoint: Mapping,
    checkpoint_name: str,
    output_dir: Path,
    card: CardInfo,
    processor: FocalImageProcessor,
    force: bool = False,
) -> Path:
    """Convert `checkpoint` (as `read_checkpoint` read it from the file `checkpoint_name`) for `config` into
    `output_dir`; returns it. The folder is written beside it, verified, then renamed into place; an existing
    `output_dir` (only with `force`) is replaced by rename-aside and rename-in (see `focal_hf.folders`), so a kill at
    any instant leaves the old or the new folder whole. A failure leaves nothing behind."""
    try:
        state_dict = convert_original_state_dict(checkpoint, config)
    except ValueError as error:
        raise ConversionError(str(error)) from error
    model = FocalForImageClassification(config).eval()
    model.load_state_dict(state_dict)
    output_dir = Path(os.path.abspath(output_dir))  # "." and "out/" have a name too
    lock = FolderLock(output_dir, writer="focal-convert")
    try:
        for message in recover(output_dir):
            logger.warning(message)
        if output_dir.exists() and not force:
            raise ConversionError(f"{output_dir} exists; pass --force to replace it.")
        staging = new_staging(output_dir)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if card.remote_code:
            hub.add_remote_code(staging, model.config, processor)
        num_parameters = sum(p.numel() for p in model.parameters())
        model_card(card, config, processor, checkpoint_name, num_parameters).save(staging / "README.md")
        verify(model, staging)
        install(staging, output_dir)
    except BaseException as error:
        with contextlib.suppress(OSError):  # the error to report is `error`
            recover(output_dir)  # removes the staging folder; restores the old folder if it was moved aside
        if isinstance(error, PermissionError):
            raise not_writable(output_dir, error) from error
        raise
    finally:
        lock.release()
    return output_dir


def verify(model: FocalForImageClassification, folder: Path) -> None:
    """Reload `folder` and check it computes what `model` computes."""
    reloaded = FocalForImageClassification.from_pretrained(folder).eval()
    pixel_values = torch.randn(
        2, model.config.num_channels, *model.config.image_size_2d, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected, actual = model(pixel_values).logits, reloaded(pixel_values).logits
    if not torch.equal(expected, actual):
        raise ConversionError(
            f"The written folder does not reproduce the model (max difference "
            f"{(expected - actual).abs().max().item():.3g}); nothing was written."
        )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="focal-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model-name", choices=sorted(OFFICIAL_FILES), help="an official ImageNet-1K architecture")
    source.add_argument("--config", help="an official-schema YAML config (with --checkpoint)")
    parser.add_argument(
        "--checkpoint",
        help="a local .pth file or a URL (default for --model-name: the official URL); alone, a checkpoint of the "
        "official training script, built from the config saved in it",
    )
    parser.add_argument("--output-dir", help="where to write the folder (default: the model name)")
    parser.add_argument("--force", action="store_true", help="replace an existing --output-dir")
    parser.add_argument(
        "--remote-code",
        action="store_true",
        help="also write the model code and auto_map, for trust_remote_code=True loading",
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--commit-message", default="Add converted Focal Transformer checkpoint")
    parser.add_argument("--token", help="Hugging Face token for --push-to-hub (default: `hf auth login`'s or HF_TOKEN)")
    parser.add_argument("--license", help="for --config: the checkpoint's license, for the model card (Hub id)")
    parser.add_argument(
        "--dataset", action="append", default=[], help="for --config: a dataset it was trained on (Hub id; repeatable)"
    )
    args = parser.parse_args(argv)
    if not (args.model_name or args.config or args.checkpoint):
        parser.error("one of --model-name, --config (with --checkpoint) or --checkpoint is required")
    if args.config and not args.checkpoint:
        parser.error("--config needs --checkpoint")
    if args.model_name and (args.license or args.dataset):
        parser.error("--license and --dataset are for --config; official checkpoints get the official ones")
    if args.push_to_hub:
        try:
            hub.check_repo_id(args.push_to_hub)
        except hub.HubError as error:
            parser.error(str(error))
    return args


def main(argv=None) -> int:
    """The `focal-convert` command; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    previous_handler = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # `kill`: clean up as on Ctrl-C
    try:
        repo_id = hub.check_push_access(args.push_to_hub, args.token) if args.push_to_hub else None
        checkpoint_path = checkpoint = None  # read first only when the config is saved in it
        if args.model_name:
            name, config = args.model_name, official_config(args.model_name)
            processor = FocalImageProcessor.for_image_size(config.image_size)
            config_source = f"`{OFFICIAL_CONFIGS[args.model_name]}`"
        else:
            if args.config:
                name, original, config_source = Path(args.config).stem, args.config, f"`{Path(args.config).name}`"
            else:  # a checkpoint of the official training script: its config is saved in it
                checkpoint_path = fetch_checkpoint(args.checkpoint, None)
                checkpoint = read_checkpoint(checkpoint_path)
                name, config_source = checkpoint_path.stem, f"saved in `{checkpoint_path.name}`"
                try:
                    original = saved_original_config(checkpoint, checkpoint_path)
                except ValueError as error:
                    raise ConversionError(f"{error} (--config PATH)") from error
            try:
                config = config_from_original(original)
                processor = image_processor_from_original(original)
            except Exception as error:  # unreadable YAML, unknown keys, invalid architecture
                raise ConversionError(f"Cannot use the config {config_source}: {error}") from error
        if config.num_labels == 1000:
            labels = imagenet_labels()
            config.id2label = dict(enumerate(labels))
            config.label2id = {label: index for index, label in enumerate(labels)}
        output_dir = Path(args.output_dir or name)
        if output_dir.exists() and not args.force:
            raise ConversionError(f"{output_dir} exists; pass --force to replace it.")
        check_writable(output_dir)
        if checkpoint is None:
            checkpoint_path = fetch_checkpoint(args.checkpoint, args.model_name)
            checkpoint = read_checkpoint(checkpoint_path)
        card = CardInfo(
            model_id=repo_id or Path(os.path.abspath(output_dir)).name,  # "." has a name too
            official_name=args.model_name,
            config_source=config_source,
            license=args.license,
            datasets=args.dataset,
            remote_code=args.remote_code,
        )
        convert(config, checkpoint, checkpoint_path.name, output_dir, card, processor, force=args.force)
        logger.info(f"Wrote {output_dir}/ from {checkpoint_path}.")
        if repo_id:
            commit = hub.push_folder(output_dir, repo_id, args.token, args.private, args.commit_message)
            logger.info(f"Uploaded to {commit}")
    except (ConversionError, FolderError, hub.HubError) as error:
        print(f"focal-convert: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("focal-convert: interrupted; no unfinished folder is left behind.", file=sys.stderr)
        return 130
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous_handler)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["convert", "main"]
