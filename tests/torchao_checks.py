"""Quantization with torchao through transformers' `TorchAoConfig`: int8 weights in every linear layer, inference
close to float32, and a quantized folder that saves and loads; and the README's recipe.

Run by `tests/test_quantization.py` in a pytest subprocess that imports torchao from the test cache (the test
environment does not install it; see there). Not collected by the main test run (no `test_` prefix)."""

import warnings

import pytest
import torch
from conftest import tiny_config
from test_readme import convert_official, run
from transformers import AutoModelForImageClassification, TorchAoConfig

from focal_hf import FocalForImageClassification, modeling_focal

with warnings.catch_warnings():  # torchao's CUDA kernels do not load on a CPU build of torch: it says so and goes on
    warnings.simplefilter("ignore")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8Tensor, Int8WeightOnlyConfig


@pytest.mark.parametrize("quantization", [Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig])
@pytest.mark.parametrize("attention_type", ["focal", "focal_fast"])
def test_int8_quantized_model_is_close_to_float32_and_round_trips(tmp_path, attention_type, quantization):
    config = tiny_config(attention_type=attention_type, focal_topk=12, embed_dim=64, num_heads=[2, 2, 4, 4])
    FocalForImageClassification(config).save_pretrained(tmp_path / "float32")
    model = FocalForImageClassification.from_pretrained(tmp_path / "float32").eval()
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = model(pixel_values).logits

    quantized = AutoModelForImageClassification.from_pretrained(
        tmp_path / "float32", quantization_config=TorchAoConfig(quantization())
    ).eval()
    # every linear layer: qkv, proj, fc1, fc2 of every block, Focal-fast's position-bias MLPs, the classifier
    linear_layers = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linear_layers) == (4 + 4 * (attention_type == "focal_fast")) * sum(config.depths) + 1
    quantized_layers = {
        name for name, m in quantized.named_modules() if isinstance(getattr(m, "weight", None), Int8Tensor)
    }
    assert quantized_layers == linear_layers
    pooling = [m for m in quantized.modules() if isinstance(m, modeling_focal.FocalPoolingWeights)]
    assert pooling and all(type(m.weight) is torch.nn.Parameter for m in pooling)  # not linear layers: left alone
    with torch.no_grad():
        logits = quantized(pixel_values).logits
        # again: (Focal-fast's quantized position-bias MLPs are not cached by the inference bias cache)
        torch.testing.assert_close(quantized(pixel_values).logits, logits, rtol=0, atol=0)
    error = (logits - expected).abs().max()
    assert 0 < error < 0.02 * expected.abs().max(), error  # quantized, and close

    quantized.save_pretrained(tmp_path / "int8")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "int8").eval()
    assert isinstance(reloaded.focal.encoder.layers[0].blocks[0].attention.qkv.weight, Int8Tensor)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, logits, rtol=0, atol=0)


def test_readme_quantization_block(tmp_path, monkeypatch):
    model = convert_official("focal-tiny", tmp_path / "focal-tiny")

    run("quantization", tmp_path, monkeypatch)

    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "focal-tiny-int8").eval()
    assert isinstance(reloaded.focal.encoder.layers[0].blocks[0].attention.qkv.weight, Int8Tensor)
    folders = (tmp_path / "focal-tiny", tmp_path / "focal-tiny-int8")
    sizes = [(folder / "model.safetensors").stat().st_size for folder in folders]
    assert 0.25 < sizes[1] / sizes[0] < 0.35  # 34 MB instead of 110 MB
    pixel_values = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected, logits = model(pixel_values).logits, reloaded(pixel_values).logits
    assert 0 < (logits - expected).abs().max() < 0.02 * expected.abs().max()
