# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""Convert official Focal Transformer checkpoints to Hugging Face folders (safetensors), optionally on the Hub.

    focal-convert --model-name focal-tiny --checkpoint focal-tiny-is224-ws7.pth
    focal-convert --config my_focal.yaml --checkpoint my_focal.pth --output-dir my-focal
    focal-convert --model-name focal-base --checkpoint focal-base-is224-ws7.pth --push-to-hub you/focal-base \\
        --remote-code

The folder holds `config.json` (with the ImageNet-1K class names for 1000-class models), `model.safetensors`,
`preprocessor_config.json` and a model card; it is written to a temporary folder, reloaded and checked against the
converted model, then renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import torch

from .configuration_focal import FocalConfig
from .image_processing_focal import FocalImageProcessor
from .modeling_focal import FocalForImageClassification
from .original import convert_original_state_dict, load_original_state_dict, official_config

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
REMOTE_CODE_FILES = ("configuration_focal.py", "modeling_focal.py", "original.py")  # original: from_original_config


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


def model_card(name: str, config: FocalConfig, source: str, num_parameters: int) -> str:
    """The README.md of a converted folder."""
    top1 = REPORTED_TOP1.get(name)
    kind = "Focal-fast (official `focalv2`)" if config.attention_type == "focal_fast" else "Focal (official `focal`)"
    accuracy = f"{top1} % ImageNet-1K top-1 at 224 px (reported by the authors)" if top1 else "not reported"
    return f"""---
license: mit
library_name: transformers
tags: [image-classification, vision, focal-transformer]
datasets: [imagenet-1k]
---

# {name}

A Focal Transformer — *Focal Self-attention for Local-Global Interactions in Vision Transformers* (Yang et al.,
NeurIPS 2021, [arXiv:2107.00641](https://arxiv.org/abs/2107.00641)) — image classifier, {kind} attention,
converted from the official checkpoint of [microsoft/Focal-Transformer](https://github.com/microsoft/Focal-Transformer).

- Accuracy: {accuracy}.
- Parameters: {num_parameters / 1e6:.1f}M; input {config.image_size} px (any size of at least
  {config.total_stride} px runs).
- Licence of the original weights: MIT (the official repository's).

## Usage

```python
import focal_hf  # pip install focal-hf (or load with trust_remote_code=True where the code was uploaded)
from transformers import pipeline

classifier = pipeline("image-classification", model="{name}")
classifier("cat.jpg")
```

The image processor reproduces the official evaluation transform (resize to 256 with bicubic, centre crop 224,
ImageNet mean/std).

## Conversion

Converted with `focal-convert` from `{source}`: the official state dict was renamed to the focal-hf layout, the
buffers the official code saves were dropped (they are recomputed), and the converted model was reloaded from this
folder and checked to give the same outputs. On reference inputs the focal-hf implementation matches the official
code within 1e-4.
"""


def convert(config: FocalConfig, checkpoint: Path, output_dir: Path, name: str, remote_code: bool) -> Path:
    """Convert `checkpoint` for `config` into `output_dir` (which must not exist), atomically; returns it."""
    try:
        state_dict = convert_original_state_dict(load_original_state_dict(checkpoint), config)
    except ValueError as error:
        raise ConversionError(str(error)) from error
    model = FocalForImageClassification(config).eval()
    model.load_state_dict(state_dict)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        if remote_code:
            add_remote_code(model.config, staging)
        model.save_pretrained(staging)
        processor = FocalImageProcessor()
        processor.save_pretrained(staging)
        num_parameters = sum(p.numel() for p in model.parameters())
        (staging / "README.md").write_text(model_card(name, config, checkpoint.name, num_parameters), "utf-8")
        verify(model, staging)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def add_remote_code(config: FocalConfig, folder: Path) -> None:
    """Copy the model code into `folder` and point `auto_map` at it, for `trust_remote_code=True` users."""
    package = Path(__file__).resolve().parent
    for file in REMOTE_CODE_FILES:
        shutil.copy(package / file, folder / file)
    config.auto_map = {
        "AutoConfig": "configuration_focal.FocalConfig",
        "AutoModel": "modeling_focal.FocalModel",
        "AutoModelForImageClassification": "modeling_focal.FocalForImageClassification",
        "AutoBackbone": "modeling_focal.FocalBackbone",
    }


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


def push_to_hub(folder: Path, repo_id: str, private: bool, commit_message: str) -> str:
    """Upload `folder` to the Hub model repository `repo_id` (created if needed); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message
    )
    return str(commit)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="focal-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-name", choices=sorted(OFFICIAL_FILES), help="an official ImageNet-1K architecture")
    source.add_argument("--config", help="an official-schema YAML config (with --checkpoint)")
    parser.add_argument("--checkpoint", help="a local .pth file or a URL (default for --model-name: the official URL)")
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
    args = parser.parse_args(argv)
    if args.config and not args.checkpoint:
        parser.error("--config needs --checkpoint")
    return args


def main(argv=None) -> int:
    """The `focal-convert` command; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.model_name:
            name, config = args.model_name, official_config(args.model_name)
        else:
            name = Path(args.config).stem
            try:
                config = FocalConfig.from_original_config(args.config)
            except Exception as error:  # unreadable YAML, unknown keys, invalid architecture
                raise ConversionError(f"Cannot use config {args.config!r}: {error}") from error
        if config.num_labels == 1000:
            labels = imagenet_labels()
            config.id2label = dict(enumerate(labels))
            config.label2id = {label: index for index, label in enumerate(labels)}
        output_dir = Path(args.output_dir or name)
        if output_dir.exists() and not args.force:
            raise ConversionError(f"{output_dir} exists; pass --force to replace it.")
        checkpoint = fetch_checkpoint(args.checkpoint, args.model_name)
        target = output_dir if not output_dir.exists() else output_dir.with_name(f".{output_dir.name}.new")
        convert(config, checkpoint, target, name, args.remote_code)
        if target != output_dir:  # --force: swap only once the new folder is complete
            shutil.rmtree(output_dir)
            target.rename(output_dir)
        logger.info(f"Wrote {output_dir}/ from {checkpoint}.")
        if args.push_to_hub:
            logger.info(f"Uploaded to {push_to_hub(output_dir, args.push_to_hub, args.private, args.commit_message)}")
    except ConversionError as error:
        print(f"focal-convert: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["convert", "main"]
