"""Parameter-efficient fine-tuning with PEFT: LoRA adapters on the attention's projections (and on every linear
layer) train, save, load and merge as on transformers' own models."""

import pytest
import torch
from conftest import tiny_config
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from focal_hf import FocalForImageClassification, modeling_focal

ATTENTIONS = ["focal", "focal_fast"]


def adapted_modules(model) -> dict[str, type]:
    """The names of the modules LoRA adapts -> the class of the layer each adapter wraps."""
    return {name: type(module.base_layer) for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def perturb_adapters(model) -> None:
    """LoRA's `B` matrices (zero, as LoRA starts) made random, so that every adapter has a gradient."""
    for name, parameter in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(parameter, std=0.1)


def train(model, pixel_values, labels, steps=3) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("attention_type", ATTENTIONS)
def test_lora_on_the_attention_projections_trains_saves_loads_and_merges(tmp_path, attention_type):
    config = tiny_config(attention_type=attention_type, focal_topk=12, use_shift=True, depths=[2, 1, 2, 1])
    FocalForImageClassification(config).save_pretrained(tmp_path / "base")
    model = FocalForImageClassification.from_pretrained(tmp_path / "base")
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    pixel_values, labels = torch.randn(4, 3, 64, 96), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        base_logits = model.eval()(pixel_values).logits

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "proj"], modules_to_save=["classifier"])
    peft_model = get_peft_model(model, lora)
    blocks = sum(config.depths)
    adapted = adapted_modules(peft_model)
    assert set(adapted.values()) == {torch.nn.Linear}  # plain linear layers, called as such
    assert sorted(name.rsplit(".", 1)[-1] for name in adapted) == ["proj"] * blocks + ["qkv"] * blocks
    with torch.no_grad():  # LoRA starts as the identity
        torch.testing.assert_close(peft_model(pixel_values=pixel_values).logits, base_logits, rtol=0, atol=0)

    losses = train(peft_model.train(), pixel_values, labels)
    assert losses[-1] < losses[0]
    peft_model.eval()
    with torch.no_grad():
        adapted_logits = peft_model(pixel_values=pixel_values).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-2
    # only the adapters and the classifier's trainable copy trained; the model's own weights are untouched
    trained = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in name or ".modules_to_save." in name for name in trained)
    for name, parameter in peft_model.base_model.model.named_parameters():
        if name in base:
            assert torch.equal(parameter, base[name]), name

    peft_model.save_pretrained(tmp_path / "adapter")  # the adapters and the classifier only
    assert (tmp_path / "adapter/adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter/model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(
        FocalForImageClassification.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    )
    merged = peft_model.merge_and_unload()
    assert type(merged) is FocalForImageClassification and not adapted_modules(merged)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(pixel_values=pixel_values).logits, adapted_logits, rtol=0, atol=0)
        torch.testing.assert_close(merged(pixel_values).logits, adapted_logits, rtol=1e-5, atol=1e-5)


def test_lora_on_all_linear_layers_leaves_the_pooling_weights_alone():
    model = FocalForImageClassification(tiny_config(focal_pool="fc"))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    # every linear layer (PEFT's "all-linear" keeps the classifier of a model without output embeddings) and not the
    # `fc` pooling's weighted sums of a sub-window's tokens, which are not linear layers over the channels
    adapted = adapted_modules(peft_model)
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {"qkv", "proj", "fc1", "fc2", "classifier"}
    assert len(adapted) == 4 * sum(model.config.depths) + 1
    assert any(isinstance(m, modeling_focal.FocalPoolingWeights) for m in peft_model.modules())
    perturb_adapters(peft_model)
    peft_model(pixel_values=torch.randn(2, 3, 50, 77), labels=torch.tensor([1, 4])).loss.backward()
    lora_parameters = {name: p for name, p in peft_model.named_parameters() if ".lora_" in name}
    assert len(lora_parameters) == 2 * len(adapted)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters.values())


def lora_model(config, setup: str, checkpointing: bool):
    """A model with LoRA adapters on qkv and proj (random, so every adapter has a gradient; the model's own weights
    frozen), with checkpointing turned on before or after the adapters, as `setup` says."""
    torch.manual_seed(0)
    model = FocalForImageClassification(config)
    lora = LoraConfig(r=4, target_modules=["qkv", "proj"])
    if checkpointing and setup == "checkpointing_first":
        # reentrant checkpointing differentiates a block only if its input needs a gradient: get_peft_model sees
        # checkpointing on and calls `enable_input_require_grads` (it failed on our patch embeddings' tuple)
        model.activation_checkpointing_enable({"use_reentrant": True})
    peft_model = get_peft_model(model, lora)
    if checkpointing and setup == "get_peft_model_first":
        peft_model.base_model.model.activation_checkpointing_enable()
    perturb_adapters(peft_model)
    return peft_model


@pytest.mark.parametrize("attention_type", ATTENTIONS)
@pytest.mark.parametrize("setup", ["get_peft_model_first", "checkpointing_first"])
def test_lora_with_gradient_checkpointing_gives_the_same_gradients(attention_type, setup):
    config = tiny_config(attention_type=attention_type, focal_topk=12)
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    gradients, calls = [], []
    for checkpointing in (False, True):
        model = lora_model(config, setup, checkpointing)
        if checkpointing:
            block = model.base_model.model.focal.encoder.layers[2].blocks[1]
            block.attention.register_forward_hook(lambda *args: calls.append(1))
        model.train()(pixel_values=pixel_values, labels=labels).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    assert len(calls) == 2  # the block ran again in the backward pass
    reference, checkpointed = gradients
    assert reference.keys() == checkpointed.keys() and all(".lora_" in name for name in reference)
    for name in reference:
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], reference[name], rtol=1e-5, atol=1e-6)
