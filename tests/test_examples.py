"""Short runs of the fine-tuning examples on a tiny generated image folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, pipeline

import focal_hf  # noqa: F401

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import run_image_classification  # noqa: E402
import run_image_classification_no_trainer  # noqa: E402

TINY_MODEL = json.dumps(
    {
        "image_size": 32,
        "embed_dim": 16,
        "depths": [1, 1, 1, 1],
        "num_heads": [1, 2, 4, 8],
        "window_size": 4,
        "focal_windows": [3, 3, 3, 1],
        "expand_sizes": [2, 2, 2, 2],
        "drop_path_rate": 0.1,
    }
)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two easily told apart classes (bright and dark noise), 12 training and 4 validation images each."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("validation", 4)):
        for label, level in (("bright", 200), ("dark", 50)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = np.clip(rng.normal(level, 40, (40, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def model_args(image_folder):
    return [
        "--model_preset",
        "focal-tiny",
        "--config_overrides",
        TINY_MODEL,
        "--train_dir",
        str(image_folder / "train"),
        "--validation_dir",
        str(image_folder / "validation"),
        "--seed",
        "0",
    ]


def test_trainer_example_learns_and_saves_a_loadable_folder(image_folder, tmp_path):
    output = tmp_path / "trainer"
    metrics = run_image_classification.main(
        [
            *model_args(image_folder),
            "--output_dir",
            str(output),
            "--do_train",
            "--do_eval",
            "--num_train_epochs",
            "4",
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            "1e-3",
            "--logging_steps",
            "1",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
        ]
    )
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 24 and np.mean(losses[-4:]) < np.mean(losses[:4])  # the loss falls
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert (output / "model.safetensors").exists() and (output / "preprocessor_config.json").exists()
    model = AutoModelForImageClassification.from_pretrained(output)
    assert model.config.id2label == {0: "bright", 1: "dark"}
    prediction = pipeline("image-classification", model=str(output))(
        str(image_folder / "validation" / "dark" / "0.png"), top_k=2
    )
    assert {entry["label"] for entry in prediction} == {"bright", "dark"}


def no_trainer_args(image_folder, output, *extra):
    return [
        *model_args(image_folder),
        "--output_dir",
        str(output),
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--lr_scheduler_type",
        "constant",
        "--crop_scale_min",
        "0.5",
        *extra,
    ]


def test_accelerate_example_learns(image_folder, tmp_path):
    metrics = run_image_classification_no_trainer.main(
        no_trainer_args(image_folder, tmp_path, "--num_train_epochs", "4")
    )
    losses = metrics["train_losses"]
    assert len(losses) == 24 and np.mean(losses[-4:]) < np.mean(losses[:4])
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert reloaded.config.label2id == {"bright": 0, "dark": 1}


@pytest.mark.parametrize("stop_after", [5, 6])  # mid-epoch and at an epoch's end (6 steps per epoch)
def test_resumed_run_ends_with_the_same_weights(image_folder, tmp_path, stop_after):
    run_image_classification_no_trainer.main(no_trainer_args(image_folder, tmp_path / "full", "--max_train_steps", "9"))
    stopped = tmp_path / "stopped"
    run_image_classification_no_trainer.main(
        no_trainer_args(
            image_folder, stopped, "--max_train_steps", str(stop_after), "--checkpointing_steps", str(stop_after)
        )
    )
    run_image_classification_no_trainer.main(
        no_trainer_args(
            image_folder,
            stopped,
            "--max_train_steps",
            "9",
            "--resume_from_checkpoint",
            str(stopped / f"step_{stop_after}"),
        )
    )
    full, resumed = load_file(tmp_path / "full" / "model.safetensors"), load_file(stopped / "model.safetensors")
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=0)


def test_accelerate_example_with_two_processes(image_folder, tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(EXAMPLES / "run_image_classification_no_trainer.py"),
        *no_trainer_args(image_folder, tmp_path, "--num_train_epochs", "2"),
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MULTI_CPU" in result.stdout + result.stderr and "Num processes: 2" in result.stdout + result.stderr
    assert json.loads((tmp_path / "all_results.json").read_text())["eval_accuracy"] >= 0.0
    assert (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train_dir", "/nonexistent/folder"], "does not exist"),
        (["--image_column_name", "picture"], "No image column 'picture'"),
        (["--label_column_name", "target"], "No label column 'target'"),
    ],
)
def test_bad_arguments_are_explained(image_folder, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        run_image_classification.main(
            [*model_args(image_folder), "--output_dir", str(tmp_path), "--do_train", "--report_to", "none", *extra]
        )


def test_missing_data_and_model_are_explained(tmp_path):
    with pytest.raises(ValueError, match="Give the data"):
        run_image_classification.main(["--model_preset", "focal-tiny", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse error: exactly one model source
        run_image_classification_no_trainer.main(["--train_dir", str(tmp_path), "--output_dir", str(tmp_path)])


def test_unlabelled_data_is_explained(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for index in range(4):
        Image.new("RGB", (32, 32)).save(folder / f"{index}.png")
    with pytest.raises(ValueError, match="label"):
        run_image_classification.main(
            [
                "--model_preset",
                "focal-tiny",
                "--train_dir",
                str(folder),
                "--output_dir",
                str(tmp_path / "out"),
                "--do_train",
                "--report_to",
                "none",
            ]
        )
