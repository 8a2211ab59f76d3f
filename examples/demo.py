#!/usr/bin/env python
# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""Offline demo: train a small Focal Transformer from scratch on scikit-learn's handwritten digits (a real data set
shipped inside scikit-learn, no download), through the Trainer example, then classify held-out digits with
`pipeline("image-classification")`.

    python examples/demo.py [--output_dir focal-digits] [--epochs 12]

About 2-3 minutes on 2 CPU cores. The saved folder loads with `AutoModelForImageClassification.from_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_image_classification  # noqa: E402

IMAGE_SIZE = 32
# A small Focal model for 32x32 images: 3 stages (16x16, 8x8, 4x4 tokens), windows of 4 tokens, two focal levels.
MODEL = {
    "image_size": IMAGE_SIZE,
    "patch_size": 2,
    "embed_dim": 32,
    "depths": [1, 2, 1],
    "num_heads": [2, 4, 8],
    "window_size": 4,
    "focal_levels": [2, 2, 2],
    "focal_windows": [3, 3, 1],
    "expand_sizes": [2, 2, 2],
    "focal_stages": [0, 1, 2],
    "drop_path_rate": 0.0,
}


def write_digits(root: Path) -> tuple[Path, Path, list[tuple[Path, int]]]:
    """Write the digits as 32x32 RGB PNGs in `<root>/{train,validation}/<digit>/`; returns the two folders and
    a few held-out (path, label) pairs."""
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).astype(np.uint8)  # 8x8, values 0..16
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    held_out = []
    for split, xs, ys in (("train", train_x, train_y), ("validation", test_x, test_y)):
        for index, (image, label) in enumerate(zip(xs, ys)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{index:04d}.png"
            canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE))  # digit 24x24 in the middle: crops keep it whole
            canvas.paste(Image.fromarray(image).resize((24, 24), Image.BICUBIC), (4, 4))
            canvas.convert("RGB").save(path)
            if split == "validation" and len(held_out) < 10:
                held_out.append((path, int(label)))
    return root / "train", root / "validation", held_out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output_dir", default="focal-digits", help="where the trained model is saved (an earlier demo's is replaced)"
    )
    parser.add_argument("--epochs", type=float, default=30)
    args = parser.parse_args(argv)
    start = time.time()

    with tempfile.TemporaryDirectory() as data_root:
        train_dir, validation_dir, held_out = write_digits(Path(data_root))
        print(
            f"Digits: {sum(1 for _ in train_dir.rglob('*.png'))} training and "
            f"{sum(1 for _ in validation_dir.rglob('*.png'))} held-out images, {IMAGE_SIZE}x{IMAGE_SIZE}."
        )
        metrics = run_image_classification.main(
            [
                "--model_preset",
                "focal-tiny",
                "--config_overrides",
                json.dumps(MODEL),
                "--train_dir",
                str(train_dir),
                "--validation_dir",
                str(validation_dir),
                "--crop_scale_min",
                "0.6",
                "--horizontal_flip",
                "false",  # a flipped digit is another digit
                "--output_dir",
                args.output_dir,
                "--overwrite_output_dir",  # a rerun of the demo trains anew
                "--do_train",
                "--do_eval",
                "--num_train_epochs",
                str(args.epochs),
                "--per_device_train_batch_size",
                "32",
                "--per_device_eval_batch_size",
                "64",
                "--learning_rate",
                "2e-3",
                "--weight_decay",
                "0.05",
                "--warmup_steps",
                "40",
                "--lr_scheduler_type",
                "cosine",
                "--eval_strategy",
                "no",
                "--save_strategy",
                "no",
                "--logging_steps",
                "20",
                "--report_to",
                "none",
                "--dataloader_num_workers",
                "0",
                "--seed",
                "0",
            ]
        )

        from transformers import AutoModelForImageClassification, pipeline

        import focal_hf  # noqa: F401  (registers the Focal classes with the Auto API)

        model = AutoModelForImageClassification.from_pretrained(args.output_dir)
        classifier = pipeline("image-classification", model=args.output_dir)
        print(
            f"\nReloaded {type(model).__name__} from {args.output_dir}/ "
            f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)."
        )
        print("Held-out digits through pipeline('image-classification'):")
        print(f"  {'true':>4}  {'predicted':>9}  {'score':>5}")
        for path, label in held_out:
            best = classifier(str(path), top_k=1)[0]
            mark = "" if best["label"] == str(label) else "  <- wrong"
            print(f"  {label:>4}  {best['label']:>9}  {best['score']:5.2f}{mark}")
    print(
        f"\nHeld-out accuracy: {metrics['eval_accuracy']:.2%} "
        f"({time.time() - start:.0f} s in all). Model saved in {args.output_dir}/."
    )
    return metrics


if __name__ == "__main__":
    main()
