"""The README's Python examples, run as a reader runs them: each block on its own (a fresh namespace, nothing
imported for it), in a folder that holds the files it names, given only the names that its prose says come from
elsewhere (`path`, `paths`, `classifier`). Each block is found by a line that only it has; every block has a test."""

import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, official_training_checkpoint, synthetic_official_checkpoint, tiny_config
from PIL import Image
from safetensors.torch import load_file
from transformers import pipeline
from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

from focal_hf import FocalForImageClassification, FocalImageProcessor, convert
from focal_hf.convert import imagenet_labels

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(document: Path) -> list[tuple[Path, str]]:
    """Each Python block of `document`, with the lines before it left blank, so that a traceback names its line."""
    text = document.read_text(encoding="utf-8")
    return [
        (document, "\n" * text.count("\n", 0, match.start(1)) + match.group(1))
        for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    ]


BLOCKS = [found for document in DOCUMENTS for found in python_blocks(document)]
# the line that tells each block apart, by the test that runs it
MARKERS = {
    "using_the_models": 'classifier = pipeline("image-classification", model="focal-base")',
    "deploying": "program = torch.export.export(model, example, dynamic_shapes=dims)",
    "official_formats": 'model = load_original_checkpoint("focal-tiny-is224-ws7.pth"',
    "bad_image_in_a_pipeline": "images.append(load_image(path))",
    # tested by tests/torchao_checks.py (in a subprocess with torchao: tests/test_quantization.py)
    "quantization": 'quantized.save_pretrained("focal-tiny-int8")',
    "lora": "model = get_peft_model(model, lora)",
    "dense_upernet": "model = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone_config",
    "dense_detr_mask2former": 'load_backbone_weights(detr, "focal-tiny")',
    "dense_pipeline": 'segmenter = pipeline("image-segmentation", model="upernet-focal-tiny-ade20k")',
}


def block(test: str) -> tuple[Path, str]:
    found = [(document, text) for document, text in BLOCKS if MARKERS[test] in text]
    assert len(found) == 1, f"{len(found)} Python blocks of the docs contain {MARKERS[test]!r}, expected one"
    return found[0]


def run(test: str, folder: Path, monkeypatch, namespace: dict | None = None, **names) -> dict:
    """The block of `test` executed in `folder`, in `namespace` (a fresh one by default) with `names` added; the
    namespace afterwards."""
    document, text = block(test)
    monkeypatch.chdir(folder)
    namespace = {} if namespace is None else namespace
    namespace.update(names)
    exec(compile(text, str(document), "exec"), namespace)
    return namespace


def convert_official(name: str, folder: Path) -> FocalForImageClassification:
    """`focal-convert --model-name NAME` into `folder`, from an official checkpoint with random weights; the model."""
    checkpoint = synthetic_official_checkpoint(name, folder.with_suffix(".pth"))
    assert convert.main(["--model-name", name, "--checkpoint", str(checkpoint), "--output-dir", str(folder)]) == 0
    return FocalForImageClassification.from_pretrained(folder).eval()


def copy_flower(folder: Path) -> Path:
    (folder / "tests/fixtures/images").mkdir(parents=True)
    return Path(shutil.copy(FIXTURES / "images/flower.jpg", folder / "tests/fixtures/images"))


def test_every_python_block_has_a_test():
    assert len(BLOCKS) == len(MARKERS), "a Python block was added to the docs or removed: give it a test here"
    assert sorted(BLOCKS) == sorted(block(test) for test in MARKERS)


def test_using_the_models(tmp_path, monkeypatch):
    convert_official("focal-base", tmp_path / "focal-base")
    copy_flower(tmp_path)

    namespace = run("using_the_models", tmp_path, monkeypatch)

    model = namespace["model"]
    assert model.config.embed_dim == 128 and model.config.depths == [2, 2, 18, 2]  # Focal-B, loaded
    assert namespace["logits"].shape == (2, 1000)  # at 320 x 256
    predictions = namespace["classifier"]("tests/fixtures/images/flower.jpg")
    assert len(predictions) == 5 and {p["label"] for p in predictions} <= set(imagenet_labels())


def test_deploying(tmp_path, monkeypatch):
    namespace = run("deploying", tmp_path, monkeypatch)

    model, program, onnx_program = namespace["model"], namespace["program"], namespace["onnx_program"]
    pixel_values = torch.randn(2, 3, 96, 160)  # another size than the example's (the batch size is static)
    with torch.no_grad():
        expected = model(pixel_values).logits
    torch.testing.assert_close(program.module()(pixel_values).logits, expected, atol=1e-4, rtol=1e-4)
    (onnx_logits, *_) = onnx_program(pixel_values)
    torch.testing.assert_close(onnx_logits, expected, atol=1e-4, rtol=1e-4)


def test_official_formats(tmp_path, monkeypatch):
    # the file names the README uses, holding one of the official code's checkpoints (random weights) and its YAML
    shutil.copy(FIXTURES / "v1_fc_224.yaml", tmp_path / "focal_tiny_patch4_window7_224.yaml")
    shutil.copy(FIXTURES / "v1_fc_224.pth", tmp_path / "focal-tiny-is224-ws7.pth")
    (tmp_path / "output").mkdir()
    official_training_checkpoint("v1_fc_224", tmp_path / "output")  # output/ckpt_epoch_299.pth

    namespace = run("official_formats", tmp_path, monkeypatch, path="focal-tiny-is224-ws7.pth")

    reference = load_file(FIXTURES / "v1_fc_224.io.safetensors")
    with torch.no_grad():
        logits = namespace["model"](reference["pixel_values"]).logits
    torch.testing.assert_close(logits, reference["logits"], atol=1e-4, rtol=0)  # the official outputs
    converted = FocalForImageClassification(namespace["config"]).eval()
    converted.load_state_dict(namespace["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(converted(reference["pixel_values"]).logits, logits, atol=0, rtol=0)
    assert namespace["processor"].crop_size == {"height": 224, "width": 224}
    assert namespace["trained"].config.to_dict() == namespace["model"].config.to_dict()  # (the same run's weights)
    for trained, loaded in zip(namespace["trained"].state_dict().values(), namespace["model"].state_dict().values()):
        assert torch.equal(trained, loaded)


def test_lora(tmp_path, monkeypatch, capsys):
    convert_official("focal-tiny", tmp_path / "focal-tiny")

    namespace = run("lora", tmp_path, monkeypatch)

    assert "trainable%: 1.49" in capsys.readouterr().out
    merged = namespace["merged"]
    assert type(merged) is FocalForImageClassification and merged.config.id2label == {0: "cat", 1: "dog", 2: "bird"}
    assert not any("lora" in name for name, _ in merged.named_parameters())
    saved = load_file(tmp_path / "focal-tiny-lora/adapter_model.safetensors")
    assert sum(".lora_" in name for name in saved) == 2 * 2 * sum(merged.config.depths)  # A and B of qkv and proj
    assert {name for name in saved if ".lora_" not in name} == {
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
    }


def test_bad_image_in_a_pipeline(tmp_path, monkeypatch):
    model = FocalForImageClassification(tiny_config()).eval()
    classifier = pipeline(
        "image-classification",
        model=model,
        image_processor=FocalImageProcessor(size={"shortest_edge": 64}, crop_size=64),
    )
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(copy_flower(tmp_path).read_bytes()[:2000])
    paths = [str(tmp_path / "tests/fixtures/images/flower.jpg"), str(truncated)]

    with pytest.raises(ValueError, match=r"^image 1 \(.*truncated\.jpg\): "):
        run("bad_image_in_a_pipeline", tmp_path, monkeypatch, paths=paths, classifier=classifier)

    namespace = run("bad_image_in_a_pipeline", tmp_path, monkeypatch, paths=paths[:1], classifier=classifier)
    assert len(namespace["predictions"]) == 1 and len(namespace["predictions"][0]) == 5


def test_dense_prediction(tmp_path, monkeypatch, capsys):
    focal = convert_official("focal-tiny", tmp_path / "focal-tiny")
    name = "focal.encoder.layers.2.blocks.5.attention.qkv.weight"  # a weight of the third stage
    weight = focal.get_parameter(name)

    namespace = run("dense_upernet", tmp_path, monkeypatch)
    torch.testing.assert_close(namespace["model"].backbone.get_parameter(name), weight)
    assert namespace["backbone"] is namespace["model"].backbone

    run("dense_detr_mask2former", tmp_path, monkeypatch, namespace)  # "the same way": after the UperNet block
    detr, mask2former = namespace["detr"], namespace["mask2former"]
    for backbone in detr.model.backbone.model, mask2former.model.pixel_level_module.encoder:
        torch.testing.assert_close(backbone.get_parameter(name), weight)

    # a trained folder as the segmentation example saves it (here untrained), and an image to segment
    model = namespace["model"].eval()
    model.save_pretrained(tmp_path / "upernet-focal-tiny-ade20k")
    SegformerImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(tmp_path / "upernet-focal-tiny-ade20k")
    shutil.copy(copy_flower(tmp_path), tmp_path / "street.jpg")
    size = Image.open(tmp_path / "street.jpg").size

    capsys.readouterr()
    run("dense_pipeline", tmp_path, monkeypatch)
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("LABEL_") and line.endswith(f" {size}") for line in lines)
