"""focal_sdpa's GPU path, the fused Triton kernels (`focal_hf.triton_attention`, differentiated by
`modeling_focal.TritonGatheredAttention`), run here by Triton's interpreter on the CPU: the same values and gradients
as eager attention and the CPU op, also through the launch path a GPU takes (autotuning); when focal_sdpa takes it;
its kernels compiled for a GPU (sm_90) without one; and the package and its remote code without Triton."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import BENCHMARKS, import_script, tiny_config
from test_modeling import ATTENTIONS, assert_equals_eager_with_shift, random_inputs

from focal_hf import FocalForImageClassification, FocalImageProcessor, modeling_focal
from focal_hf.modeling_focal import cpu_gathered_attention, is_exporting


@pytest.fixture(scope="module")
def triton_attention():
    pytest.importorskip("triton", reason="Triton has wheels for Linux on x86-64 only (setup.cfg's test extra)")
    from focal_hf import triton_attention

    assert triton_attention.INTERPRETED  # (conftest sets TRITON_INTERPRET)
    assert modeling_focal.triton_gathered_attention == modeling_focal.TritonGatheredAttention.apply
    return triton_attention


def assert_op_equals_the_cpu_op(query, key, value, bias, key_index):
    projections = modeling_focal.joined_projections(query, key, value)
    output, logsumexp = modeling_focal.triton_gathered_attention(projections, bias, key_index, 2, 0.3)
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


@pytest.mark.parametrize(
    "area, key_block",
    [(49, 64), (49, 16), (80, 16)],  # keys in one block or in three (the last partly padding); queries in two blocks
)
def test_op_equals_the_cpu_op(triton_attention, monkeypatch, area, key_block):
    # head_dim 24 and 40 keys: blocks wider than the data (masked loads and stores); 3 images: a group of 2 and of 1;
    # the forward pass's softmax over several key blocks; the backward pass's blocks each adding to the gradients
    monkeypatch.setitem(triton_attention.INTERPRETED_FORWARD, "BLOCK_K", key_block)
    monkeypatch.setitem(triton_attention.INTERPRETED_BACKWARD, "BLOCK_K", key_block)
    assert_op_equals_the_cpu_op(*random_inputs(torch.float32, area=area))


def test_kernels_take_the_projection_as_it_is():
    # queries (the first rows), keys and values split from one projection's output are handed over as that output
    # (its memory: nothing copied), whether `nn.Linear` computed it in two dimensions (its `_base`) or not; other
    # tensors are joined by a copy, the shorter padded, so that the kernels read all three with one layout
    linear = torch.nn.Linear(8, 3 * 4)
    for output in (linear(torch.randn(2, 5, 8)), torch.randn(2, 5, 12).add(1)):
        query, key, value = output.split(4, dim=-1)
        projections = modeling_focal.joined_projections(query[:, :3], key, value)
        assert projections.data_ptr() == output.data_ptr() and torch.equal(projections, output)
    query, key, value = torch.randn(2, 6, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    for args in [(query, key, value), (query[:, :5], key, value.clone().transpose(0, 1).contiguous().transpose(0, 1))]:
        projections = modeling_focal.joined_projections(*args)
        rows = max(args[0].shape[1], key.shape[1])
        assert projections.shape == (2, rows, 12)
        for index, tensor in enumerate(args):
            assert torch.equal(projections[:, : tensor.shape[1], 4 * index : 4 * (index + 1)], tensor)
        assert not projections[:, args[0].shape[1] :, :4].any() and not projections[:, 5:, 4:].any()


def test_tuned_launch_as_on_a_gpu(triton_attention, monkeypatch):
    # the launch path a GPU takes (triton.autotune: every configuration run, the gradient buffers zeroed between runs,
    # the grids computed from each configuration), its kernels interpreted; only the GPU driver's benchmarker, which
    # times each configuration, is replaced (no driver here): each configuration times faster than the one before,
    # so the last is chosen. Every configuration runs twice, so gradients added twice would show
    import triton

    times = iter(range(100, 0, -1))

    def timer(kernel_call, quantiles):
        kernel_call(), kernel_call()
        return [float(next(times))] * len(quantiles)

    class Driver:  # (what the kernels' timing asks of the driver, looked up when they are tuned)
        def get_benchmarker(self):
            return timer

    monkeypatch.setattr(triton.runtime.driver, "_active", Driver())
    monkeypatch.setattr(triton_attention, "INTERPRETED", False)
    for kernel in (triton_attention._tuned_forward, triton_attention._tuned_backward):
        monkeypatch.setattr(kernel, "cache", {})
    assert_op_equals_the_cpu_op(*random_inputs(torch.float32, area=80))
    chosen = triton_attention.tuned_configs()
    last = (triton_attention.FORWARD_CONFIGS[-1], triton_attention.BACKWARD_CONFIGS[-1])
    assert [list(configs.values()) for configs in chosen.values()] == [[triton_attention.describe(c)] for c in last]


def test_focal_sdpa_takes_the_kernels_only_where_they_run(triton_attention, monkeypatch):
    # on CPU never (the CPU op); on an NVIDIA GPU from Ampere (here: meta tensors, for which `is_cuda` and the device's
    # capability answer as there) in bf16 and fp16, without dropout, in eager mode, with autograd or from
    # TRITON_MIN_INFERENCE_BATCH images; else SDPA on the folded windows
    assert not modeling_focal.runs_triton_kernels(random_inputs(torch.bfloat16)[0], 0.0)  # (a CPU tensor)
    module = torch.nn.Module()
    calls = []
    monkeypatch.setattr(modeling_focal, "triton_gathered_attention", lambda *args: calls.append("triton") or args)
    monkeypatch.setattr(modeling_focal, "folded_sdpa_attention", lambda *args: calls.append("sdpa"))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda tensor: True))
    state = {"capability": 8, "exporting": False, "compiling": False}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (state["capability"], 0))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: state["compiling"])
    least = modeling_focal.TRITON_MIN_INFERENCE_BATCH
    cases = [  # (dtype, dropout, autograd, batch size, changed state) -> the path
        ((torch.bfloat16, 0.0, True, 2, {}), "triton"),
        ((torch.float16, 0.0, True, 2, {"capability": 9}), "triton"),
        ((torch.float32, 0.0, True, 2, {}), "sdpa"),
        ((torch.bfloat16, 0.1, True, 2, {}), "sdpa"),
        ((torch.bfloat16, 0.0, True, 2, {"exporting": True}), "sdpa"),
        ((torch.bfloat16, 0.0, True, 2, {"compiling": True}), "sdpa"),
        ((torch.bfloat16, 0.0, True, 2, {"capability": 7}), "sdpa"),
        ((torch.bfloat16, 0.0, False, least - 1, {}), "sdpa"),
        ((torch.bfloat16, 0.0, False, least, {}), "triton"),
    ]
    for (dtype, dropout, autograd, batch_size, changed), path in cases:
        state.update({"capability": 8, "exporting": False, "compiling": False, **changed})
        monkeypatch.setattr(torch.compiler, "_is_exporting_flag", state["exporting"])  # what `is_exporting()` reads
        query, key, value, bias, key_index = random_inputs(dtype, batch_size=batch_size, num_windows=1, area=4)
        query, key, value, bias = (tensor.detach().to("meta") for tensor in (query, key, value, bias))
        with torch.set_grad_enabled(autograd):
            modeling_focal.focal_sdpa_attention(module, query, key, value, key_index.to("meta"), bias, 0.3, dropout)
        assert calls == [path], (dtype, dropout, autograd, batch_size, changed)
        calls.clear()


def count_kernel_calls(monkeypatch) -> list:
    """The calls of the Triton kernels' attention from here on, counted (one item a call: whether it was given a view
    of another tensor's memory, as the `qkv` projection's output is, rather than a concatenation; `monkeypatch` undoes
    it)."""
    kernel, calls = modeling_focal.triton_gathered_attention, []

    def counted(projections, *args):
        calls.append(projections._base is not None)
        return kernel(projections, *args)

    monkeypatch.setattr(modeling_focal, "triton_gathered_attention", counted)
    return calls


def runs_everywhere(query, dropout):
    """`runs_triton_kernels` answering as on a GPU for any device (here: the CPU, the kernels interpreted)."""
    return dropout == 0.0 and not is_exporting()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [(64, 64), (80, 48)])
@pytest.mark.parametrize("attention_type", ATTENTIONS)
def test_model_equals_eager_with_shift(triton_attention, monkeypatch, attention_type, size, dtype):
    calls = count_kernel_calls(monkeypatch)
    monkeypatch.setattr(modeling_focal, "runs_triton_kernels", runs_everywhere)
    assert_equals_eager_with_shift(attention_type, "focal_sdpa", size, dtype)
    assert calls == [True] * 7  # every block ran the kernels, on its projection's output (nothing copied)


def test_gradient_checkpointing_runs_the_kernels_again(triton_attention, monkeypatch):
    # checkpointed blocks run the forward kernel again in the backward pass, with the same gradients
    calls = count_kernel_calls(monkeypatch)
    monkeypatch.setattr(modeling_focal, "runs_triton_kernels", runs_everywhere)
    assert_equals_eager_with_shift("focal", "focal_sdpa", (64, 64), torch.float32, checkpointing=True)
    assert calls == [True] * (2 * 7)


def test_launch_cost_calls_run(triton_attention, monkeypatch):
    # benchmarks/launch_cost.py times these calls on a GPU (a GPU session is short: a script that broke since would
    # waste it); here each runs once on a CPU block's arguments, the kernels interpreted, but the launch through
    # triton.autotune, which needs a GPU driver to time the configurations
    launch_cost = import_script("launch_cost")
    monkeypatch.setattr(modeling_focal, "runs_triton_kernels", runs_everywhere)
    model = FocalForImageClassification(tiny_config()).train()
    arguments = launch_cost.kernel_arguments(model, torch.randn(1, 3, 64, 64))
    assert len(arguments) == sum(model.config.depths)  # (every block)
    block = arguments[0]
    assert block[0].dtype == torch.bfloat16 and not block[0].requires_grad and block[0].is_contiguous()
    monkeypatch.setitem(triton_attention._tuned_forward.cache, ("any key",), triton_attention.FORWARD_CONFIGS[0])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = launch_cost.rows(block)
    assert len(calls) == 8 and "forward kernel through triton.autotune" in calls
    for name, call in calls.items():
        if name != "forward kernel through triton.autotune":
            host, finished = launch_cost.per_call(call, 1)
            assert 0 < host <= finished, name


@pytest.mark.parametrize("scaling_type", ["fp32", "fp64"])
def test_kernels_compile_for_a_gpu(triton_attention, scaling_type):
    # what the interpreter does not check: the kernels compiled for an H100/H200 (sm_90) in every launch
    # configuration that triton.autotune tries there, by Triton's own compiler, without a GPU (a window of 12: several
    # blocks of queries and of keys), with the float argument as Triton's launcher passes it (fp32) and as the code
    # that torch.compile generates does (fp64: a kernel whose float32 softmax took it as it came did not compile)
    args = ["--capability", "90", "--window-area", "144", "--keys", "300", "--heads", "4", "--head-dim", "32"]
    args += ["--scaling-type", scaling_type]
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "triton_registers.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"sm_90, bf16, 144 queries, 300 keys, 4 heads of 32, scaling {scaling_type}"
    rows = [line.split(" | ") for line in lines[1:]]
    expected = [("forward", c) for c in triton_attention.FORWARD_CONFIGS]
    expected += [("backward", c) for c in triton_attention.BACKWARD_CONFIGS]
    assert [row[:2] for row in rows] == [[name, triton_attention.describe(config)] for name, config in expected]
    assert all(0 < int(row[2].split()[0]) <= 255 and int(row[3].split()[0]) >= 0 for row in rows)


WITHOUT_TRITON = """
import sys
sys.modules["focal_hf"] = None  # (remote code only)
import torch
from transformers import AutoModelForImageClassification
from transformers.dynamic_module_utils import get_imports
model = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
modeling = sys.modules[type(model).__module__]
assert modeling.triton_gathered_attention is None and "triton" not in get_imports(sys.argv[1] + "/triton_attention.py")
with torch.no_grad():
    print(model(torch.zeros(1, 3, 64, 64)).logits.shape)
"""


def test_remote_code_loads_and_runs_without_triton(tmp_path):
    # a remote-code folder carries the kernels' module (a relative import of modeling_focal), whose Triton import
    # transformers' loader must not require: where Triton cannot be imported the model loads and runs without it
    from focal_hf.hub import add_remote_code

    folder = tmp_path / "remote"
    model = FocalForImageClassification(tiny_config(num_labels=3))
    model.save_pretrained(folder)
    add_remote_code(folder, model.config, FocalImageProcessor())
    assert (folder / "triton_attention.py").is_file()
    (tmp_path / "no_triton" / "triton").mkdir(parents=True)
    (tmp_path / "no_triton" / "triton" / "__init__.py").write_text('raise ImportError("no Triton in this test")\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "no_triton"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRITON, str(folder)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "torch.Size([1, 3])"
