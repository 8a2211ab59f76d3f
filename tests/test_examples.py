"""Short runs of the fine-tuning examples on a tiny generated image folder."""

import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hub_http_error, load_without_focal_hf
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

import focal_hf
from focal_hf import hub

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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
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
    if not torch.accelerator.is_available():  # pin_memory is turned off where there is nothing to pin to
        assert not [w for w in caught if "pin_memory" in str(w.message)]
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
    # a model card either way: the folder's name in the usage snippet, the measured accuracy, nothing invented
    card = ModelCard.load(output / "README.md")
    assert card.data.pipeline_tag == "image-classification" and card.data.library_name == "transformers"
    assert (
        'model="trainer"' in card.text and "trust_remote_code" not in card.text and "@misc{yang2021focal" in card.text
    )
    assert card.data.license is None and card.data.base_model is None and card.data.datasets is None
    [result] = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_type) == (
        "accuracy",
        metrics["eval_accuracy"],
        "imagefolder",
    )


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
    card = ModelCard.load(tmp_path / "README.md")  # a card, pushed or not
    assert f'model="{tmp_path.name}"' in card.text and card.data.eval_results[0].metric_value == metrics["accuracy"]


# mid-epoch and at an epoch's end (6 steps per epoch); and training LoRA adapters (their checkpoints)
@pytest.mark.parametrize("stop_after, lora", [(5, []), (6, []), (5, ["--lora_rank", "4"])])
def test_resumed_run_ends_with_the_same_weights(image_folder, tmp_path, stop_after, lora):
    run_image_classification_no_trainer.main(
        no_trainer_args(image_folder, tmp_path / "full", "--max_train_steps", "9", *lora)
    )
    stopped = tmp_path / "stopped"
    run_image_classification_no_trainer.main(
        no_trainer_args(
            image_folder, stopped, "--max_train_steps", str(stop_after), "--checkpointing_steps", str(stop_after), *lora
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
            *lora,
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
        *no_trainer_args(image_folder, tmp_path, "--num_train_epochs", "2", "--checkpointing_steps", "epoch"),
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
    # checkpoints saved by both processes, each renamed into place once complete
    assert sorted(p.name for p in tmp_path.glob("*epoch_*")) == ["epoch_0", "epoch_1"]
    assert json.loads((tmp_path / "epoch_1" / "progress.json").read_text()) == {"step": 6}
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (tmp_path / "epoch_1").iterdir()}


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


def trainer_args(image_folder, output, *extra, save_steps=None):
    """A short Trainer run (one epoch) of the tiny model, with a checkpoint every `save_steps` steps if given."""
    return [
        *model_args(image_folder),
        "--output_dir",
        str(output),
        "--do_train",
        "--do_eval",
        "--num_train_epochs",
        "1",
        "--per_device_train_batch_size",
        "8",
        "--report_to",
        "none",
        *(["--save_strategy", "steps", "--save_steps", str(save_steps)] if save_steps else ["--save_strategy", "no"]),
        *extra,
    ]


def test_trainer_push_to_hub_with_remote_code(image_folder, tmp_path, fake_hub):
    output = tmp_path / "trainer"
    args = ["--push_to_hub", "--hub_model_id", "you/focal-bright-dark", "--hub_token", "hf_x", "--remote_code"]
    metrics = run_image_classification.main(trainer_args(image_folder, output, *args))
    assert fake_hub.calls[0] == ("whoami", "hf_x")  # checked before any work
    assert [call[:2] for call in fake_hub.calls[1:]] == [
        ("create_repo", "you/focal-bright-dark"),
        ("upload_folder", "you/focal-bright-dark"),
    ]
    [upload] = fake_hub.uploads
    assert {
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "configuration_focal.py",
        "modeling_focal.py",
        "image_processing_focal.py",
        "requirements.py",
        "triton_attention.py",
    } <= set(upload)
    config = json.loads(upload["config.json"].read_text())
    assert config["id2label"] == {"0": "bright", "1": "dark"} and config["auto_map"] == hub.AUTO_MAP
    card = ModelCard.load(upload["README.md"])
    assert 'model="you/focal-bright-dark")' in card.text
    assert 'model="you/focal-bright-dark", trust_remote_code=True)' in card.text
    assert card.data.eval_results[0].metric_value == metrics["eval_accuracy"]
    # the uploaded folder works for a user without focal_hf: same labels and scores as with it
    image = image_folder / "validation" / "dark" / "0.png"
    remote = load_without_focal_hf(output, image, tmp_path)
    assert remote["classes"] == ["FocalImageProcessor", "FocalForImageClassification", "FocalForImageClassification"]
    expected = pipeline("image-classification", model=str(output))(Image.open(image), top_k=5)
    assert [p["label"] for p in remote["predictions"]] == [p["label"] for p in expected] and len(expected) == 2
    assert [p["score"] for p in remote["predictions"]] == pytest.approx([p["score"] for p in expected], abs=1e-6)


def test_accelerate_push_to_hub(image_folder, tmp_path, fake_hub):
    output = tmp_path / "focal-run"
    args = ["--max_train_steps", "2", "--checkpointing_steps", "1", "--push_to_hub", "--hub_token", "hf_x"]
    metrics = run_image_classification_no_trainer.main(no_trainer_args(image_folder, output, *args))
    assert fake_hub.calls[:2] == [
        ("whoami", "hf_x"),
        ("create_repo", "you/focal-run", {"private": False, "exist_ok": True, "repo_type": "model"}),
    ]
    assert fake_hub.calls[2][:2] == ("upload_folder", "you/focal-run") and len(fake_hub.calls) == 3
    assert (output / "step_2").is_dir()  # the checkpoints stay local
    [upload] = fake_hub.uploads
    assert sorted(upload) == [
        "README.md",
        "all_results.json",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]  # no code unless --remote_code
    assert json.loads(upload["config.json"].read_text())["id2label"] == {"0": "bright", "1": "dark"}
    card = ModelCard.load(upload["README.md"])
    assert 'model="you/focal-run")' in card.text and card.data.eval_results[0].metric_value == metrics["accuracy"]


def test_push_is_checked_before_any_work(image_folder, tmp_path, monkeypatch):
    import huggingface_hub.hf_api

    output = tmp_path / "out"
    # HF_HUB_OFFLINE=1 (as in these tests): one clear error, nothing trained or written
    with pytest.raises(hub.HubError, match="offline mode is on"):
        run_image_classification.main(trainer_args(image_folder, output, "--push_to_hub", "--hub_token", "hf_x"))
    monkeypatch.setattr(huggingface_hub.hf_api, "get_token", lambda: None)  # nobody logged in
    with pytest.raises(hub.HubError, match="no Hugging Face token"):
        run_image_classification_no_trainer.main(no_trainer_args(image_folder, output, "--push_to_hub"))
    with pytest.raises(SystemExit):  # an invalid repository id is an argument error
        run_image_classification_no_trainer.main(
            no_trainer_args(image_folder, output, "--push_to_hub", "--hub_model_id", "you/my photos")
        )
    with pytest.raises(hub.HubError, match="not a valid Hub repository id"):
        run_image_classification.main(
            trainer_args(image_folder, output, "--push_to_hub", "--hub_model_id", "you/my/photos")
        )
    assert not output.exists()


def test_failed_accelerate_upload_keeps_the_folder(image_folder, tmp_path, fake_hub, monkeypatch):
    from huggingface_hub import HfApi

    def upload_folder(api, **kwargs):
        raise ConnectionError("Connection reset by peer")

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    output = tmp_path / "run"
    command = f"hf upload you/run {output} . --repo-type model --exclude 'step_*' --exclude 'epoch_*' --exclude '.*'"
    with pytest.raises(hub.HubError, match=re.escape(command)):
        run_image_classification_no_trainer.main(
            no_trainer_args(image_folder, output, "--max_train_steps", "1", "--push_to_hub")
        )
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"} <= {
        p.name for p in output.iterdir()
    }
    assert AutoModelForImageClassification.from_pretrained(output).config.num_labels == 2


def save_three_class_model(folder):
    """A tiny 3-class model and its image processor saved in `folder`; the model."""
    config = focal_hf.FocalConfig(**json.loads(TINY_MODEL), num_labels=3)
    model = focal_hf.FocalForImageClassification(config)
    model.save_pretrained(folder)
    focal_hf.FocalImageProcessor.for_image_size(config.image_size).save_pretrained(folder)
    return model


def test_ignore_mismatched_sizes_flag(tmp_path):
    # a saved 3-class model, fine-tuned on 2 labels: its classifier is replaced only when allowed
    save_three_class_model(tmp_path / "three")
    argv = ["--model_name_or_path", str(tmp_path / "three"), "--train_dir", str(tmp_path), "--output_dir", "o"]
    assert run_image_classification_no_trainer.parse_args(argv).model.ignore_mismatched_sizes is True
    assert run_image_classification_no_trainer.parse_args([*argv, "--ignore_mismatched_sizes"]).ignore_mismatched_sizes
    refused = run_image_classification_no_trainer.parse_args([*argv, "--no_ignore_mismatched_sizes"]).model
    assert refused.ignore_mismatched_sizes is False
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        run_image_classification.load_model(refused, ["a", "b"])
    allowed = run_image_classification_no_trainer.parse_args([*argv, "--ignore_mismatched_sizes", "true"]).model
    model, _ = run_image_classification.load_model(allowed, ["a", "b"])
    assert model.classifier.out_features == 2


def lora_trainer_args(image_folder, base, output, *extra, save_steps=None):
    """`trainer_args` fine-tuning the saved model `base` with LoRA adapters of rank 4."""
    argv = trainer_args(
        image_folder, output, "--lora_rank", "4", "--learning_rate", "1e-2", *extra, save_steps=save_steps
    )
    return from_saved_model(argv, base)


def from_saved_model(argv: list[str], base) -> list[str]:
    """Example arguments `argv` with the saved model `base` in place of the preset."""
    argv = list(argv)
    argv[argv.index("--model_preset") : argv.index("--config_overrides") + 2] = ["--model_name_or_path", str(base)]
    return argv


@pytest.mark.parametrize("script", ["trainer", "accelerate"])
def test_example_with_lora_saves_the_merged_model(image_folder, tmp_path, caplog, script):
    base = save_three_class_model(tmp_path / "base")
    output = tmp_path / "lora"
    with caplog.at_level("INFO", logger="run_image_classification"):
        if script == "trainer":
            argv = lora_trainer_args(image_folder, tmp_path / "base", output, "--log_level", "info")
            accuracy = run_image_classification.main(argv)["eval_accuracy"]
        else:
            argv = no_trainer_args(image_folder, output, "--num_train_epochs", "1", "--lora_rank", "4")
            argv[argv.index("--learning_rate") + 1] = "1e-2"
            accuracy = run_image_classification_no_trainer.main(from_saved_model(argv, tmp_path / "base"))["accuracy"]

    assert re.search(r"LoRA of rank 4: training [\d,]+ of [\d,]+ weights", caplog.text)
    assert 0.0 <= accuracy <= 1.0
    assert (output / "model.safetensors").exists() and not (output / "adapter_config.json").exists()
    model = AutoModelForImageClassification.from_pretrained(output)  # a plain model: the adapters merged in
    assert type(model) is focal_hf.FocalForImageClassification and model.config.id2label == {0: "bright", 1: "dark"}
    assert not any("lora" in name for name in load_file(output / "model.safetensors"))
    trained, kept = model.state_dict(), base.state_dict()
    for name, weight in kept.items():
        if name.endswith(("qkv.weight", "proj.weight")):
            assert not torch.equal(trained[name], weight), name  # the adapters' product, merged
        elif not name.startswith("classifier."):
            torch.testing.assert_close(trained[name], weight, rtol=0, atol=0, msg=name)  # frozen
    assert model.classifier.out_features == 2
    assert "- LoRA rank (qkv, proj; merged): 4" in (output / "README.md").read_text()  # the model card says so


def test_trainer_example_with_lora_resumed_ends_with_the_same_weights(image_folder, tmp_path):
    save_three_class_model(tmp_path / "base")
    full = lora_trainer_args(image_folder, tmp_path / "base", tmp_path / "full", "--logging_steps", "1", save_steps=2)
    run_image_classification.main(full)
    checkpoint = tmp_path / "full/checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists()  # checkpoints hold the adapters
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"][0]["loss"] = 123.0  # a marker: a resumed run continues this log, a restarted one would not
    state_file.write_text(json.dumps(state))
    resumed = lora_trainer_args(
        image_folder,
        tmp_path / "base",
        tmp_path / "resumed",
        "--resume_from_checkpoint",
        str(checkpoint),
        "--logging_steps",
        "1",
    )
    run_image_classification.main(resumed)
    history = json.loads((tmp_path / "resumed/trainer_state.json").read_text())["log_history"]
    assert [(entry["step"], entry["loss"] == 123.0) for entry in history if "loss" in entry] == [
        (1, True),
        (2, False),
        (3, False),
    ]
    full, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("full", "resumed"))
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora_rank", "0"], "--lora_rank must be a positive integer, got 0"),
        (["--lora_alpha", "8"], "--lora_alpha needs --lora_rank"),
    ],
)
def test_bad_lora_arguments_are_explained(image_folder, tmp_path, extra, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        run_image_classification.main(trainer_args(image_folder, tmp_path / "out", *extra))


def test_processor_follows_the_model_image_size(tmp_path):
    args = run_image_classification.ModelArguments(model_preset="focal-tiny", config_overrides=TINY_MODEL)
    model, processor = run_image_classification.load_model(args, ["a", "b"])
    assert processor.crop_size == {"height": 32, "width": 32} and processor.size == {"shortest_edge": 36}
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    # a pretrained folder used at another image size: the processor crops that size
    args = run_image_classification.ModelArguments(
        model_name_or_path=str(tmp_path), config_overrides='{"image_size": 64}'
    )
    model, processor = run_image_classification.load_model(args, ["a", "b"])
    assert model.config.image_size == 64
    assert processor.crop_size == {"height": 64, "width": 64} and processor.size == {"shortest_edge": 73}
    assert AutoImageProcessor.from_pretrained(tmp_path).crop_size == {"height": 32, "width": 32}


def test_trainer_repository_creation_refused_is_one_error(image_folder, tmp_path, fake_hub, monkeypatch):
    from huggingface_hub import HfApi

    def create_repo(api, repo_id, **kwargs):
        raise hub_http_error(403, "403 Forbidden: no rights in namespace 'org'")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    output = tmp_path / "out"
    with pytest.raises(hub.HubError, match="Cannot create the Hub repository 'org/focal': 403 Forbidden"):
        run_image_classification.main(
            trainer_args(image_folder, output, "--push_to_hub", "--hub_model_id", "org/focal")
        )
    assert not (output / "model.safetensors").exists()  # refused before training


# ------------------------------------------------------------------ output folders, checkpoints and bad data
def test_trainer_refuses_a_used_output_dir_unless_resuming_or_overwriting(image_folder, tmp_path):
    output = tmp_path / "trainer"
    run_image_classification.main(trainer_args(image_folder, output, "--max_steps", "2", save_steps=1))
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert stat.S_IMODE((output / "model.safetensors").stat().st_mode) == 0o666 & ~current_umask()
    before = (output / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="is not empty .*--resume_from_checkpoint latest.*--overwrite_output_dir"):
        run_image_classification.main(trainer_args(image_folder, output, "--max_steps", "1", save_steps=1))
    assert (output / "model.safetensors").read_bytes() == before  # nothing touched

    # resuming the newest checkpoint continues that run
    run_image_classification.main(
        trainer_args(image_folder, output, "--max_steps", "3", "--resume_from_checkpoint", "latest", save_steps=1)
    )
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and [e["step"] for e in state["log_history"] if "train_loss" in e] == [3]
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]

    # --overwrite_output_dir trains anew: none of the earlier run's checkpoints is left mixed in
    run_image_classification.main(
        trainer_args(image_folder, output, "--max_steps", "1", "--overwrite_output_dir", save_steps=1)
    )
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 1

    with pytest.raises(ValueError, match="no checkpoint-\\* folder in"):
        run_image_classification.main(
            trainer_args(
                image_folder, tmp_path / "new", "--max_steps", "1", "--resume_from_checkpoint", "latest", save_steps=1
            )
        )


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Killed(BaseException):
    """Stands for a kill: the process stops where it is."""


def test_interrupted_accelerate_checkpoint_save_leaves_no_checkpoint(image_folder, tmp_path, monkeypatch, capsys):
    from accelerate import Accelerator

    real_save_state = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        real_save_state(self, output_dir, **kwargs)
        if Path(output_dir).name.startswith(".step_2"):  # killed while the optimizer state was being written
            (Path(output_dir) / "optimizer.bin").write_bytes(b"")
            raise Killed

    stopped = tmp_path / "stopped"
    monkeypatch.setattr(Accelerator, "save_state", save_state)
    three_steps = ["--max_train_steps", "3", "--checkpointing_steps", "1"]
    with pytest.raises(Killed):
        run_image_classification_no_trainer.main(no_trainer_args(image_folder, stopped, *three_steps))
    monkeypatch.undo()
    assert sorted(p.name for p in stopped.iterdir()) == [".step_2.new", "step_1"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in (stopped / "step_1").iterdir()} == {0o666 & ~current_umask()}

    # a checkpoint of an earlier version's interrupted save: named, and the newest complete one pointed to
    shutil.copytree(stopped / ".step_2.new", stopped / "step_2")
    with pytest.raises(SystemExit):
        run_image_classification_no_trainer.main(
            no_trainer_args(image_folder, stopped, "--resume_from_checkpoint", str(stopped / "step_2"))
        )
    error = capsys.readouterr().err
    assert "is not a complete checkpoint" in error and f"The newest complete one is {stopped / 'step_1'}" in error
    shutil.rmtree(stopped / "step_2")

    # `latest` resumes from the newest complete checkpoint and ends as an uninterrupted run does
    run_image_classification_no_trainer.main(
        no_trainer_args(image_folder, stopped, *three_steps, "--resume_from_checkpoint", "latest")
    )
    assert f"Resumed from {stopped / 'step_1'} at step 1" in capsys.readouterr().out
    assert sorted(p.name for p in stopped.glob("*step_*")) == ["step_1", "step_2", "step_3"]  # no leftover
    run_image_classification_no_trainer.main(no_trainer_args(image_folder, tmp_path / "full", "--max_train_steps", "3"))
    full, resumed = load_file(tmp_path / "full" / "model.safetensors"), load_file(stopped / "model.safetensors")
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=0)
    assert stat.S_IMODE((stopped / "model.safetensors").stat().st_mode) == 0o666 & ~current_umask()


def test_resume_latest_without_checkpoints_is_explained(image_folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_image_classification_no_trainer.main(
            no_trainer_args(image_folder, tmp_path, "--resume_from_checkpoint", "latest")
        )
    assert "there is no complete checkpoint in" in capsys.readouterr().err


def test_empty_class_folder_is_named(image_folder, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(image_folder / "train", train)
    (train / "grey").mkdir()
    (train / "grey" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"Class folder\\(s\\) without images: {train / 'grey'}\\."):
        run_image_classification.main(
            [*model_args(image_folder)[:4], "--train_dir", str(train), "--output_dir", str(tmp_path / "out")]
        )


def test_unreadable_image_is_named(image_folder, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(image_folder / "train", train)
    jpeg = io.BytesIO()
    Image.open(train / "dark" / "0.png").save(jpeg, "JPEG")
    (train / "dark" / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    with pytest.raises(ValueError, match=f"Cannot read image {train / 'dark' / 'truncated.jpg'}: .*truncated"):
        run_image_classification.main(
            [
                *model_args(image_folder)[:4],
                "--train_dir",
                str(train),
                "--output_dir",
                str(tmp_path / "out"),
                "--do_train",
                "--num_train_epochs",
                "1",  # every image is read
                "--report_to",
                "none",
            ]
        )


def test_16_bit_training_images_are_read_as_their_8_bit_values(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 40).round().astype(np.uint16), (36, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    image = run_image_classification.read_image({"path": str(tmp_path / "ramp.png"), "bytes": None})
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image)[..., 0], np.rint(ramp / 257).astype(np.uint8))
