"""The Triton candidate for the GPU path (`benchmarks/triton_attention.py`, `attn_implementation="focal_triton"`),
run here by Triton's interpreter on the CPU: the same values and gradients as eager attention."""

import pytest
import torch
from conftest import import_script, tiny_config
from test_modeling import ATTENTIONS

from focal_hf import FocalForImageClassification
from focal_hf.modeling_focal import cpu_gathered_attention


@pytest.fixture(scope="module")
def triton_attention():
    pytest.importorskip("triton", reason="Triton has wheels for Linux on x86-64 only (setup.cfg's test extra)")
    module = import_script("triton_attention")
    assert module.INTERPRETED  # (conftest sets TRITON_INTERPRET)
    return module


def random_inputs(dtype, batch_size=3, num_windows=4, num_heads=2, head_dim=24, num_tokens=70, num_keys=40):
    """query, key, value and bias (all requiring gradients) and a key index stored key by key, as layouts store it;
    the bias has masked (-inf) keys, and the index repeats tokens within and across windows."""
    torch.manual_seed(0)
    query = torch.randn(batch_size, num_windows * 49, num_heads * head_dim)
    key, value = (torch.randn(batch_size, num_tokens, num_heads * head_dim) for _ in range(2))
    bias = torch.randn(num_windows, num_heads, 49, num_keys)
    bias[..., -5:] = float("-inf")
    key_index = torch.randint(0, num_tokens, (num_keys, num_windows)).t()
    tensors = [tensor.to(dtype).requires_grad_() for tensor in (query, key, value, bias)]
    return *tensors, key_index


@pytest.mark.parametrize("backward_key_block", [64, 16])
def test_op_equals_the_cpu_op(triton_attention, monkeypatch, backward_key_block):
    # head_dim 24 and 40 keys: blocks wider than the data (masked loads and stores); 3 images: a group of 2 and of 1;
    # the backward pass in one block of keys, or in three (the last part padding), each adding to the query gradient
    monkeypatch.setattr(triton_attention, "BACKWARD_KEY_BLOCK", backward_key_block)
    query, key, value, bias, key_index = random_inputs(torch.float32)
    output, logsumexp = triton_attention.triton_gathered_attention(query, key, value, bias, key_index, 2, 0.3)
    expected, expected_logsumexp = cpu_gathered_attention(query, key, value, bias, key_index, 2, 0.3)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logsumexp, expected_logsumexp, atol=1e-5, rtol=1e-5)
    grad_output = torch.randn_like(output)
    inputs = (query, key, value, bias)
    grads = torch.autograd.grad(output, inputs, grad_output)
    expected_grads = torch.autograd.grad(expected, inputs, grad_output)
    for name, grad, expected_grad in zip(("query", "key", "value", "bias"), grads, expected_grads, strict=True):
        assert grad.abs().max() > 0.1, name
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5, msg=name)


def test_too_large_layouts_and_dropout_fall_back_to_focal_sdpa(triton_attention, monkeypatch):
    calls = []
    monkeypatch.setattr(triton_attention, "triton_gathered_attention", lambda *args: calls.append(args) or args)
    query, key, value, bias, key_index = random_inputs(torch.float32)
    module = torch.nn.Module()
    for attention_mask, dropout, uses_kernel in ((bias, 0.0, True), (bias, 0.1, False)):
        triton_attention.focal_triton_attention(module, query, key, value, key_index, attention_mask, 0.3, dropout)
        assert len(calls) == uses_kernel
        calls.clear()
    assert triton_attention.fits(torch.empty(1, 1, 64, 256, device="meta"))
    assert not triton_attention.fits(torch.empty(1, 1, 64, 257, device="meta"))
    assert not triton_attention.fits(torch.empty(1, 1, 144, 200, device="meta"))  # (a window of 12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [(64, 64), (80, 48)])
@pytest.mark.parametrize("attention_type", ATTENTIONS)
def test_model_equals_eager_with_shift(triton_attention, monkeypatch, attention_type, size, dtype):
    kernel, calls = triton_attention.triton_gathered_attention, []
    monkeypatch.setattr(triton_attention, "triton_gathered_attention", lambda *args: calls.append(1) or kernel(*args))
    overrides = dict(attention_type=attention_type, focal_topk=12, use_shift=True, depths=[2, 2, 2, 1])
    eager = FocalForImageClassification(tiny_config(attn_implementation="eager", **overrides))
    fused = FocalForImageClassification(tiny_config(attn_implementation="focal_triton", **overrides))
    fused.load_state_dict(eager.state_dict())
    eager, fused = eager.to(dtype).train(), fused.to(dtype).train()
    pixel_values, labels = torch.randn(2, 3, *size, dtype=dtype), torch.tensor([0, 4])
    results = []
    for model in (eager, fused):
        inputs = pixel_values.clone().requires_grad_()
        output = model(inputs, labels=labels)
        output.loss.backward()
        gradients = {name: p.grad.float() for name, p in model.named_parameters()}
        results.append((output.logits.float(), inputs.grad.float(), gradients))
    (logits, input_grad, grads), (fused_logits, fused_input_grad, fused_grads) = results
    assert len(grads) == len(list(eager.parameters()))  # every parameter, the bias tables and MLPs included
    assert len(calls) == 7  # every block ran the kernels
    tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=5e-2)
    torch.testing.assert_close(fused_logits, logits, **tolerance)
    torch.testing.assert_close(fused_input_grad, input_grad, **tolerance)
    largest = max(float(gradient.abs().max()) for gradient in grads.values())
    for name in grads:
        if dtype == torch.float32:
            torch.testing.assert_close(fused_grads[name], grads[name], **tolerance, msg=name)
        else:  # (as test_modeling's folded-attention test: rounding noise aside, the gradients point the same way)
            cosine = torch.nn.functional.cosine_similarity(fused_grads[name].flatten(), grads[name].flatten(), dim=0)
            assert cosine > 0.99 or grads[name].abs().max() < 1e-4 * largest, name
