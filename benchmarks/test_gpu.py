"""GPU correctness of the attention path off the CPU (`benchmarks/gpu_check.sh` runs this on a lent GPU; CI has none).

`focal_sdpa` on CUDA is one `scaled_dot_product_attention` call with the windows folded into the head dimension and
one bias broadcast over the batch: its values and gradients must equal the eager path's, also through the
memory-efficient kernel (the one that takes an additive bias and differentiates it), in fp32 and bf16. The same
holds for the fused Triton candidate, `focal_triton` (`benchmarks/triton_attention.py`), compiled for the GPU here
(CI checks it in Triton's interpreter), also at Focal-T's size (its 224 keys in several blocks) and under
`torch.compile`.
"""

import os
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# Triton kernels compiled for the GPU (tests/conftest.py, imported here for `tiny_config`, sets Triton's CPU interpreter
# where nothing set it)
os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import triton_attention  # noqa: E402  (registers "focal_triton")
from conftest import tiny_config  # noqa: E402

from focal_hf import FocalForImageClassification, official_config  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
assert not triton_attention.INTERPRETED
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True, scope="module")
def one_launch_configuration():
    """focal_triton's kernels in their first launch configuration only: `triton.autotune` would compile and time every
    one for each of these tests' many block shapes (`ablation.py` tunes them; CI compiles every one for sm_90)."""
    tuned = (triton_attention._tuned_forward, triton_attention._tuned_backward)
    configs = [kernel.configs for kernel in tuned]
    for kernel in tuned:
        kernel.configs = kernel.configs[:1]
    yield
    for kernel, kept in zip(tuned, configs, strict=True):
        kernel.configs = kept


def _pair(attention_type, implementation="focal_sdpa"):
    """The same tiny model (shifted windows) with the eager attention and `implementation`, on the GPU."""
    models = []
    for attn_implementation in ("eager", implementation):
        config = tiny_config(
            attention_type=attention_type,
            focal_topk=12,
            use_shift=True,
            depths=[2, 2, 2, 1],
            attn_implementation=attn_implementation,
        )
        models.append(FocalForImageClassification(config).cuda().train())
    models[1].load_state_dict(models[0].state_dict())
    assert [model.config._attn_implementation for model in models] == ["eager", implementation]
    return models


def _run(model, pixel_values, labels):
    model.zero_grad(set_to_none=True)
    out = model(pixel_values, labels=labels)
    out.loss.backward()
    grads = {name.removeprefix("_orig_mod."): p.grad.detach().clone() for name, p in model.named_parameters()}
    return out.logits.detach(), grads  # (`_orig_mod.`: a compiled module's parameter names)


def assert_equals_reference(reference, logits, grads):
    """`logits` and `grads` (of `_run`) equal the `reference` ones in float32 within 1e-4."""
    reference_logits, reference_grads = reference
    torch.testing.assert_close(logits, reference_logits, atol=1e-4, rtol=0)
    assert grads.keys() == reference_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize(
    "implementation, backend",
    [("focal_sdpa", None), ("focal_sdpa", SDPBackend.EFFICIENT_ATTENTION), ("focal_triton", None)],
)
@pytest.mark.parametrize("size", [(64, 64), (96, 160)])
@pytest.mark.parametrize("attention_type", ["focal", "focal_fast"])
def test_values_and_gradients_equal_eager(attention_type, size, implementation, backend):
    eager, fused = _pair(attention_type, implementation)
    pixel_values = torch.randn(3, 3, *size, device="cuda")
    labels = torch.tensor([0, 4, 2], device="cuda")
    reference = _run(eager, pixel_values, labels)
    with sdpa_kernel(backend) if backend is not None else torch.enable_grad():
        assert_equals_reference(reference, *_run(fused, pixel_values, labels))


@pytest.mark.parametrize("implementation", ["focal_sdpa", "focal_triton"])
@pytest.mark.parametrize("attention_type", ["focal", "focal_fast"])
def test_bfloat16_training_step(attention_type, implementation):
    eager, fused = _pair(attention_type, implementation)
    pixel_values = torch.randn(4, 3, 96, 96, device="cuda")
    labels = torch.tensor([0, 1, 2, 3], device="cuda")
    reference_logits, reference = _run(eager, pixel_values, labels)
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        logits, grads = _run(fused, pixel_values, labels)
    torch.testing.assert_close(logits.float(), reference_logits, atol=5e-2, rtol=5e-2)
    flat = torch.cat([grads[name].float().flatten() for name in reference])
    flat_reference = torch.cat([grad.flatten() for grad in reference.values()])
    assert torch.nn.functional.cosine_similarity(flat, flat_reference, dim=0) > 0.99


def test_focal_tiny_on_gpu_equals_cpu():
    torch.manual_seed(0)
    model = FocalForImageClassification(official_config("focal-tiny")).eval()
    pixel_values = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        cpu = model(pixel_values).logits
        gpu = model.cuda()(pixel_values.cuda()).logits.cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=0)


def test_triton_at_focal_tiny_size_equals_focal_sdpa():
    torch.manual_seed(0)
    overrides = dict(num_labels=10, drop_path_rate=0.0)  # (training mode without random paths)
    sdpa = FocalForImageClassification(official_config("focal-tiny", **overrides)).cuda().train()
    config = official_config("focal-tiny", attn_implementation="focal_triton", **overrides)
    fused = FocalForImageClassification(config).cuda().train()
    fused.load_state_dict(sdpa.state_dict())
    pixel_values = torch.randn(2, 3, 224, 224, device="cuda")
    labels = torch.tensor([1, 7], device="cuda")
    assert_equals_reference(_run(sdpa, pixel_values, labels), *_run(fused, pixel_values, labels))


def test_triton_compiles_in_one_graph():
    eager, fused = _pair("focal", "focal_triton")
    compiled = torch.compile(fused, fullgraph=True)
    pixel_values = torch.randn(4, 3, 96, 96, device="cuda")
    labels = torch.tensor([0, 1, 2, 3], device="cuda")
    assert_equals_reference(_run(eager, pixel_values, labels), *_run(compiled, pixel_values, labels))


def test_training_keeps_no_gathered_keys_on_gpu(monkeypatch):
    # what a bf16 training step holds after its forward pass, with the gathered keys and values gathered again in
    # the backward pass (the default) and kept (the hooks replaced by a no-op): the difference is the gathered keys
    # less their source, the projection's keys and values (which only the regathering keeps)
    import contextlib

    from focal_hf import modeling_focal

    torch.manual_seed(0)
    model = FocalForImageClassification(official_config("focal-tiny")).cuda().train()
    pixel_values = torch.randn(16, 3, 224, 224, device="cuda")
    labels = torch.zeros(16, dtype=torch.long, device="cuda")
    gathered = []

    def held_after_forward():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(pixel_values, labels=labels).loss
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        model.zero_grad(set_to_none=True)
        return held

    original = modeling_focal.gather_keys

    def recording(source, key_index, num_heads):
        keys = original(source, key_index, num_heads)
        gathered.append(keys.nbytes - source.nbytes)
        return keys

    monkeypatch.setattr(modeling_focal, "gather_keys", recording)
    regathered = held_after_forward()
    forward_gathers = len(gathered) // 2  # (each block gathers keys and values once forward, once backward)
    gathered_bytes = sum(gathered[:forward_gathers])
    monkeypatch.setattr(modeling_focal, "RegatheredKeys", lambda *args: contextlib.nullcontext())
    kept = held_after_forward()
    assert kept - regathered >= 0.9 * gathered_bytes > 0, (kept, regathered, gathered_bytes)
