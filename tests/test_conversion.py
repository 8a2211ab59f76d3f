"""The converter: official fixtures end to end, every official architecture, bad input, Hub upload, remote code,
and the converted folder through the Auto classes and the pipeline."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURES, PARITY_CASES
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForImageClassification, pipeline

from focal_hf import FocalForImageClassification, convert
from focal_hf.convert import OFFICIAL_FILES, imagenet_labels

OFFICIAL = json.loads((FIXTURES / "official_checkpoints.json").read_text())


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
    io = load_file(FIXTURES / f"{case}.io.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(io["pixel_values"]).logits, io["logits"], atol=1e-4, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == [case]  # no staging folder left behind


@pytest.mark.parametrize("name", sorted(OFFICIAL_FILES))
def test_every_official_architecture_from_a_synthetic_checkpoint(tmp_path, name):
    generator = torch.Generator().manual_seed(0)
    state_dict = {
        key: torch.randn(shape, generator=generator) * 0.02 for key, shape in OFFICIAL[name]["state_dict"].items()
    }
    torch.save({"model": state_dict}, tmp_path / "checkpoint.pth")
    output = tmp_path / name
    assert run("--model-name", name, "--checkpoint", tmp_path / "checkpoint.pth", "--output-dir", output) == 0
    config = json.loads((output / "config.json").read_text())
    assert config["id2label"]["0"] == "tench, Tinca tinca" and len(config["id2label"]) == 1000
    weights = load_file(output / "model.safetensors")
    assert sum(tensor.numel() for tensor in weights.values()) == OFFICIAL[name]["num_parameters"]
    card = (output / "README.md").read_text()
    assert "license: mit" in card and "2107.00641" in card and name in card


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


def test_push_to_hub_sends_the_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "create_repo",
        lambda self, repo_id, **kwargs: calls.append(("create_repo", repo_id, kwargs)),
    )

    def upload_folder(self, folder_path, repo_id, **kwargs):
        calls.append(("upload_folder", repo_id, kwargs, sorted(os.listdir(folder_path))))
        return "https://huggingface.co/you/focal/commit/0"

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert (
        run(
            *fixture_args("v1_fc_224", tmp_path / "out"),
            "--push-to-hub",
            "you/focal",
            "--private",
            "--remote-code",
            "--commit-message",
            "Focal!",
        )
        == 0
    )
    assert calls[0] == ("create_repo", "you/focal", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[1][:3] == ("upload_folder", "you/focal", {"repo_type": "model", "commit_message": "Focal!"})
    assert calls[1][3] == [
        "README.md",
        "config.json",
        "configuration_focal.py",
        "model.safetensors",
        "modeling_focal.py",
        "original.py",
        "preprocessor_config.json",
    ]


def test_remote_code_loads_without_focal_hf(tmp_path):
    output = tmp_path / "remote"
    assert (
        run(
            *fixture_args("v2_useconv_224", output),
            "--remote-code",
        )
        == 0
    )
    assert "focal_hf" not in (output / "modeling_focal.py").read_text()
    script = f"""
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained({str(output)!r}, trust_remote_code=True).eval()
assert "focal_hf" not in sys.modules, "focal_hf was imported"
io = load_file({str(FIXTURES / "v2_useconv_224.io.safetensors")!r})
with torch.no_grad():
    print(float((model(io["pixel_values"]).logits - io["logits"]).abs().max()))
"""
    src = os.path.join(os.path.dirname(convert.__file__))
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
    assert src  # the installed package is not on the path the subprocess uses for the model code


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
