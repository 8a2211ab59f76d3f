"""The host's time per call of each layer of focal_sdpa's Triton attention on a GPU, with a Focal-T block's arguments
(bf16 training at batch 64, stage 3 by default), beside torch's SDPA of as many queries:

    python benchmarks/launch_cost.py [--batch-size 64] [--stage 3] [--calls 200]

A training step issues each block's attention as `modeling_focal.triton_gathered_attention` with autograd (forward,
then its backward pass); when the host, not the GPU, sets a step's pace (`profile_gpu.py`), what the host spends
between the call and the kernels' launches is what the step loses. Rows, from the outermost layer in:

- the attention with autograd (`TritonGatheredAttention`): forward, and forward and backward (`.backward()`, as in a
  step);
- without autograd: the forward (`triton_attention.fused_gathered_attention`) and the backward
  (`fused_gathered_attention_backward`) functions;
- the forward kernel's launches alone: through `triton.autotune` (as the function launches it), and the kernel
  itself;
- for scale: `torch.nn.functional.scaled_dot_product_attention` of the same queries (keys = queries), and one
  `torch.zeros_like` of the projections in float32 (the backward function makes it, and one for the bias).

Each row: the mean host time per call over `--calls` calls (until the call returns), and per call until the GPU has
finished them all. Needs a CUDA GPU that runs the kernels (`modeling_focal.triton_runs_on`)."""

import argparse
import time

import torch
from benchmark import positive_int, require_cuda

from focal_hf import FocalForImageClassification, modeling_focal, official_config, triton_attention


def block_arguments(batch_size: int, stage: int) -> tuple:
    """The arguments of the op's first call in `stage` (1-4) of a Focal-T bf16 training step at `batch_size`, on the
    GPU (detached, contiguous), after one step (which also tunes the kernels)."""
    model = FocalForImageClassification(official_config("focal-tiny")).cuda().train()
    calls = kernel_arguments(model, torch.randn(batch_size, 3, 224, 224, device="cuda"))
    return calls[sum(model.config.depths[: stage - 1])]


def kernel_arguments(model, pixel_values: torch.Tensor) -> list[tuple]:
    """The arguments (tensors detached and contiguous) of each call of the Triton attention in one bf16-autocast forward
    and backward pass of `model` on `pixel_values`, in the order of the blocks."""
    op, calls = modeling_focal.triton_gathered_attention, []
    modeling_focal.triton_gathered_attention = lambda *args: calls.append(args) or op(*args)
    try:
        with torch.autocast(pixel_values.device.type, dtype=torch.bfloat16):
            model(pixel_values).logits.float().sum().backward()
    finally:
        modeling_focal.triton_gathered_attention = op
    return [tuple(arg.detach().contiguous() if torch.is_tensor(arg) else arg for arg in args) for args in calls]


def per_call(function, calls: int) -> tuple[float, float]:
    """Mean µs per call of `function()` on the host, and until the GPU has finished `calls` calls."""
    function()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    return issued / calls * 1e6, (time.perf_counter() - start) / calls * 1e6


def rows(arguments: tuple) -> dict:
    """The measured calls by name (see the module's docstring)."""
    projections, bias, key_index, num_heads, scaling = arguments
    attention = modeling_focal.triton_gathered_attention
    output, logsumexp = triton_attention.fused_gathered_attention(*arguments)
    grad_output = torch.randn_like(output)
    leaves = [tensor.clone().requires_grad_() for tensor in (projections, bias)]
    programs, sizes, constants = triton_attention._launch_arguments(projections, bias, key_index, num_heads)
    tuned = triton_attention._tuned_forward
    config = tuned.cache[next(iter(tuned.cache))]  # (any tuned configuration: the launch's cost, not the kernel's)
    sources = projections.chunk(3, dim=-1)
    kernel_arguments = (*sources, bias, key_index, torch.empty_like(output), logsumexp.clone(), *sizes, scaling)
    num_windows, _, window_area, _ = bias.shape
    # (the queries folded as torch's SDPA takes them: the output has their shape and layout)
    folded = output.view(len(output), num_windows, window_area, num_heads, -1).transpose(2, 3).flatten(1, 2)

    def without_autograd(function):
        def call():
            with torch.no_grad():
                function()

        return call

    return {
        "with autograd, forward": lambda: attention(*leaves, key_index, num_heads, scaling),
        "with autograd, forward and backward": lambda: attention(*leaves, key_index, num_heads, scaling)[0].backward(
            grad_output
        ),
        "forward function": without_autograd(lambda: triton_attention.fused_gathered_attention(*arguments)),
        "backward function": without_autograd(
            lambda: triton_attention.fused_gathered_attention_backward(
                grad_output, *arguments[:3], output, logsumexp, num_heads, scaling
            )
        ),
        "forward kernel through triton.autotune": lambda: tuned[(programs, len(projections))](
            *kernel_arguments, **constants
        ),
        "forward kernel": lambda: triton_attention._gathered_attention_forward[(programs, len(projections))](
            *kernel_arguments, **constants, **config.kwargs, num_warps=config.num_warps
        ),
        f"torch SDPA {tuple(folded.shape)}": without_autograd(
            lambda: torch.nn.functional.scaled_dot_product_attention(folded, folded, folded)
        ),
        "torch.zeros_like(projections, float32)": lambda: torch.zeros_like(projections, dtype=torch.float32),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--stage", type=int, default=3, choices=[1, 2, 3, 4])
    parser.add_argument("--calls", type=positive_int, default=200)
    args = parser.parse_args()
    require_cuda("launch_cost.py", "it measures on a CUDA GPU")
    arguments = block_arguments(args.batch_size, args.stage)
    projections, bias = arguments[:2]
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}: Focal-T stage {args.stage}, batch "
        f"{args.batch_size}, bf16: projections {tuple(projections.shape)}, bias {tuple(bias.shape)}"
    )
    print(f"{'µs per call':>12} {'with the GPU':>13}")
    for name, function in rows(arguments).items():
        host, finished = per_call(function, args.calls)
        print(f"{host:12.1f} {finished:13.1f}  {name}", flush=True)


if __name__ == "__main__":
    main()
