"""Behaviour of the model classes: configuration checks, any input size, bad input, save/load, Auto classes,
batching, gradient checkpointing, SDPA vs eager, bfloat16, losses and the backbone."""

import contextlib
import logging

import pytest
import torch
from conftest import import_script, tiny_config
from transformers import (
    AttentionInterface,
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from focal_hf import (
    FocalBackbone,
    FocalConfig,
    FocalForImageClassification,
    FocalModel,
    modeling_focal,
    official_config,
)
from focal_hf.modeling_focal import (
    cached_key_layout,
    fine_keys,
    focal_key_layout,
    folded_sdpa_attention,
    gather_keys,
    neighbor_slots,
)

ATTENTIONS = ["focal", "focal_fast"]
# non-square, not multiples of 32 or of the window, down to the 32 px minimum
ODD_SIZES = [(64, 64), (96, 72), (50, 77), (32, 32), (33, 130)]


def make(model_class, attention_type="focal", **overrides):
    config = tiny_config(attention_type=attention_type, focal_topk=12, **overrides)
    return model_class(config).eval()


# ------------------------------------------------------------------------------------------- configuration
def test_defaults_are_focal_tiny():
    config = FocalConfig()
    assert (config.embed_dim, config.depths, config.num_heads) == (96, [2, 2, 6, 2], [3, 6, 12, 24])
    assert (config.focal_pool, config.focal_levels, config.window_size) == ("fc", [2, 2, 2, 2], 7)
    assert config.hidden_size == 768 and config.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_heads": [1, 2, 4]}, "num_heads"),
        ({"focal_levels": [2, 2]}, "focal_levels"),
        ({"expand_sizes": [3, 3, 3]}, "expand_sizes"),
        ({"focal_pool": "avg"}, "focal_pool"),
        ({"num_heads": [3, 2, 2, 4]}, "does not divide"),
        ({"expand_layer": "first"}, "expand_layer"),
        ({"focal_stages": [0, 4]}, "focal_stages"),
        ({"attention_type": "global"}, "attention_type"),
        ({"focal_windows": [2, 3, 3, 1]}, "must be odd"),
        ({"expand_sizes": [5, 2, 2, 2]}, "at most the window size"),
        ({"image_size": 16}, "total stride"),
        ({"focal_levels": [5, 2, 2, 2]}, "too many"),
        ({"attention_type": "focal_fast", "focal_levels": [0, 1, 1, 1]}, "focal_levels"),
        ({"attention_type": "focal_fast", "focal_pool": "none"}, "pooled windows"),
    ],
)
def test_invalid_configs_raise_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_block_geometry_follows_the_official_rules():
    config = tiny_config(use_shift=True, expand_layer="even")
    # stage 0: 16x16 grid, window 4: block 0 (even) has no expansion, block 1 would shift
    assert config.block_geometry(0, 0).expand_size == 0 and config.block_geometry(0, 0).shift_size == 0
    assert config.block_geometry(0, 1).expand_size == 2 and config.block_geometry(0, 1).shift_size == 2
    # stage 2: 4x4 grid = window: no shift, no expansion, window unchanged; stage 3: 2x2 grid -> window shrinks to 2
    assert config.block_geometry(2, 1) == config.block_geometry(2, 1).__class__(4, 0, 0, "fc", 2, 3)
    assert config.block_geometry(3, 1).window_size == 2 and config.block_geometry(3, 1).expand_size == 0
    assert tiny_config(focal_stages=[0]).block_geometry(1, 0).pool_method == "none"


# ------------------------------------------------------------------------------------------ shapes / sizes
@pytest.mark.parametrize("attention_type", ATTENTIONS)
def test_outputs_and_shapes(attention_type):
    model = make(FocalModel, attention_type)
    model.config._attn_implementation = "eager"
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True, output_attentions=True)
    assert outputs.last_hidden_state.shape == (2, 4, 128)
    assert outputs.pooler_output.shape == (2, 128)
    torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state.mean(1))
    assert [tuple(h.shape) for h in outputs.hidden_states] == [
        (2, 256, 16),
        (2, 64, 32),
        (2, 16, 64),
        (2, 4, 128),
        (2, 4, 128),
    ]
    assert [tuple(h.shape) for h in outputs.reshaped_hidden_states] == [
        (2, 16, 16, 16),
        (2, 32, 8, 8),
        (2, 64, 4, 4),
        (2, 128, 2, 2),
        (2, 128, 2, 2),
    ]
    for hidden, reshaped in zip(outputs.hidden_states, outputs.reshaped_hidden_states):
        torch.testing.assert_close(hidden, reshaped.flatten(2).transpose(1, 2))
    assert len(outputs.attentions) == 4
    # stage 0: 16 windows of 4x4 per image, 1 head; probabilities sum to one over the keys
    attentions = outputs.attentions[0]
    assert attentions.shape[:3] == (2 * 16, 1, 16)
    torch.testing.assert_close(attentions.sum(-1), torch.ones(attentions.shape[:-1]))


def test_attention_weights_need_eager_attention_and_the_default_says_so(caplog, logged_warnings):
    # as transformers' own "sdpa": the default attention computes no weights, warns once and leaves them empty
    model = make(FocalModel)
    assert model.config._attn_implementation == "focal_sdpa"
    pixel_values = torch.randn(1, 3, 64, 64)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        plain = model(pixel_values)
        assert logged_warnings() == []
        outputs = model(pixel_values, output_attentions=True)
    assert outputs.attentions == ()
    torch.testing.assert_close(outputs.last_hidden_state, plain.last_hidden_state, atol=0, rtol=0)
    [warning] = logged_warnings()  # once, for all its blocks
    assert "`focal_sdpa` attention does not support `output_attentions=True`" in warning
    assert 'attn_implementation="eager"' in warning
    # compiled whole, the warning is not traced (it would break the graph)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert compiled(pixel_values, output_attentions=True).attentions == ()


@pytest.mark.parametrize("attention_type", ATTENTIONS)
@pytest.mark.parametrize("size", ODD_SIZES)
def test_any_input_size_runs_every_head(attention_type, size):
    pixel_values = torch.randn(1, 3, *size)
    strides = [4, 8, 16, 32]
    with torch.no_grad():
        logits = make(FocalForImageClassification, attention_type)(pixel_values).logits
        maps = make(FocalBackbone, attention_type, out_features=["stage1", "stage4"])(pixel_values).feature_maps
    assert logits.shape == (1, 5) and torch.isfinite(logits).all()
    for feature_map, stride, channels in zip(maps, [strides[0], strides[3]], [16, 128]):
        assert feature_map.shape == (1, channels, size[0] // stride, size[1] // stride)


@pytest.mark.parametrize(
    "overrides", [{"use_conv_embed": True}, {"use_absolute_embeddings": True}, {"use_shift": True}]
)
def test_any_input_size_with_options(overrides):
    model = make(FocalForImageClassification, **overrides)
    with torch.no_grad():
        at_config_size = model(torch.randn(1, 3, 64, 64)).logits
        other = model(torch.randn(1, 3, 90, 45)).logits
    assert torch.isfinite(at_config_size).all() and torch.isfinite(other).all()


@pytest.mark.parametrize("attention_type", ATTENTIONS)
def test_key_layouts_are_built_once_per_size(attention_type):
    model = make(FocalModel, attention_type)
    with torch.no_grad():
        model(torch.randn(1, 3, 80, 48))
        misses = cached_key_layout.cache_info().misses
        model(torch.randn(1, 3, 80, 48))
        model(torch.randn(2, 3, 80, 48))
        assert cached_key_layout.cache_info().misses == misses
        model(torch.randn(1, 3, 96, 48))  # another size: its own layouts
    assert cached_key_layout.cache_info().misses > misses


@pytest.mark.parametrize("attention_type, layouts_per_stage", [("focal", [2, 2, 1, 1]), ("focal_fast", [1, 1, 1, 1])])
def test_blocks_of_a_stage_share_their_key_layout_where_alike(attention_type, layouts_per_stage, monkeypatch):
    # stages 1 and 2 alternate unshifted and shifted blocks, stage 3 (one window wide at 64 px) shifts none: Focal's
    # shifted blocks have a layout of their own (the shifted-window mask), Focal-fast's layout does not depend on it
    model = make(FocalModel, attention_type, depths=[3, 2, 2, 1], use_shift=True)
    assert [model.config.block_geometry(stage, 1).shift_size > 0 for stage in range(3)] == [True, True, False]
    built, received = [], {}
    build = modeling_focal.key_layout
    monkeypatch.setattr(modeling_focal, "key_layout", lambda *args: built.append(args[1][:2]) or build(*args))

    def record(attention, args):  # (the layout an attention module is called with)
        received[attention] = args[2]

    for module in model.modules():
        if isinstance(module, modeling_focal.FocalAttentionBase):
            module.register_forward_pre_hook(record)
    with torch.no_grad():
        model(torch.randn(1, 3, 80, 48))

    sizes = [(20, 12), (10, 6), (5, 3), (2, 1)]  # the stages' maps (the downsampling floors odd sides)
    assert built == [size for size, count in zip(sizes, layouts_per_stage) for _ in range(count)]
    assert len(received) == sum(model.config.depths)
    for stage, size in zip(model.encoder.layers, sizes):
        for block in stage.blocks:  # each block's own layout (one object per size and spec: `cached_key_layout`)
            assert received[block.attention] is block.attention.key_layout(*size, torch.device("cpu"))


@pytest.mark.parametrize(
    "pixel_values, message",
    [
        (torch.randn(1, 1, 64, 64), r"\(batch_size, 3, height, width\).*got shape \(1, 1, 64, 64\)"),
        (torch.randn(3, 64, 64), r"got shape \(3, 64, 64\)"),
        (torch.randn(1, 3, 31, 64), r">= 32 .*got \(31, 64\)"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.long), "floating-point"),
        (None, "got NoneType"),
    ],
)
def test_bad_input_raises_value_error(pixel_values, message):
    for model_class in (FocalModel, FocalForImageClassification, FocalBackbone):
        with pytest.raises(ValueError, match=message):
            make(model_class)(pixel_values)


# ----------------------------------------------------------------------------------- save / load / Auto
@pytest.mark.parametrize("attention_type", ATTENTIONS)
def test_save_and_load_round_trip(tmp_path, attention_type):
    model = make(FocalForImageClassification, attention_type, use_shift=True, use_layerscale=True)
    pixel_values = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        expected = model(pixel_values).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    for loader in (FocalForImageClassification, AutoModelForImageClassification):
        reloaded = loader.from_pretrained(tmp_path).eval()
        assert type(reloaded) is FocalForImageClassification
        with torch.no_grad():
            torch.testing.assert_close(reloaded(pixel_values).logits, expected, rtol=0, atol=0)
    # the base model and the backbone load the classification weights
    base = AutoModel.from_pretrained(tmp_path)
    backbone, loading_info = FocalBackbone.from_pretrained(
        tmp_path, out_features=["stage2", "stage4"], output_loading_info=True
    )
    # as for Swin's backbone: the per-stage norms are reported as missing (newly initialised), the classifier and the
    # final norm are not used
    norms = {f"hidden_states_norms.{stage}.{name}" for stage in ("stage2", "stage4") for name in ("weight", "bias")}
    assert set(loading_info["missing_keys"]) == norms
    assert not loading_info["unexpected_keys"] and not loading_info["mismatched_keys"]
    for name, tensor in base.state_dict().items():
        torch.testing.assert_close(tensor, model.focal.state_dict()[name], rtol=0, atol=0)
    for name, tensor in backbone.focal.state_dict().items():
        torch.testing.assert_close(tensor, model.focal.state_dict()[name], rtol=0, atol=0)


def test_auto_classes_are_registered():
    config = AutoConfig.for_model("focal", embed_dim=16, num_heads=[1, 2, 4, 8], image_size=64)
    assert isinstance(config, FocalConfig)
    assert type(AutoModel.from_config(config)) is FocalModel
    assert type(AutoModelForImageClassification.from_config(config)) is FocalForImageClassification
    assert type(AutoBackbone.from_config(config)) is FocalBackbone


# --------------------------------------------------------------------------- batching, training, precision
@pytest.mark.parametrize("attention_type", ATTENTIONS)
def test_batch_equals_single_images(attention_type):
    model = make(FocalForImageClassification, attention_type)
    pixel_values = torch.randn(3, 3, 64, 80)
    with torch.no_grad():
        batched = model(pixel_values).logits
        single = torch.cat([model(image[None]).logits for image in pixel_values])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def _gradients(model, pixel_values, labels):
    model.zero_grad()
    model(pixel_values, labels=labels).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("every_n_layers", [1, 2])
@pytest.mark.parametrize("attention_type", ATTENTIONS)
def test_gradient_checkpointing_gives_the_same_gradients(attention_type, every_n_layers):
    model = make(FocalForImageClassification, attention_type).train()
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    reference = _gradients(model, pixel_values, labels)
    model.activation_checkpointing_enable(every_n_layers=every_n_layers)
    assert model.is_activation_checkpointing
    blocks = [block for stage in model.focal.encoder.layers for block in stage.blocks]
    calls = [0] * len(blocks)
    for index, block in enumerate(blocks):
        block.attention.register_forward_hook(lambda *args, index=index: calls.__setitem__(index, calls[index] + 1))
    checkpointed = _gradients(model, pixel_values, labels)
    # each checkpointed block (every n-th, counting blocks across stages) runs once more in backward, only once more
    assert calls == [2 if index % every_n_layers == 0 else 1 for index in range(len(blocks))]
    assert reference.keys() == checkpointed.keys() and len(reference) == len(list(model.parameters()))
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["focal_sdpa", "sdpa"])
@pytest.mark.parametrize(
    "attention_type, overrides",
    [("focal", {}), ("focal_fast", {}), ("focal", {"use_shift": True, "depths": [2, 1, 2, 1], "focal_pool": "none"})],
)
def test_sdpa_equals_eager(attention_type, overrides, attn_implementation):
    # on CPU, focal_sdpa runs `cpu_gathered_attention` (fused kernel forward, own backward), sdpa torch's SDPA with
    # the windows folded into the heads: both give the eager values and gradients
    eager = make(FocalForImageClassification, attention_type, attn_implementation="eager", **overrides).train()
    sdpa = make(FocalForImageClassification, attention_type, attn_implementation=attn_implementation, **overrides)
    sdpa.load_state_dict(eager.state_dict())
    assert sdpa.config._attn_implementation == attn_implementation and eager.config._attn_implementation == "eager"
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 4])
    with torch.no_grad():
        torch.testing.assert_close(
            sdpa.eval()(pixel_values).logits, eager.eval()(pixel_values).logits, atol=1e-5, rtol=0
        )
    eager_grads, sdpa_grads = (
        _gradients(eager.train(), pixel_values, labels),
        _gradients(sdpa.train(), pixel_values, labels),
    )
    assert sdpa_grads.keys() == eager_grads.keys() and len(eager_grads) == len(list(eager.parameters()))
    for name in eager_grads:
        torch.testing.assert_close(sdpa_grads[name], eager_grads[name], atol=1e-5, rtol=1e-4)


def focal_sdpa_off_the_cpu(module, query, key, value, key_index, attention_mask, scaling, dropout=0.0, **kwargs):
    """`focal_sdpa` as it runs on a GPU (`folded_sdpa_attention`), here on the CPU."""
    return folded_sdpa_attention(query, key, value, key_index, attention_mask, scaling, dropout), None


focal_sdpa_off_the_cpu.gathers_keys = True
AttentionInterface.register("focal_sdpa_off_the_cpu", focal_sdpa_off_the_cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "size, checkpointing, offload",
    [((64, 64), False, False), ((80, 48), False, False), ((80, 48), True, False), ((80, 48), False, True)],
)
@pytest.mark.parametrize("attention_type", ATTENTIONS)
def test_folded_attention_equals_eager_with_shift(attention_type, size, checkpointing, offload, dtype):
    # the path of every non-CPU device: one attention call with the windows folded into the heads and one bias
    # broadcast over the batch, the folding recomputed in the backward pass (also inside gradient checkpointing, and
    # where saved tensors are offloaded to the CPU)
    assert_equals_eager_with_shift(attention_type, "focal_sdpa_off_the_cpu", size, dtype, checkpointing, offload)


def assert_equals_eager_with_shift(
    attention_type, attn_implementation, size, dtype, checkpointing=False, offload=False
):
    """A tiny model with shifted windows run with `attn_implementation` (gradient checkpointing on if asked; its saved
    tensors offloaded by `torch.autograd.graph.save_on_cpu` if asked) gives the logits and the gradients of the input
    and of every parameter that the same model gives with eager attention: in float32 within 1e-5, in bfloat16 within
    the usual tolerance."""
    overrides = dict(use_shift=True, depths=[2, 2, 2, 1])
    eager = make(FocalForImageClassification, attention_type, attn_implementation="eager", **overrides).train()
    other = make(FocalForImageClassification, attention_type, attn_implementation=attn_implementation, **overrides)
    other.train().load_state_dict(eager.state_dict())
    if checkpointing:
        other.activation_checkpointing_enable()
    eager, other = eager.to(dtype), other.to(dtype)
    pixel_values, labels = torch.randn(2, 3, *size, dtype=dtype), torch.tensor([0, 4])
    results = []
    for model in (eager, other):
        model.zero_grad()
        inputs = pixel_values.clone().requires_grad_()
        with torch.autograd.graph.save_on_cpu() if offload and model is other else contextlib.nullcontext():
            output = model(inputs, labels=labels)
        output.loss.backward()
        gradients = {name: p.grad.float() for name, p in model.named_parameters()}
        results.append((output.logits.float(), inputs.grad.float(), gradients))
    (logits, input_grad, grads), (other_logits, other_input_grad, other_grads) = results
    assert len(grads) == len(list(eager.parameters()))  # every parameter, the bias tables and MLPs included
    tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=5e-2)
    largest = max(float(gradient.abs().max()) for gradient in grads.values())
    torch.testing.assert_close(other_logits, logits, **tolerance)
    torch.testing.assert_close(other_input_grad, input_grad, **tolerance)
    for name in grads:
        if dtype == torch.float32:
            torch.testing.assert_close(other_grads[name], grads[name], **tolerance, msg=name)
        else:  # bfloat16: rounding differs between the paths; the gradients point the same way, but for those
            # that are rounding noise (under 1/10,000 of the largest: sums that nearly cancel, such as the gradient of
            # a bias added to every logit of a focal level)
            cosine = torch.nn.functional.cosine_similarity(other_grads[name].flatten(), grads[name].flatten(), dim=0)
            assert cosine > 0.99 or grads[name].abs().max() < 1e-4 * largest, name


@pytest.mark.skipif(
    not hasattr(torch._C._autograd, "_top_saved_tensors_default_hooks"),
    reason="torch < 2.8 does not let the model see the checkpoint's saved-tensor hooks",
)
@pytest.mark.parametrize("attention_type", ATTENTIONS)
def test_checkpointed_folded_attention_keeps_only_what_checkpointed_eager_attention_keeps(attention_type):
    """Under activation checkpointing a block keeps nothing of its attention for the backward pass on the path of
    non-CPU devices either: after the forward pass exactly as many bytes of activations are alive as with eager
    attention (the blocks' inputs). `RegatheredKeys`' saved-tensor hooks, entered inside the checkpoint's, would
    replace them and keep the attention's saved tensors and the keys' sources (here 1.4 MB, Focal-fast 0.8 MB,
    instead of 0.2 MB; 2.3 and 2.0 MB without checkpointing)."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    def activations_kept(attn_implementation, checkpointing):
        torch.manual_seed(0)
        overrides = dict(attn_implementation=attn_implementation, use_shift=True)
        model = make(FocalForImageClassification, attention_type, **overrides).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        pixel_values, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 4])
        model(pixel_values, labels=labels).loss.backward()  # (the key layouts, cached, are built here: not counted)
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            loss = model(pixel_values, labels=labels).loss
            kept = tracker.get_tracker_snapshot("current")[torch.device("cpu")]
        loss.backward()
        return kept[_MemRefType.ACT]

    eager = activations_kept("eager", checkpointing=True)
    assert activations_kept("focal_sdpa_off_the_cpu", checkpointing=True) == eager
    assert activations_kept("focal_sdpa_off_the_cpu", checkpointing=False) > 4 * eager


def random_inputs(dtype, batch_size=3, num_windows=4, num_heads=2, head_dim=24, num_tokens=70, num_keys=40, area=49):
    """query, key, value and bias (all requiring gradients) and a key index stored key by key, as layouts store it;
    the bias has masked (-inf) keys, and the index repeats tokens within and across windows."""
    torch.manual_seed(0)
    query = torch.randn(batch_size, num_windows * area, num_heads * head_dim)
    key, value = (torch.randn(batch_size, num_tokens, num_heads * head_dim) for _ in range(2))
    bias = torch.randn(num_windows, num_heads, area, num_keys)
    bias[..., -5:] = float("-inf")
    key_index = torch.randint(0, num_tokens, (num_keys, num_windows)).t()
    tensors = [tensor.to(dtype).requires_grad_() for tensor in (query, key, value, bias)]
    return *tensors, key_index


def folded_attention_inputs(batch_size, num_windows, num_keys, num_tokens, num_heads, head_dim):
    """Random inputs of `folded_sdpa_attention`: key_index, query, key and value (all three requiring gradients) and
    a bias without gradient (so that PyTorch's fused CPU kernel runs)."""
    torch.manual_seed(0)
    key_index = torch.randint(0, num_tokens, (num_keys, num_windows)).t()  # stored key by key, as layouts store it
    query = torch.randn(batch_size, num_windows * 49, num_heads * head_dim, requires_grad=True)
    key, value = (torch.randn(batch_size, num_tokens, num_heads * head_dim, requires_grad=True) for _ in range(2))
    bias = torch.randn(num_windows, num_heads, 49, num_keys)
    return key_index, query, key, value, bias


def test_folded_attention_keeps_no_gathered_keys_for_the_backward_pass():
    # what a training step holds between its forward and backward passes: the gathered keys and values are not
    # kept (their sources, the projection's keys and values, are), yet the gradients are the same. (A bias without
    # gradient, so that PyTorch's fused CPU kernel runs, which keeps its inputs as they are, like the GPU kernels; the
    # bias gradient on a GPU is in benchmarks/test_gpu.py, the memory of a GPU training step in
    # benchmarks/gpu_memory.py.)
    from torch.distributed._tools.mem_tracker import MemTracker

    from focal_hf.modeling_focal import fold_windows, unfold_windows

    batch_size, num_windows, num_keys, num_tokens, num_heads, head_dim = 4, 16, 64, 900, 2, 16
    key_index, query, key, value, bias = folded_attention_inputs(
        batch_size, num_windows, num_keys, num_tokens, num_heads, head_dim
    )

    def kept_keys(query, key, value, key_index, bias, scaling):
        folded = fold_windows(query, key, value, key_index, bias)
        output = torch.nn.functional.scaled_dot_product_attention(*folded[:3], attn_mask=folded[3], scale=scaling)
        return unfold_windows(output.transpose(1, 2), num_heads)

    held, gradients = [], []
    for attention in (kept_keys, folded_sdpa_attention):
        tracker = MemTracker()
        with tracker:
            output = attention(query, key, value, key_index, bias, 0.25)
            held.append(tracker.get_tracker_snapshot("current")[torch.device("cpu")]["Total"])
        gradients.append(torch.autograd.grad(output, (query, key, value), torch.ones_like(output)))
    for regathered, kept in zip(gradients[1], gradients[0], strict=True):
        torch.testing.assert_close(regathered, kept, atol=1e-5, rtol=1e-5)
    gathered = 2 * batch_size * num_heads * num_windows * num_keys * head_dim * 4  # keys and values, float32
    assert held[0] - held[1] == gathered, (held, gathered)
    # a source changed in place after the forward pass is refused, as autograd refuses its own saved tensors
    for changed in ("key", "value"):
        sources = {"key": key * 1, "value": value * 1}
        output = folded_sdpa_attention(query, sources["key"], sources["value"], key_index, bias, 0.25)
        with torch.no_grad():
            sources[changed].add_(1)
        with pytest.raises(RuntimeError, match="modified in place after the forward pass"):
            output.sum().backward()


def test_gathered_keys_take_the_layout_of_the_kernels_gradients(monkeypatch):
    # the fused attention kernels of a GPU (memory-efficient, flash) hand back the gradients of keys and values as
    # (batch, keys, heads, head_dim) in memory; the gathered keys are laid out so, which lets those gradients reach the
    # gather's backward pass (index_add_ of whole rows) without a copy: on the meta device, whose implementation of
    # the memory-efficient kernel returns the CUDA kernel's layouts, a training pass of the folded attention copies
    # nothing in its backward pass but the query's gradient (back into window order)
    from torch.utils._python_dispatch import TorchDispatchMode

    batch_size, num_windows, num_keys, num_tokens, num_heads, head_dim = 2, 16, 64, 900, 2, 16
    key_index, *differentiated, bias = (
        tensor.detach().to("meta")
        for tensor in folded_attention_inputs(batch_size, num_windows, num_keys, num_tokens, num_heads, head_dim)
    )
    query, key, value = (tensor.requires_grad_() for tensor in differentiated)

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default):
                self.sizes.append(args[0].numel())
            return func(*args, **(kwargs or {}))

    # SDPA as a CUDA GPU runs it with a float bias, as benchmarks/gpu_memory.py estimates with it
    memory_efficient = import_script("gpu_memory").memory_efficient_sdpa
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", memory_efficient)
    output = folded_sdpa_attention(query, key, value, key_index, bias, 0.25)
    with Copies() as copies:
        torch.autograd.grad(output.sum(), (query, key, value))
    assert copies.sizes == [query.numel()], copies.sizes
    folded_key = gather_keys(key, key_index, num_heads)
    kernel_layout = torch.empty_permuted(folded_key.shape, (0, 2, 1, 3), device="meta")
    assert folded_key.stride() == kernel_layout.stride()


def test_compiled_folded_attention_keeps_no_gathered_keys_for_the_backward_pass():
    # under torch.compile the same by selective activation checkpointing: the tensors the compiled forward pass
    # hands to the backward pass are the inputs and the kernel's outputs, not the gathered keys and values
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    batch_size, num_windows, num_keys, num_tokens, num_heads, head_dim = 2, 4, 32, 300, 2, 8
    key_index, query, key, value, bias = folded_attention_inputs(
        batch_size, num_windows, num_keys, num_tokens, num_heads, head_dim
    )
    handed_over = []

    def forward_compiler(graph_module, example_inputs):
        outputs = next(node for node in graph_module.graph.nodes if node.op == "output").args[0]
        handed_over.extend(tuple(node.meta["val"].shape) for node in outputs[1:])
        return make_boxed_func(graph_module)

    torch._dynamo.reset()
    backend = aot_autograd(
        fw_compiler=forward_compiler, bw_compiler=lambda graph_module, example_inputs: make_boxed_func(graph_module)
    )
    compiled = torch.compile(folded_sdpa_attention, backend=backend, fullgraph=True)
    output = compiled(query, key, value, key_index, bias, 0.25)
    gradients = torch.autograd.grad(output.sum(), (query, key, value))
    expected = torch.autograd.grad(
        folded_sdpa_attention(query, key, value, key_index, bias, 0.25).sum(), (query, key, value)
    )
    for ours, reference in zip(gradients, expected, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert tuple(query.shape) in handed_over and tuple(key.shape) in handed_over, handed_over
    assert (batch_size, num_windows * num_heads, num_keys, head_dim) not in handed_over, handed_over


def test_cpu_op_is_registered_beside_the_older_signature():
    # older remote code registers `focal_transformer::cpu_gathered_attention` taking keys and values together; a
    # process that imports it and this code (the Hub and the package) runs both: this op has a name of its own
    if not hasattr(torch.ops.focal_transformer, "cpu_gathered_attention"):

        @torch.library.custom_op("focal_transformer::cpu_gathered_attention", mutates_args=())
        def older(
            query: torch.Tensor,
            key_value: torch.Tensor,
            bias: torch.Tensor,
            key_index: torch.Tensor,
            num_heads: int,
            scaling: float,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return query.clone(), query.new_zeros(0)

    op = modeling_focal.register_gathered_attention(
        modeling_focal.CPU_ATTENTION_OP,
        modeling_focal._cpu_gathered_attention,
        modeling_focal._cpu_gathered_attention_backward,
    )
    assert op is torch.ops.focal_transformer.cpu_gathered_attention_2
    assert "Tensor key, Tensor value" in str(op.default._schema)
    model = make(FocalForImageClassification, "focal").train()
    model(torch.randn(2, 3, 64, 64), labels=torch.tensor([0, 1])).loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_op_passes_torchs_custom_op_checks(dtype):
    # torch.library.opcheck of the op and of its backward op (a node of its own under torch.compile): the schema
    # (nothing mutated or aliased that it does not declare), the autograd registration, the fake (meta)
    # implementation against the real one, and AOT dispatch with dynamic shapes; the inputs have masked (-inf) keys
    # and an index that repeats tokens within and across windows
    query, key, value, bias, key_index = random_inputs(dtype, batch_size=2, num_windows=3, head_dim=8, num_keys=20)
    arguments = (query, key, value, bias, key_index, 2, 0.3)
    results = torch.library.opcheck(modeling_focal.cpu_gathered_attention, arguments)
    assert set(results.values()) == {"SUCCESS"} and len(results) == 4, results
    with torch.no_grad():
        output, logsumexp = modeling_focal.cpu_gathered_attention(*arguments)
    tensors = [tensor.detach() for tensor in (torch.randn_like(output), query, key, value, bias)]
    arguments = (*tensors, key_index, output, logsumexp, 2, 0.3)
    backward_op = getattr(torch.ops.focal_transformer, f"{modeling_focal.CPU_ATTENTION_OP}_backward")
    results = torch.library.opcheck(backward_op, arguments)
    assert set(results.values()) == {"SUCCESS"} and len(results) == 4, results


def test_cpu_op_gradients_equal_finite_differences():
    # the op's own backward pass against numerical derivatives in float64, for the queries, keys, values and bias
    *inputs, key_index = random_inputs(
        torch.float64, batch_size=2, num_windows=2, head_dim=3, num_tokens=9, num_keys=8, area=4
    )

    def attention(query, key, value, bias):
        return modeling_focal.cpu_gathered_attention(query, key, value, bias, key_index, 2, 0.3)[0]

    assert torch.autograd.gradcheck(attention, inputs)


def test_attention_weights_of_a_registered_function_are_unfolded():
    # a function registered with AttentionInterface that returns its weights in the folded layout it was called
    # with, (batch, windows * heads, queries, keys): the model hands them out as the eager ones,
    # (batch * windows, heads, queries, keys)
    def folded_weights_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        weights = torch.softmax(query @ key.transpose(-1, -2) * scaling + attention_mask, dim=-1)
        return (weights @ value).transpose(1, 2).contiguous(), weights

    AttentionInterface.register("folded_weights_attention", folded_weights_attention)
    eager = make(FocalModel, attn_implementation="eager", use_shift=True)
    registered = make(FocalModel, attn_implementation="folded_weights_attention", use_shift=True)
    registered.load_state_dict(eager.state_dict())
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected, ours = (model(pixel_values, output_attentions=True) for model in (eager, registered))
    torch.testing.assert_close(ours.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=0)
    assert len(ours.attentions) == len(expected.attentions) == 4
    for weights, reference in zip(ours.attentions, expected.attentions, strict=True):
        assert weights.shape == reference.shape
        torch.testing.assert_close(weights, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn_implementation", ["flash_attention_2", "flex_attention"])
def test_attention_kernels_that_cannot_take_a_bias_per_head_are_refused(attn_implementation):
    # flash attention adds no bias, and transformers' flex_attention reads one mask for every head: a focal window's
    # bias differs by head, so both are refused (by transformers, at construction and when switched to) rather than
    # run wrong
    with pytest.raises(ValueError, match="FocalModel does not support"):
        make(FocalModel, attn_implementation=attn_implementation)
    model = make(FocalModel)
    with pytest.raises(ValueError, match="FocalModel does not support"):
        model.set_attn_implementation(attn_implementation)
    assert model.config._attn_implementation == "focal_sdpa"


def test_bias_handed_to_the_attention_kernel_does_not_grow_with_the_batch():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = []

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        seen.append((query.shape[0], attention_mask.shape, attention_mask.untyped_storage().nbytes()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("recording_sdpa", recording_sdpa)
    model = make(FocalModel, attn_implementation="recording_sdpa", use_shift=True)
    with torch.no_grad():
        for batch_size in (1, 8):
            model(torch.randn(batch_size, 3, 64, 64))
    num_blocks = sum(model.config.depths)
    batch_1, batch_8 = seen[:num_blocks], seen[num_blocks:]
    assert [query_batch for query_batch, _, _ in batch_8] == [8] * num_blocks
    for (_, shape_1, bytes_1), (_, shape_8, bytes_8) in zip(batch_1, batch_8, strict=True):
        assert shape_1 == shape_8 and shape_8[0] == 1 and bytes_8 == bytes_1  # one copy, broadcast over the images


def test_bfloat16_training_step_on_cpu():
    model = make(FocalForImageClassification).train()
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    reference = _gradients(model, pixel_values, labels)
    gradients = _gradients(model.to(torch.bfloat16), pixel_values.to(torch.bfloat16), labels)
    assert gradients.keys() == reference.keys()
    for gradient in gradients.values():
        assert gradient.dtype == torch.bfloat16 and torch.isfinite(gradient).all()
    flat = torch.cat([gradients[name].float().flatten() for name in reference])
    flat_reference = torch.cat([gradient.flatten() for gradient in reference.values()])
    assert torch.nn.functional.cosine_similarity(flat, flat_reference, dim=0) > 0.98


def test_drop_path_keeps_or_drops_whole_samples_and_scales_the_kept():
    drop_path = modeling_focal.FocalDropPath(0.25).train()
    hidden_states = torch.randn(4000, 5, 3, requires_grad=True)
    output = drop_path(hidden_states)
    kept = output.detach().flatten(1).ne(0).all(1)  # each sample either kept whole...
    assert not output[~kept].any()  # ...or dropped whole
    assert 0.72 < kept.float().mean() < 0.78
    scale = torch.where(kept, 1 / 0.75, 0.0)[:, None, None]
    torch.testing.assert_close(output, hidden_states * scale, rtol=0, atol=1e-6)
    output.sum().backward()
    torch.testing.assert_close(hidden_states.grad, scale.expand_as(hidden_states), rtol=0, atol=1e-6)
    assert drop_path.eval()(hidden_states) is hidden_states
    assert modeling_focal.FocalDropPath(0.0).train()(hidden_states) is hidden_states


def test_focal_fast_position_mlps_run_in_float32_under_autocast():
    model = make(FocalModel, "focal_fast").train()
    attention = model.encoder.layers[0].blocks[0].attention
    layout = attention.key_layout(16, 12, torch.device("cpu"))
    reference = attention.position_bias(layout)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bias = attention.position_bias(layout)
        assert modeling_focal.autocast_input(torch.ones(1)).dtype == torch.bfloat16  # (autocast is on here)
    assert bias.dtype == torch.float32 and torch.equal(bias, reference)
    bias.sum().backward()
    assert all(p.grad is not None for p in attention.relative_position_mlps.parameters())


def test_outputs_follow_in_place_parameter_changes_and_dtype():
    model = make(FocalForImageClassification)
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(pixel_values).logits
        table = model.focal.encoder.layers[0].blocks[0].attention.relative_position_bias_table
        table.copy_(3 * torch.randn_like(table))  # in place: nothing computed from the old table may be reused
        after = model(pixel_values).logits
        fresh = FocalForImageClassification(model.config).eval()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(after, fresh(pixel_values).logits, atol=1e-6, rtol=0)
        assert not torch.allclose(after, before, atol=1e-4)
        as_double = model.double()(pixel_values.double()).logits
    assert as_double.dtype == torch.float64
    torch.testing.assert_close(as_double.float(), after, atol=1e-5, rtol=0)
    model(pixel_values.double()).logits.sum().backward()  # the bias is differentiable
    assert table.grad is not None and table.grad.abs().sum() > 0


@pytest.fixture
def attention_bias_calls(monkeypatch):
    """Every computation of a block's attention bias (`FocalAttentionBase.attention_bias`), one entry each."""
    calls = []
    original = modeling_focal.FocalAttentionBase.attention_bias

    def counted(self, layout):
        calls.append(1)
        return original(self, layout)

    monkeypatch.setattr(modeling_focal.FocalAttentionBase, "attention_bias", counted)
    return calls


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: a stand-in for a GPU (nothing waits for it)
@pytest.mark.parametrize("attention_type", ATTENTIONS)
def test_inference_reuses_the_attention_bias_until_a_weight_changes(attention_type, device, attention_bias_calls):
    model = make(FocalForImageClassification, attention_type).to(device)
    calls = attention_bias_calls
    pixel_values = torch.randn(2, 3, 64, 64, device=device)
    num_blocks = sum(model.config.depths)
    attention = model.focal.encoder.layers[0].blocks[0].attention
    bias_weight = next(p for name, p in attention.named_parameters() if not name.startswith(("qkv.", "proj.")))
    with torch.no_grad():
        first = model(pixel_values).logits
        assert len(calls) == num_blocks
        attention.qkv.weight.add_(0.0)  # not a bias weight
        again = model(pixel_values).logits
        assert len(calls) == num_blocks  # reused
        if device == "cpu":
            torch.testing.assert_close(again, first, atol=0, rtol=0)
        bias_weight.add_(0.5)  # in place: that block's bias is computed afresh
        model(pixel_values)
        assert len(calls) == num_blocks + 1
        if device == "cpu":  # (meta tensors have no memory addresses to tell apart)
            bias_weight.data = bias_weight.data.clone()  # other memory (the same values): afresh
            model(pixel_values)
            assert len(calls) == num_blocks + 2
        model.to(torch.float64)(pixel_values.double())  # another dtype: every block afresh
        assert len(calls) == 2 * num_blocks + 1 + (device == "cpu")
        # through `.data` PyTorch counts no change: the CPU's comparison of values sees it, elsewhere it is not
        # looked for (it would wait for the device)
        bias_weight.data.mul_(2)
        model(pixel_values.double())
        assert len(calls) == 2 * num_blocks + 1 + 2 * (device == "cpu")
    model(pixel_values.double()).logits.sum().backward()  # with autograd: always computed afresh
    assert len(calls) == 3 * num_blocks + 1 + 2 * (device == "cpu")


def test_weights_made_under_inference_mode_are_not_cached_off_the_cpu(attention_bias_calls):
    # they have no version counter: off the CPU (where values are not compared) an in-place change would go unseen
    calls = attention_bias_calls
    with torch.inference_mode():
        for device in ("cpu", "meta"):
            calls.clear()
            model = make(FocalForImageClassification).to(device)
            pixel_values = torch.randn(1, 3, 64, 64, device=device)
            model(pixel_values)
            model(pixel_values)
            assert len(calls) == sum(model.config.depths) * (1 if device == "cpu" else 2), device


@pytest.mark.parametrize("attention_type", ATTENTIONS)
def test_no_host_synchronisation_off_the_cpu(attention_type):
    # on a GPU, an operator that hands a value to Python (torch.equal, .item(), bool(tensor)) waits for the device;
    # the meta device stands in for one here: inference and training dispatch none (off the CPU the bias cache
    # compares no weights, only their version counters)
    from torch.utils._python_dispatch import TorchDispatchMode

    to_host = {"aten::equal", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::allclose"}

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func.name())
            return func(*args, **(kwargs or {}))

    model = make(FocalForImageClassification, attention_type, use_shift=True)
    pixel_values, labels = torch.randn(2, 3, 64, 96), torch.tensor([0, 1])
    on_cpu = Record()
    with torch.no_grad(), on_cpu:
        model(pixel_values)
        model(pixel_values)
    assert "aten::equal" in on_cpu.seen  # on CPU the bias cache compares weights (the check below can fail)
    model.to("meta")
    off_cpu = Record()
    with off_cpu:
        with torch.no_grad():
            model(pixel_values.to("meta"))
            logits = model(pixel_values.to("meta")).logits
        model.train()(pixel_values.to("meta"), labels=labels.to("meta")).loss.backward()
    assert logits.shape == (2, model.config.num_labels) and len(off_cpu.seen) > 100
    assert to_host.isdisjoint(off_cpu.seen), sorted(to_host.intersection(off_cpu.seen))


@pytest.mark.parametrize("attn_implementation", ["eager", "focal_sdpa"])
def test_cpu_chunking_gives_the_same_outputs(monkeypatch, attn_implementation):
    # without autograd on CPU, blocks run a few images at a time (here, with a tiny budget, one)
    model = make(FocalForImageClassification, attn_implementation=attn_implementation)
    pixel_values = torch.randn(3, 3, 64, 64)
    calls = []
    model.focal.encoder.layers[0].blocks[0].mlp.fc1.register_forward_hook(lambda *args: calls.append(1))
    eager = attn_implementation == "eager"
    with torch.no_grad():
        reference = model(pixel_values, output_attentions=eager)
        assert len(calls) == 1
        monkeypatch.setattr(modeling_focal, "CPU_CHUNK_BYTES", 1024)
        chunked = model(pixel_values, output_attentions=eager)
    assert len(calls) == 1 + 3
    torch.testing.assert_close(chunked.logits, reference.logits, atol=1e-6, rtol=0)
    for ours, expected in zip(chunked.attentions or (), reference.attentions or (), strict=True):
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert (chunked.attentions is not None) == eager
    model(pixel_values)  # with autograd: all images at once
    assert len(calls) == 2 + 3


def test_focal_sdpa_is_the_default():
    assert FocalModel(tiny_config()).config._attn_implementation == "focal_sdpa"
    assert make(FocalModel, attn_implementation="sdpa").config._attn_implementation == "sdpa"


@pytest.mark.parametrize("attention_type", ATTENTIONS)
def test_bfloat16_on_cpu(attention_type):
    model = make(FocalForImageClassification, attention_type)
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(pixel_values).logits
        logits = model.to(torch.bfloat16)(pixel_values.to(torch.bfloat16)).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, atol=0.15, rtol=0.05)


def test_losses_follow_problem_type():
    pixel_values = torch.randn(2, 3, 64, 64)
    single = make(FocalForImageClassification)
    outputs = single(pixel_values, labels=torch.tensor([0, 2]))
    expected = torch.nn.functional.cross_entropy(outputs.logits, torch.tensor([0, 2]))
    torch.testing.assert_close(outputs.loss, expected)

    multi = make(FocalForImageClassification, problem_type="multi_label_classification")
    targets = torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 0, 0, 1]])
    outputs = multi(pixel_values, labels=targets)
    torch.testing.assert_close(
        outputs.loss, torch.nn.functional.binary_cross_entropy_with_logits(outputs.logits, targets)
    )
    regression = make(FocalForImageClassification, num_labels=1)
    targets = torch.tensor([0.5, -1.0])
    outputs = regression(pixel_values, labels=targets)
    assert regression.config.problem_type == "regression"
    torch.testing.assert_close(outputs.loss, torch.nn.functional.mse_loss(outputs.logits.squeeze(), targets))


def test_return_dict_false_gives_tuples():
    outputs = make(FocalForImageClassification)(torch.randn(1, 3, 64, 64), labels=torch.tensor([1]), return_dict=False)
    assert isinstance(outputs, tuple) and outputs[0].ndim == 0 and outputs[1].shape == (1, 5)


# ---------------------------------------------------------------------------------------------- backbone
def test_backbone_feature_maps_are_normalised_stage_outputs():
    backbone = make(FocalBackbone, out_features=["stem", "stage2", "stage3"])
    assert backbone.channels == [16, 32, 64]
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outputs = backbone(pixel_values)
        stages = backbone.focal(pixel_values, output_hidden_states=True, output_hidden_states_before_downsampling=True)
    assert [tuple(m.shape) for m in outputs.feature_maps] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4)]
    for feature_map, stage, index in zip(outputs.feature_maps, ["stem", "stage2", "stage3"], [0, 2, 3]):
        norm = backbone.hidden_states_norms[stage]
        expected = norm(stages.reshaped_hidden_states[index].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(feature_map, expected)


@pytest.mark.parametrize("attention_type", ATTENTIONS)
def test_backbone_in_upernet_trains_at_two_sizes(attention_type):
    backbone_config = tiny_config(
        attention_type=attention_type, focal_topk=12, out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    config = UperNetConfig(
        backbone_config=backbone_config, hidden_size=32, auxiliary_in_channels=64, use_auxiliary_head=True, num_labels=3
    )
    model = UperNetForSemanticSegmentation(config).train()
    assert isinstance(model.backbone, FocalBackbone)
    for height, width in [(64, 64), (96, 80)]:
        model.zero_grad()
        labels = torch.randint(0, 3, (2, height, width))
        outputs = model(torch.randn(2, 3, height, width), labels=labels)
        assert outputs.logits.shape == (2, 3, height, width)
        outputs.loss.backward()
        grad = model.backbone.focal.encoder.layers[0].blocks[0].attention.qkv.weight.grad
        assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("attention_type", ATTENTIONS)
def test_torch_compile_has_no_graph_breaks(attention_type):
    model = make(FocalForImageClassification, attention_type, use_shift=True)
    pixel_values = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(pixel_values)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values).logits, model(pixel_values).logits, atol=1e-5, rtol=0)


def test_focal_layout_merges_duplicate_keys_and_masks_pooled_keys_outside_the_map():
    # Focal-T's first stage: 56x56 tokens, windows of 7, expand size 3, one pooled level with a 7x7 neighbourhood
    geometry = official_config("focal-tiny").block_geometry(0, 0)
    offsets, slots = fine_keys(geometry)
    # 132 official surrounding slots reach 120 distinct offsets: 12 are reached by two shifted windows
    assert len(neighbor_slots(7, 3)) == 132 and len(offsets) == len(slots) == 49 + 120
    assert sum(len(group) == 2 for group in slots) == 12
    assert sorted(slot for group in slots for slot in group) == list(range(49 + 132))
    layout = focal_key_layout(56, 56, geometry, torch.device("cpu"))
    # 49 own + 120 surrounding + 49 pooled keys, padded to 224 (a multiple of 16)
    assert layout.key_index.shape == (64, 224) and layout.key_mask.shape == (64, 1, 224)
    assert torch.isneginf(layout.key_mask[:, 0, 218:]).all() and not layout.key_mask[:, 0, :169].any()
    pooled_start = 56 * 56
    for window in (0, 9, 27, 63):
        fine = layout.key_index[window, :169]
        assert len(set(fine.tolist())) == 169 and (fine < pooled_start).all()
        valid = torch.isfinite(layout.key_mask[window, 0, 169:218])
        pooled = layout.key_index[window, 169:218][valid]
        assert len(set(pooled.tolist())) == int(valid.sum()) and (pooled >= pooled_start).all()
    # windows (0, 0), (1, 1), (3, 3) see 4x4, 5x5 and all 7x7 of their neighbourhood on the 8x8 pooled map
    assert [int(torch.isfinite(layout.key_mask[w, 0, 169:218]).sum()) for w in (0, 9, 27)] == [16, 25, 49]
    # a shifted block: -100 between tokens of different regions, on the own keys only
    shifted = official_config("focal-tiny", use_shift=True).block_geometry(0, 1)
    mask = focal_key_layout(56, 56, shifted, torch.device("cpu")).key_mask
    assert mask.shape == (64, 49, 224) and set(mask[:, :, :49].unique().tolist()) == {0.0, -100.0}
    inner = [window for window in range(64) if window // 8 < 7 and window % 8 < 7]  # away from the shifted seams
    assert not mask[:, :, 49:169].any() and not mask[inner, :, :49].any() and mask[63, :, :49].any()
    assert not any("index" in name or "slots" in name for name in FocalModel(tiny_config()).state_dict())


@pytest.mark.parametrize("attention_type", ATTENTIONS)
def test_inference_mode_then_training_at_any_size(attention_type):
    model = make(FocalForImageClassification, attention_type)
    odd = torch.randn(2, 3, 80, 48)  # its layouts are first built under inference mode
    with torch.inference_mode():
        first = model(odd).logits
        at_config_size = model(torch.randn(1, 3, 64, 64)).logits
    with torch.no_grad():
        torch.testing.assert_close(model(odd).logits, first, atol=1e-6, rtol=0)
    model.train()
    model(odd, labels=torch.tensor([0, 1])).loss.backward()  # the same layouts serve autograd
    assert torch.isfinite(at_config_size).all()
    with torch.inference_mode():
        built_inside = FocalForImageClassification(model.config).eval()  # inference tensors throughout
        torch.testing.assert_close(built_inside(odd).logits, built_inside(odd).logits)
