"""Deployment at any input size: `torch.export` with symbolic height and width (one program for every side of at
least 32 px), an AOTInductor package, ONNX run in onnxruntime, `torch.compile(dynamic=True, fullgraph=True)` as one
graph, a training step compiled by inductor, a mixed-precision step compiled whole, and accelerate's disk offload
(`device_map="auto"`).
Tiny four-stage models with shifted windows, both attention types; each model and its exported program (also the
ONNX test's source) are built once per attention type: tracing is the slow part."""

import subprocess
import sys

import onnxruntime
import pytest
import torch
from conftest import tiny_config
from torch.export import Dim

from focal_hf import FocalForImageClassification, official_config

ATTENTIONS = ["focal", "focal_fast"]
# a four-stage model's total stride: the smallest side it accepts, and the lower bound of every exported size
MIN_SIDE = 32
# (height, width): larger and non-square (stages 2 and 3 padded to whole windows), the configured size, odd sides (the
# stem floors them) and the smallest sides (stage 3 is a single token)
SIZES = [(96, 128), (64, 64), (161, 99), (32, 40)]


def symbolic_sizes():
    """`dynamic_shapes` for `pixel_values`: any batch size, any height and width of at least `MIN_SIDE`."""
    return {"pixel_values": {0: Dim("batch"), 2: Dim("height", min=MIN_SIDE), 3: Dim("width", min=MIN_SIDE)}}


def eager_logits(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values).logits


@pytest.fixture(scope="module", params=ATTENTIONS)
def model(request):
    """A tiny model (stages of 16x16, 8x8, 4x4 and 2x2 tokens at its 64 px; two blocks in the first two stages, the
    second shifted) with the default attention implementation."""
    torch.manual_seed(0)
    config = tiny_config(attention_type=request.param, focal_topk=12, depths=[2, 2, 1, 1], use_shift=True)
    assert config.block_geometry(0, 1).shift_size and config.block_geometry(1, 1).shift_size
    return FocalForImageClassification(config).eval()


@pytest.fixture(scope="module")
def exported(model):
    with torch.no_grad():
        return torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=symbolic_sizes())


# ---------------------------------------------------------------------------------------------- torch.export
def test_exported_program_serves_every_size(model, exported):
    run = exported.module()
    for batch_size, (height, width) in zip([2, 1, 3, 2], SIZES):
        pixel_values = torch.randn(batch_size, 3, height, width)
        with torch.no_grad():
            logits = run(pixel_values).logits
        torch.testing.assert_close(logits, eager_logits(model, pixel_values), rtol=0, atol=1e-4)


def test_exported_program_builds_a_key_layout_per_stage_not_per_block(model, exported):
    # Focal-fast's blocks of a stage share one layout (`FocalStage`), whose graph has a `topk` per focal level: 4 stages
    # x 2 levels, where a layout per block would be 6 x 2 (Focal's layouts take no `topk`)
    layouts = len(model.config.depths) if model.config.attention_type == "focal_fast" else 0
    topk = [node for node in exported.graph.nodes if node.target is torch.ops.aten.topk.default]
    assert len(topk) == layouts * 2 and sum(model.config.depths) == 6


def test_exported_program_states_its_minimum_size(exported):
    run = exported.module()
    for height, width in [(MIN_SIDE - 1, 64), (64, MIN_SIDE - 1)]:
        # torch's input check: "Guard failed: pixel_values.size()[2] >= 32"
        with pytest.raises((AssertionError, RuntimeError), match=rf"pixel_values.*>= {MIN_SIDE}"):
            run(torch.randn(1, 3, height, width))


def test_saved_program_loads_where_focal_hf_is_imported(model, exported, tmp_path):
    path = tmp_path / "focal.pt2"
    torch.export.save(exported, path)
    pixel_values = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        logits = torch.export.load(path).module()(pixel_values).logits
    torch.testing.assert_close(logits, eager_logits(model, pixel_values), rtol=0, atol=1e-4)
    # in a fresh process the output classes must be registered first (as for any transformers model's program)
    load = f"import torch; torch.export.load({str(path)!r}).module()(torch.randn(1, 3, 64, 64))"
    for prelude, works in [("import focal_hf; ", True), ("", False)]:
        run = subprocess.run([sys.executable, "-c", prelude + load], capture_output=True, text=True, timeout=300)
        assert (run.returncode == 0) == works, run.stderr[-2000:]
        assert works or "is not registered" in run.stderr


def test_focal_tiny_exported_at_224_runs_at_other_sizes():
    torch.manual_seed(0)
    model = FocalForImageClassification(official_config("focal-tiny")).eval()
    dynamic_shapes = {"pixel_values": {2: Dim("height", min=MIN_SIDE), 3: Dim("width", min=MIN_SIDE)}}
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(1, 3, 224, 224),), dynamic_shapes=dynamic_shapes)
    for size in [(224, 224), (320, 256)]:
        pixel_values = torch.randn(1, 3, *size)
        with torch.no_grad():
            logits = program.module()(pixel_values).logits
        torch.testing.assert_close(logits, eager_logits(model, pixel_values), rtol=0, atol=1e-4)


def test_export_warns_when_the_example_makes_a_stage_one_window_wide(caplog):
    # what AOTInductor gets wrong (`warn_if_one_window_example`). A config of its own (image size 96: windows of 4,
    # 4, 4 and 3, the last shrunk to its stage), so that the warning, logged once per message, is not the one that the
    # fixture's export already gave
    torch.manual_seed(0)
    model = FocalForImageClassification(tiny_config(image_size=96, depths=[1, 1, 1, 1])).eval()
    for size, warned in [(192, False), (96, True)]:  # at 96 px the last stage is one window (3x3 tokens)
        caplog.clear()
        with caplog.at_level("WARNING", logger="focal_hf"), torch.no_grad():
            torch.export.export(model, (torch.randn(2, 3, size, size),), dynamic_shapes=symbolic_sizes())
        assert ("one window wide or high" in caplog.text) is warned, size
    assert "twice the configured image size: 192x192" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="focal_hf"), torch.no_grad():  # static sizes: nothing to specialise
        torch.export.export(model, (torch.randn(2, 3, 96, 96),))
    assert not caplog.text


def test_aoti_package_exported_at_twice_the_configured_size_serves_every_size(tmp_path):
    # AOTInductor compiles the exported program into a C++ package. From an example at which every stage is at least
    # two windows wide and high (here 128 px: maps of 32, 16, 8 and 4 tokens, windows of 4, 4, 4 and 2) its outputs
    # equal the eager model's at every size, also where a stage is one window wide; exported at 64 px, the model's own
    # size, it gave NaN at other sizes. Focal attention only, and compiled without vectorisation, whose tiling
    # simplifies the symbolic indices for minutes on 2 cores (Focal-fast: 4 minutes; checked by hand, as Focal-T
    # exported at 448 px and vectorised); the index arithmetic that went wrong is the same.
    torch.manual_seed(0)
    model = FocalForImageClassification(tiny_config(depths=[2, 1, 1, 1], use_shift=True)).eval()
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, 3, 128, 128),), dynamic_shapes=symbolic_sizes())
    package = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path / "focal.pt2"), inductor_configs={"cpp.simdlen": 0}
    )
    compiled = torch._inductor.aoti_load_package(package)
    for batch_size, (height, width) in zip([2, 1, 3, 2], SIZES):
        pixel_values = torch.randn(batch_size, 3, height, width)
        logits = compiled(pixel_values).logits
        torch.testing.assert_close(
            logits, eager_logits(model, pixel_values), rtol=0, atol=1e-4, msg=str((height, width))
        )


# ------------------------------------------------------------------------------------------------------ ONNX
def test_onnx_export_runs_in_onnxruntime_at_every_size(model, exported, tmp_path):
    if model.config.attention_type == "focal_fast":
        # ONNX's TopK breaks ties between equally distant tokens by index, PyTorch's CPU topk (whose choice the
        # official tables and our eager layouts reproduce) otherwise: with every token of each level attended there
        # is no choice at the k-th place, and the comparison is exact
        torch.manual_seed(0)
        model = FocalForImageClassification(model.config.__class__(**{**model.config.to_dict(), "focal_topk": 4096}))
        model = model.eval()
        with torch.no_grad():
            exported = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=symbolic_sizes())
    # from the exported program (what `torch.onnx.export(model, ..., dynamic_shapes=...)` traces first): one trace less
    program = torch.onnx.export(exported, dynamo=True, input_names=["pixel_values"], output_names=["logits"])
    # given a model, torch.onnx replaces the sizes it cannot keep symbolic by the example's (a static graph)
    (graph_input,) = program.model_proto.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert [bool(dims[axis].dim_param) for axis in range(4)] == [True, False, True, True], dims
    program.save(tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
    for batch_size, (height, width) in zip([2, 1, 3, 2], SIZES):
        pixel_values = torch.randn(batch_size, 3, height, width)
        (logits, *_) = session.run(None, {"pixel_values": pixel_values.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), eager_logits(model, pixel_values), rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------------------------- torch.compile
# sizes at which every stage has at least two windows per side: `torch.compile(dynamic=True)` specialises a size it
# first sees as 1 (as it does a batch of 1), so a map one window wide may get a graph of its own. Non-square first:
# equal sides of the first input would share one symbol ("duck sizing").
COMPILE_SIZES = [(96, 128), (161, 99), (130, 200)]


def test_compile_dynamic_fullgraph_is_one_graph_for_every_size(model):
    # one graph (`fullgraph=True`: no graph break) that no later size recompiles; traced by dynamo and AOTAutograd
    # (where graphs break or get specialised) without inductor's C++ code generation, minutes per model on 2 cores
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", dynamic=True, fullgraph=True)
    for call, (batch_size, (height, width)) in enumerate(zip([2, 3, 2], COMPILE_SIZES)):
        pixel_values = torch.randn(batch_size, 3, height, width)
        # after the first call, a new size must reuse the graph: a recompilation raises, naming the failed guard
        with torch._dynamo.config.patch(error_on_recompile=call > 0), torch.no_grad():
            logits = compiled(pixel_values).logits
        torch.testing.assert_close(logits, eager_logits(model, pixel_values), rtol=0, atol=1e-4)


def test_compiled_training_steps_at_two_sizes_with_inductor_give_the_eager_gradients():
    # `torch.compile`'s default compiles the first input size as it is and, at a second size, a graph with symbolic
    # sizes (where torch 2.13's inductor failed on the stages' channels-last maps: `channels_first`); with inductor's
    # C++ code generation and the default attention (the CPU op, one opaque node)
    torch.manual_seed(0)
    config = tiny_config(focal_topk=12, use_shift=True)
    model, reference = FocalForImageClassification(config).train(), FocalForImageClassification(config).train()
    reference.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    for size in [(64, 96), (96, 64)]:
        model.zero_grad()
        reference.zero_grad()
        pixel_values, labels = torch.randn(2, 3, *size), torch.tensor([0, 1])
        loss = compiled(pixel_values, labels=labels).loss
        loss.backward()
        reference_loss = reference(pixel_values, labels=labels).loss
        reference_loss.backward()
        torch.testing.assert_close(loss, reference_loss, atol=1e-5, rtol=0)
        for (name, parameter), expected in zip(model.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(parameter.grad, expected.grad, atol=1e-5, rtol=1e-4, msg=f"{size}: {name}")


def test_mixed_precision_casts_the_projections_input_once_and_compiles_whole():
    # under autocast the projections' input reaches them already in bf16 (`autocast_input`: one cast, where autocast
    # would cast it for each of the three products); without autocast it stays float32; torch.compile traces the
    # autocast step as one graph with the eager loss
    torch.manual_seed(0)
    model = FocalForImageClassification(tiny_config(use_shift=True)).train()
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    seen = []

    def record(module, inputs, outputs):
        seen.append({tensor.dtype for tensor in (*inputs, *outputs)})

    hook = model.focal.encoder.layers[0].blocks[0].attention.qkv.register_forward_hook(record)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(pixel_values, labels=labels).loss
    model(pixel_values, labels=labels)
    hook.remove()
    assert seen == [{torch.bfloat16}, {torch.float32}]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled_loss = compiled(pixel_values, labels=labels).loss
    torch.testing.assert_close(compiled_loss, loss, atol=1e-2, rtol=0)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 3, MIN_SIDE - 1, 64), rf">= {MIN_SIDE} .*got \({MIN_SIDE - 1}, 64\)"),
        ((1, 3, 64, MIN_SIDE - 1), rf">= {MIN_SIDE} .*got \(64, {MIN_SIDE - 1}\)"),
        ((1, 4, 64, 64), r"\(batch_size, 3, height, width\).*got shape \(1, 4, 64, 64\)"),
    ],
)
def test_compiled_model_raises_the_models_value_error(model, shape, message):
    # a Python exception inside a `fullgraph=True` region is itself a graph break: torch reports it as
    # `torch._dynamo.exc.Unsupported` ("Observed exception"), so the model's own error is what a default compile gives
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=True)
    with pytest.raises(ValueError, match=message), torch.no_grad():
        compiled(torch.randn(shape))


# ----------------------------------------------------------------------------------------------------- offload
def test_disk_offload_gives_the_same_logits(model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    model_bytes = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    offloaded = FocalForImageClassification.from_pretrained(
        tmp_path / "model",
        device_map="auto",
        max_memory={"cpu": int(0.4 * model_bytes)},
        offload_folder=tmp_path / "offload",
    )
    assert "disk" in offloaded.hf_device_map.values()
    # offloaded weights stay on the meta device outside their module's forward
    assert any(parameter.device.type == "meta" for parameter in offloaded.parameters())
    for size in [(64, 64), (96, 80)]:
        pixel_values = torch.randn(2, 3, *size)
        torch.testing.assert_close(eager_logits(offloaded, pixel_values), eager_logits(model, pixel_values))
