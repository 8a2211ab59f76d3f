"""The converter: official fixtures end to end, every official architecture, bad input, Hub upload, remote code,
and the converted folder through the Auto classes and the pipeline."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import (
    FIXTURES,
    PARITY_CASES,
    hub_http_error,
    load_without_focal_hf,
    official_training_checkpoint,
    synthetic_official_checkpoint,
)
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline

from focal_hf import FocalForImageClassification, convert, hub, image_processor_from_original
from focal_hf.convert import OFFICIAL_FILES, imagenet_labels

OFFICIAL = json.loads((FIXTURES / "official_checkpoints.json").read_text())
# ImageNet-1K top-1 of the official checkpoints, as the official README reports them
REPORTED = {
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


def run(*args):
    return convert.main([str(arg) for arg in args])


def fixture_args(case, output):
    """Converter arguments for a reference fixture."""
    return ["--config", FIXTURES / f"{case}.yaml", "--checkpoint", FIXTURES / f"{case}.pth", "--output-dir", output]


@pytest.mark.parametrize("case", PARITY_CASES)
def test_fixtures_convert_end_to_end(tmp_path, case):
    output = tmp_path / case
    assert run(*fixture_args(case, output)) == 0
    assert sorted(p.name for p in output.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    model = AutoModelForImageClassification.from_pretrained(output).eval()
    # the processor follows the official config: crop DATA.IMG_SIZE, shorter side int(256 / 224 * IMG_SIZE)
    processor = AutoImageProcessor.from_pretrained(output)
    image_size = yaml.safe_load((FIXTURES / f"{case}.yaml").read_text())["DATA"]["IMG_SIZE"]
    assert model.config.image_size == image_size
    assert processor.crop_size == {"height": image_size, "width": image_size}
    assert processor.size == {"shortest_edge": {224: 256, 64: 73, 80: 91}[image_size]}
    card = ModelCard.load(output / "README.md")
    assert card.data.pipeline_tag == "image-classification" and f'model="{case}"' in card.text
    assert card.data.license is None and card.data.datasets is None  # custom checkpoint: nothing invented
    io = load_file(FIXTURES / f"{case}.io.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(io["pixel_values"]).logits, io["logits"], atol=1e-4, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == [case]  # no staging folder left behind


@pytest.mark.parametrize("name", sorted(OFFICIAL_FILES))
def test_every_official_architecture_from_a_synthetic_checkpoint(tmp_path, name):
    checkpoint = synthetic_official_checkpoint(name, tmp_path / "checkpoint.pth")
    output = tmp_path / name
    assert run("--model-name", name, "--checkpoint", checkpoint, "--output-dir", output) == 0
    config = json.loads((output / "config.json").read_text())
    assert config["id2label"]["0"] == "tench, Tinca tinca" and len(config["id2label"]) == 1000
    weights = load_file(output / "model.safetensors")
    assert sum(tensor.numel() for tensor in weights.values()) == OFFICIAL[name]["num_parameters"]
    card = ModelCard.load(output / "README.md")
    assert card.data.license == "mit" and card.data.datasets == ["imagenet-1k"]  # the official repository's LICENSE
    assert card.data.pipeline_tag == "image-classification" and card.data.library_name == "transformers"
    assert {"vision", "image-classification", "focal-transformer"} <= set(card.data.tags)
    [result] = card.data.eval_results
    assert (result.dataset_type, result.metric_type, result.metric_value) == ("imagenet-1k", "accuracy", REPORTED[name])
    assert result.source_url == "https://github.com/microsoft/Focal-Transformer"
    # as named in the official repository's configs/
    official_yaml = name.replace("focal-fast-", "focalv2-").replace("-", "_") + ("_useconv" if "fast" in name else "")
    official_yaml += "_patch4_window7_224.yaml"
    assert f"official config `{official_yaml}`" in card.text and "within a maximum" in card.text
    assert "@misc{yang2021focal" in card.text and "eprint={2107.00641}" in card.text
    assert f'model="{name}"' in card.text and "trust_remote_code" not in card.text


def test_imagenet_labels_are_the_1000_classes():
    labels = imagenet_labels()
    assert len(labels) == 1000 and labels[0] == "tench, Tinca tinca" and labels[-1].startswith("toilet tissue")
    # ImageNet's one duplicated name: the bird (134) and the machine (517)
    assert [index for index, label in enumerate(labels) if labels.count(label) > 1] == [134, 517]


def test_bad_input_writes_nothing(tmp_path, capsys):
    output = tmp_path / "out"
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    assert (
        run("--config", FIXTURES / "v1_fc_224.yaml", "--checkpoint", tmp_path / "junk.pth", "--output-dir", output) == 1
    )
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    # a checkpoint of another architecture: missing, unexpected and mis-shaped keys are named
    mismatched = ["--config", FIXTURES / "v1_fc_224.yaml", "--checkpoint", FIXTURES / "v1_useconv_224.pth"]
    assert run(*mismatched, "--output-dir", output) == 1
    assert "does not match the config" in capsys.readouterr().err
    assert run("--model-name", "focal-tiny", "--checkpoint", tmp_path / "missing.pth", "--output-dir", output) == 1
    assert "does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pth"]
    with pytest.raises(SystemExit) as exit_info:
        run("--model-name", "focal-huge")
    assert exit_info.value.code != 0


def test_offline_download_failure_is_one_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(convert, "CACHE", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    assert run("--model-name", "focal-tiny") == 1
    error = capsys.readouterr().err
    assert OFFICIAL_FILES["focal-tiny"] in error and "--checkpoint" in error and "PublicAccessNotPermitted" in error
    assert not (tmp_path / "focal-tiny").exists()


def test_existing_output_needs_force(tmp_path, capsys):
    args = fixture_args("v1_fc_224", tmp_path / "out")
    assert run(*args) == 0
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    assert run(*args) == 1 and "--force" in capsys.readouterr().err
    assert (tmp_path / "out" / "mine.txt").exists()
    assert run(*args, "--force") == 0
    assert not (tmp_path / "out" / "mine.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()


def test_push_to_hub_sends_the_folder(tmp_path, fake_hub):
    output = tmp_path / "out"
    args = ["--push-to-hub", "you/focal", "--private", "--remote-code", "--commit-message", "Focal!", "--token", "hf_x"]
    assert run(*fixture_args("v1_fc_224", output), *args) == 0
    assert fake_hub.calls == [
        ("whoami", "hf_x"),  # credentials and reachability first
        ("create_repo", "you/focal", {"private": True, "exist_ok": True, "repo_type": "model"}),
        ("upload_folder", "you/focal", {"repo_type": "model", "commit_message": "Focal!", "ignore_patterns": None}),
    ]
    [upload] = fake_hub.uploads
    assert sorted(upload) == [
        "README.md",
        "config.json",
        "configuration_focal.py",
        "image_processing_focal.py",
        "model.safetensors",
        "modeling_focal.py",
        "preprocessor_config.json",
        "requirements.py",
        "triton_attention.py",
    ]
    card = ModelCard.load(upload["README.md"])
    assert card.data.pipeline_tag == "image-classification" and "custom_code" in card.data.tags
    # the usage snippets name the Hub repository, with and without focal_hf
    assert 'model="you/focal")' in card.text and 'model="you/focal", trust_remote_code=True)' in card.text
    assert "(`torch>=2.7` and `transformers>=5.18`; an older release is named when the code is loaded)" in card.text
    assert json.loads(upload["config.json"].read_text())["auto_map"] == hub.AUTO_MAP


def test_push_to_hub_bare_name_goes_to_the_users_namespace(tmp_path, fake_hub):
    assert run(*fixture_args("v1_fc_224", tmp_path / "out"), "--push-to-hub", "focal") == 0
    assert [call[1] for call in fake_hub.calls[1:]] == ["you/focal", "you/focal"]
    assert 'model="you/focal"' in ModelCard.load(tmp_path / "out" / "README.md").text


def test_custom_checkpoint_card_has_what_the_user_passes(tmp_path):
    output = tmp_path / "out"
    assert run(*fixture_args("v1_fc_224", output), "--license", "apache-2.0", "--dataset", "my/flowers") == 0
    card = ModelCard.load(output / "README.md")
    assert card.data.license == "apache-2.0" and card.data.datasets == ["my/flowers"] and not card.data.eval_results
    assert "official config `v1_fc_224.yaml`" in card.text and 'model="out"' in card.text
    with pytest.raises(SystemExit):  # official checkpoints get the official license and data
        run("--model-name", "focal-tiny", "--license", "apache-2.0")


def test_training_checkpoint_converts_with_the_config_saved_in_it(tmp_path, capsys, monkeypatch):
    checkpoint = official_training_checkpoint("v1_shift_mean_64", tmp_path)
    output = tmp_path / "out"
    assert run("--checkpoint", checkpoint, "--output-dir", output) == 0
    model = FocalForImageClassification.from_pretrained(output).eval()
    io = load_file(FIXTURES / "v1_shift_mean_64.io.safetensors")
    with torch.no_grad():
        logits = model(io["pixel_values"]).logits
    torch.testing.assert_close(logits, io["logits"], atol=1e-4, rtol=0)
    processor = AutoImageProcessor.from_pretrained(output)
    expected = image_processor_from_original(FIXTURES / "v1_shift_mean_64.yaml")
    assert (processor.size, processor.crop_size) == (expected.size, expected.crop_size)
    card = ModelCard.load(output / "README.md")
    assert "from `ckpt_epoch_299.pth` with the official config saved in `ckpt_epoch_299.pth`" in card.text
    monkeypatch.chdir(tmp_path)
    assert run("--checkpoint", checkpoint) == 0 and (tmp_path / "ckpt_epoch_299" / "model.safetensors").is_file()
    # a released checkpoint holds no config: one error that asks for it, nothing written
    assert run("--checkpoint", FIXTURES / "v1_fc_224.pth", "--output-dir", tmp_path / "none") == 1
    error = capsys.readouterr().err
    assert "holds no official config" in error and "(--config PATH)" in error and not (tmp_path / "none").exists()
    with pytest.raises(SystemExit):
        run("--output-dir", tmp_path / "nothing")
    assert "one of --model-name, --config (with --checkpoint) or --checkpoint is required" in capsys.readouterr().err


@pytest.mark.parametrize("repo_id", ["you/focal/base", "you/focal base", "you/-focal", "you/focal.git"])
def test_invalid_repo_id_is_refused_before_any_work(tmp_path, fake_hub, capsys, repo_id):
    with pytest.raises(SystemExit) as exit_info:
        run(*fixture_args("v1_fc_224", tmp_path / "out"), "--push-to-hub", repo_id)
    assert exit_info.value.code == 2 and "not a valid Hub repository id" in capsys.readouterr().err
    assert fake_hub.calls == [] and not (tmp_path / "out").exists()


def test_push_without_credentials_or_offline_fails_before_converting(tmp_path, capsys, monkeypatch):
    import huggingface_hub.hf_api

    output = tmp_path / "out"
    monkeypatch.setattr(huggingface_hub.hf_api, "get_token", lambda: None)  # a machine nobody logged in on
    assert run(*fixture_args("v1_fc_224", output), "--push-to-hub", "you/focal") == 1
    error = capsys.readouterr().err
    assert "no Hugging Face token" in error and "hf auth login" in error and error.count("\n") == 1
    assert not output.exists()
    # a token, but HF_HUB_OFFLINE=1 (as in these tests): the real whoami call is refused before it leaves
    assert run(*fixture_args("v1_fc_224", output), "--push-to-hub", "you/focal", "--token", "hf_x") == 1
    error = capsys.readouterr().err
    assert "offline mode is on" in error and error.count("\n") == 1
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "failure, message",
    [
        (hub_http_error(401, "401 Unauthorized"), "the token is invalid or expired"),
        (ConnectionError("Name or service not known"), r"the Hub is unreachable \(ConnectionError: Name or"),
    ],
)
def test_hub_credential_failures_are_named(monkeypatch, failure, message):
    def whoami(api, *args, **kwargs):
        raise failure

    monkeypatch.setattr(HfApi, "whoami", whoami)
    with pytest.raises(hub.HubError, match=rf"Cannot push to 'you/focal': {message}"):
        hub.check_push_access("you/focal", "hf_x")


def test_read_only_token_is_refused_before_converting(tmp_path, fake_hub, capsys):
    fake_hub.role = "read"
    assert run(*fixture_args("v1_fc_224", tmp_path / "out"), "--push-to-hub", "you/focal") == 1
    assert "read-only" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_failed_upload_keeps_the_folder_and_says_how_to_upload_it(tmp_path, fake_hub, capsys, monkeypatch):
    def upload_folder(api, **kwargs):
        raise ConnectionError("Connection reset by peer")

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    output = tmp_path / "out"
    assert run(*fixture_args("v1_fc_224", output), "--push-to-hub", "you/focal", "--private") == 1
    error = capsys.readouterr().err
    assert "ConnectionError: Connection reset by peer" in error and f"The local folder {output} is complete" in error
    assert f"hf upload you/focal {output} . --repo-type model --private" in error
    assert sorted(p.name for p in output.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    assert AutoModelForImageClassification.from_pretrained(output).config.num_labels == 10


def test_remote_code_folder_runs_the_pipeline_without_focal_hf(tmp_path):
    output = tmp_path / "remote"
    assert run(*fixture_args("v1_fc_224", output), "--remote-code") == 0
    assert sorted(p.name for p in output.glob("*.py")) == [
        "configuration_focal.py",
        "image_processing_focal.py",
        "modeling_focal.py",
        "requirements.py",
        "triton_attention.py",
    ]
    assert json.loads((output / "preprocessor_config.json").read_text())["auto_map"] == {
        "AutoImageProcessor": "image_processing_focal.FocalImageProcessor"
    }
    image = FIXTURES / "images" / "flower.jpg"
    remote = load_without_focal_hf(output, image, tmp_path)
    assert remote["classes"] == ["FocalImageProcessor", "FocalForImageClassification", "FocalForImageClassification"]
    assert all(module.startswith("transformers_modules.") for module in remote["code"])
    expected = pipeline("image-classification", model=str(output))(Image.open(image), top_k=5)
    assert [p["label"] for p in remote["predictions"]] == [p["label"] for p in expected]
    assert [p["score"] for p in remote["predictions"]] == pytest.approx([p["score"] for p in expected], abs=1e-6)
    # the model code alone reproduces the official outputs
    script = f"""
import sys
sys.modules["focal_hf"] = None
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained({str(output)!r}, trust_remote_code=True).eval()
io = load_file({str(FIXTURES / "v1_fc_224.io.safetensors")!r})
with torch.no_grad():
    print(float((model(io["pixel_values"]).logits - io["logits"]).abs().max()))
"""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**env, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-4


def test_converted_folder_with_auto_classes_and_pipeline(tmp_path, monkeypatch):
    # a folder named like an official model, used by name from its parent as users do
    state_dict = torch.load(FIXTURES / "v1_fc_224.pth", weights_only=True)
    torch.save(state_dict, tmp_path / "checkpoint.pth")
    monkeypatch.chdir(tmp_path)
    assert (
        run("--config", FIXTURES / "v1_fc_224.yaml", "--checkpoint", "checkpoint.pth", "--output-dir", "focal-base")
        == 0
    )
    assert type(AutoModel.from_pretrained("focal-base")).__name__ == "FocalModel"
    assert isinstance(AutoModelForImageClassification.from_pretrained("focal-base"), FocalForImageClassification)
    classifier = pipeline("image-classification", model="focal-base")
    for photo in ("china", "flower"):
        predictions = classifier(Image.open(FIXTURES / "images" / f"{photo}.jpg"), top_k=3)
        assert len(predictions) == 3 and all(0 <= p["score"] <= 1 for p in predictions)
        assert all(isinstance(p["label"], str) for p in predictions)
