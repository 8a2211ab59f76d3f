"""The Triton candidate for the GPU path (`benchmarks/triton_attention.py`, `attn_implementation="focal_triton"`),
run here by Triton's interpreter on the CPU: the same values and gradients as eager attention and the CPU op, also
through the launch path a GPU takes (autotuning); and its kernels compiled for a GPU (sm_90) without one."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import BENCHMARKS, import_script
from test_modeling import ATTENTIONS, assert_equals_eager_with_shift

from focal_hf.modeling_focal import cpu_gathered_attention


@pytest.fixture(scope="module")
def triton_attention():
    pytest.importorskip("triton", reason="Triton has wheels for Linux on x86-64 only (setup.cfg's test extra)")
    module = import_script("triton_attention")
    assert module.INTERPRETED  # (conftest sets TRITON_INTERPRET)
    return module


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


@pytest.mark.parametrize(
    "area, key_block",
    [(49, 64), (49, 16), (80, 16)],  # keys in one block or in three (the last partly padding); queries in two blocks
)
def test_op_equals_the_cpu_op(triton_attention, monkeypatch, area, key_block):
    # head_dim 24 and 40 keys: blocks wider than the data (masked loads and stores); 3 images: a group of 2 and of 1;
    # the forward pass's softmax over several key blocks; the backward pass's blocks each adding to the gradients
    monkeypatch.setitem(triton_attention.INTERPRETED_FORWARD, "BLOCK_K", key_block)
    monkeypatch.setitem(triton_attention.INTERPRETED_BACKWARD, "BLOCK_K", key_block)
    query, key, value, bias, key_index = random_inputs(torch.float32, area=area)
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


def test_tuned_launch_as_on_a_gpu(triton_attention, monkeypatch):
    # the launch path a GPU takes (triton.autotune: every configuration run, the gradient buffers zeroed between runs,
    # the grids computed from each configuration), its kernels interpreted; only the timer is replaced (none runs
    # here): each configuration times faster than the one before, so the last is chosen. Every configuration runs
    # twice, so gradients added twice would show
    monkeypatch.setattr(triton_attention, "INTERPRETED", False)
    for kernel in (triton_attention._tuned_forward, triton_attention._tuned_backward):
        times = iter(range(100, 0, -1))

        def timer(kernel_call, quantiles, times=times):
            kernel_call(), kernel_call()
            return [float(next(times))] * len(quantiles)

        monkeypatch.setattr(kernel, "_do_bench", timer)
        monkeypatch.setattr(kernel, "cache", {})
    query, key, value, bias, key_index = random_inputs(torch.float32, area=80)
    output = triton_attention.triton_gathered_attention(query, key, value, bias, key_index, 2, 0.3)[0]
    expected = cpu_gathered_attention(query, key, value, bias, key_index, 2, 0.3)[0]
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    grad_output = torch.randn_like(output)
    inputs = (query, key, value, bias)
    grads = torch.autograd.grad(output, inputs, grad_output)
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected, inputs, grad_output), strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
    chosen = triton_attention.tuned_configs()
    last = (triton_attention.FORWARD_CONFIGS[-1], triton_attention.BACKWARD_CONFIGS[-1])
    assert [list(configs.values()) for configs in chosen.values()] == [[triton_attention.describe(c)] for c in last]


def test_dropout_and_export_fall_back_to_focal_sdpa(triton_attention, monkeypatch):
    calls = []
    monkeypatch.setattr(triton_attention, "triton_gathered_attention", lambda *args: calls.append(args) or args)
    query, key, value, bias, key_index = random_inputs(torch.float32)
    module = torch.nn.Module()
    for dropout, exporting in ((0.0, False), (0.1, False), (0.0, True)):
        monkeypatch.setattr(torch.compiler, "_is_exporting_flag", exporting)  # what `is_exporting()` reads
        triton_attention.focal_triton_attention(module, query, key, value, key_index, bias, 0.3, dropout)
        assert len(calls) == (dropout == 0.0 and not exporting)
        calls.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [(64, 64), (80, 48)])
@pytest.mark.parametrize("attention_type", ATTENTIONS)
def test_model_equals_eager_with_shift(triton_attention, monkeypatch, attention_type, size, dtype):
    kernel, calls = triton_attention.triton_gathered_attention, []
    monkeypatch.setattr(triton_attention, "triton_gathered_attention", lambda *args: calls.append(1) or kernel(*args))
    assert_equals_eager_with_shift(attention_type, "focal_triton", size, dtype)
    assert len(calls) == 7  # every block ran the kernels


def test_kernels_compile_for_a_gpu(triton_attention):
    # what the interpreter does not check: the kernels compiled for an H100/H200 (sm_90) in every launch
    # configuration that triton.autotune tries there, by Triton's own compiler, without a GPU (a window of 12: several
    # blocks of queries and of keys)
    args = ["--capability", "90", "--window-area", "144", "--keys", "300", "--heads", "4", "--head-dim", "32"]
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "triton_attention.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "sm_90, bf16, 144 queries, 300 keys, 4 heads of 32"
    rows = [line.split(" | ") for line in lines[1:]]
    expected = [("forward", c) for c in triton_attention.FORWARD_CONFIGS]
    expected += [("backward", c) for c in triton_attention.BACKWARD_CONFIGS]
    assert [row[:2] for row in rows] == [[name, triton_attention.describe(config)] for name, config in expected]
    assert all(0 < int(row[2].split()[0]) <= 255 and int(row[3].split()[0]) >= 0 for row in rows)
