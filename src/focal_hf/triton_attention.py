# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""The GPU path of `focal_sdpa`: attention over gathered keys as two fused Triton kernels, launched and differentiated
by `modeling_focal.TritonGatheredAttention` (`focal_sdpa_attention` runs it on NVIDIA GPUs from compute capability 8.0
in bf16 and fp16, where Triton is installed; PyTorch's CUDA builds ship it). It takes the queries, keys and values side
by side as the `qkv` projection computes them (`(batch_size, num_tokens, 3 * dim)`, read where they are: nothing is
copied), the key index and the per-window bias, and computes the CPU op's attention in one kernel per direction, with
nothing materialised in between:

- forward, a program per (window, head, block of 64 queries, image): the queries, the window's keys and values read
  row by row from the sources through the key index (no gathered copy) block by block with the bias tile, the
  softmax in float32 in registers (rescaled block by block, as flash attention), the output written in the queries'
  layout `(batch_size, num_windows * window_area, dim)` (no folding copy) with its log-sum-exp;
- backward, a program per (window, head, block of queries, block of keys, group of images): the attention matrix
  recomputed from the log-sum-exp, the gradients of queries, keys and values added into one buffer laid out as the
  projections (float32 atomic adds: no gathered gradient, no `index_add_`, and the projection's gradient as one
  tensor), the bias gradient summed over the group's images in registers and added once (no per-image bias
  gradient).

Key blocks, warps and images per backward program are chosen on the GPU by `triton.autotune` at the first call for
each block shape (`tuned_configs()` says which). Under Triton's interpreter (`TRITON_INTERPRET=1`, on the CPU: how the
tests run them) the kernels take fixed configurations. `benchmarks/triton_registers.py` compiles them for a GPU
without one and reports their registers and spills.
"""

from __future__ import annotations

import os

import torch

# (in a `try`, which transformers' remote-code loader reads as an optional import: a remote-code folder then loads
# where Triton is not installed, and modeling_focal does without this module)
try:
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError(f"focal_sdpa's GPU kernels need Triton ({error})") from error

QUERY_BLOCK = 64  # queries per program (a window of 7 in one block)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # (as Triton decided when this module's kernels were made)
# Triton's interpreter (3.9) multiplies bfloat16 tiles as integers: interpreted, the products are taken in float32,
# which gives what a GPU gives (bfloat16 products are exact in float32 and accumulated in float32 there too)
DOT_IN_FLOAT32 = tl.constexpr(INTERPRETED)
# Launch configurations (keys per step or program, images per backward program, warps), tried on a GPU at the first
# call for each block shape and dtype (`triton.autotune`); Triton's interpreter runs the fixed ones below instead
FORWARD_CONFIGS = [triton.Config({"BLOCK_K": block_keys}, num_warps=warps) for block_keys, warps in ((64, 4), (128, 8))]
BACKWARD_CONFIGS = [
    triton.Config({"BLOCK_K": block_keys, "IMAGES_PER_PROGRAM": images}, num_warps=8)
    for block_keys, images in ((32, 8), (64, 8), (32, 32))
]
INTERPRETED_FORWARD = {"BLOCK_K": 64, "num_warps": 4}
INTERPRETED_BACKWARD = {"BLOCK_K": 64, "IMAGES_PER_PROGRAM": 2, "num_warps": 4}


@triton.jit
def _tile(rows, row_stride, columns, row_ok, column_ok):
    """Offsets (int32) and mask of the `rows x columns` tile of a row-major matrix."""
    return rows[:, None] * row_stride + columns[None, :], row_ok[:, None] & column_ok[None, :]


@triton.jit
def _dot(left, right, PRECISION: tl.constexpr):
    """`left @ right` in float32."""
    if DOT_IN_FLOAT32:
        left, right = left.to(tl.float32), right.to(tl.float32)
    return tl.dot(left, right, input_precision=PRECISION)


@triton.jit
def _scores(query, keys, bias, key_ok, scaling, PRECISION: tl.constexpr):
    """The logits `(queries, keys)` in float32, -inf on the block's keys past the layout's."""
    scores = _dot(query, tl.trans(keys), PRECISION) * scaling + bias
    return tl.where(key_ok[None, :], scores, float("-inf"))


@triton.jit
def _key_block(key_index_ptr, window, index_window_stride, index_key_stride, keys, key_ok, row_stride, columns, dim_ok):
    """Offsets (in a source image) and mask of a block of a window's keys (or values), `(keys, head_dim)`."""
    index = tl.load(key_index_ptr + window * index_window_stride + keys * index_key_stride, mask=key_ok, other=0)
    return _tile(index.to(tl.int32), row_stride, columns, key_ok, dim_ok)


@triton.jit
def _queries(window_head, query_block, num_heads, row_stride, WINDOW_AREA, HEAD_DIM, BLOCK_A, BLOCK_D):
    """A program's window, head, rows of queries (with their mask), columns of the head (with theirs), and the
    offsets of its `(queries, head_dim)` tile of a window's queries in the projections (rows `row_stride` apart) and
    in the output (row-major), with its mask."""
    window, head = window_head // num_heads, window_head % num_heads
    rows, dims = query_block * BLOCK_A + tl.arange(0, BLOCK_A), tl.arange(0, BLOCK_D)
    row_ok, dim_ok = rows < WINDOW_AREA, dims < HEAD_DIM
    columns = head * HEAD_DIM + dims
    queries_at, query_mask = _tile(rows, row_stride, columns, row_ok, dim_ok)
    outputs_at, _ = _tile(rows, num_heads * HEAD_DIM, columns, row_ok, dim_ok)
    return window, head, rows, row_ok, columns, dim_ok, queries_at, outputs_at, query_mask


@triton.jit
def _image_starts(image, window, head, num_windows, num_heads, image_stride, row_stride, WINDOW_AREA, HEAD_DIM):
    """Where an image's window starts in the outputs and in the queries, its sources in the keys and values (rows
    `row_stride` and images `image_stride` apart, as the queries'), and its rows for a head in the log-sum-exp."""
    first_output = (image * num_windows + window) * WINDOW_AREA * num_heads * HEAD_DIM
    first_query = image * image_stride + window * WINDOW_AREA * row_stride
    first_row = ((image * num_windows + window) * num_heads + head) * WINDOW_AREA
    return first_output, first_query, image * image_stride, first_row


@triton.jit
def _gathered_attention_forward(
    query_ptr,
    key_ptr,
    value_ptr,
    bias_ptr,
    key_index_ptr,
    output_ptr,
    logsumexp_ptr,
    index_window_stride,
    index_key_stride,
    num_heads,
    image_stride,
    row_stride,
    scaling,
    WINDOW_AREA: tl.constexpr,
    NUM_KEYS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    scaling = tl.cast(scaling, tl.float32)  # (torch.compile passes a Python float in float64)
    num_query_blocks: tl.constexpr = (WINDOW_AREA + BLOCK_A - 1) // BLOCK_A
    window_head, query_block = tl.program_id(0) // num_query_blocks, tl.program_id(0) % num_query_blocks
    image = tl.program_id(1).to(tl.int64)
    num_windows = tl.num_programs(0) // (num_query_blocks * num_heads)
    window, head, rows, row_ok, columns, dim_ok, queries_at, outputs_at, query_mask = _queries(
        window_head, query_block, num_heads, row_stride, WINDOW_AREA, HEAD_DIM, BLOCK_A, BLOCK_D
    )
    first_output, first_query, first_key, first_row = _image_starts(
        image, window, head, num_windows, num_heads, image_stride, row_stride, WINDOW_AREA, HEAD_DIM
    )
    first_bias = window_head * WINDOW_AREA * NUM_KEYS
    query = tl.load(query_ptr + first_query + queries_at, mask=query_mask, other=0.0)

    # the softmax over blocks of keys, rescaled as the running maximum grows (a finite start: no inf - inf)
    maximum = tl.full((BLOCK_A,), -1.0e30, dtype=tl.float32)
    total = tl.zeros((BLOCK_A,), dtype=tl.float32)
    output = tl.zeros((BLOCK_A, BLOCK_D), dtype=tl.float32)
    for first in range(0, NUM_KEYS, BLOCK_K):
        keys = first + tl.arange(0, BLOCK_K)
        key_ok = keys < NUM_KEYS
        keys_at, key_mask = _key_block(
            key_index_ptr, window, index_window_stride, index_key_stride, keys, key_ok, row_stride, columns, dim_ok
        )
        bias_at, bias_mask = _tile(rows, NUM_KEYS, keys, row_ok, key_ok)
        bias = tl.load(bias_ptr + first_bias + bias_at, mask=bias_mask, other=0.0).to(tl.float32)
        keys_tile = tl.load(key_ptr + first_key + keys_at, mask=key_mask, other=0.0)
        scores = _scores(query, keys_tile, bias, key_ok, scaling, PRECISION)
        new_maximum = tl.maximum(maximum, tl.max(scores, 1))
        rescale = tl.exp(maximum - new_maximum)
        probs = tl.exp(scores - new_maximum[:, None])
        total = total * rescale + tl.sum(probs, 1)
        values = tl.load(value_ptr + first_key + keys_at, mask=key_mask, other=0.0)
        output = output * rescale[:, None] + _dot(probs.to(values.dtype), values, PRECISION)
        maximum = new_maximum

    output = output / total[:, None]
    tl.store(output_ptr + first_output + outputs_at, output.to(output_ptr.dtype.element_ty), mask=query_mask)
    tl.store(logsumexp_ptr + first_row + rows, maximum + tl.log(total), mask=row_ok)


@triton.jit
def _gathered_attention_backward(
    grad_output_ptr,
    query_ptr,
    key_ptr,
    value_ptr,
    bias_ptr,
    key_index_ptr,
    output_ptr,
    logsumexp_ptr,
    grad_query_ptr,
    grad_key_ptr,
    grad_value_ptr,
    grad_bias_ptr,
    index_window_stride,
    index_key_stride,
    num_heads,
    image_stride,
    row_stride,
    scaling,
    batch_size,
    WINDOW_AREA: tl.constexpr,
    NUM_KEYS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IMAGES_PER_PROGRAM: tl.constexpr,
):
    scaling = tl.cast(scaling, tl.float32)  # (torch.compile passes a Python float in float64)
    num_query_blocks: tl.constexpr = (WINDOW_AREA + BLOCK_A - 1) // BLOCK_A
    num_key_blocks: tl.constexpr = (NUM_KEYS + BLOCK_K - 1) // BLOCK_K
    query_block = tl.program_id(0) % num_query_blocks
    key_block = tl.program_id(0) // num_query_blocks % num_key_blocks
    window_head = tl.program_id(0) // (num_query_blocks * num_key_blocks)
    num_windows = tl.num_programs(0) // (num_query_blocks * num_key_blocks * num_heads)
    window, head, rows, row_ok, columns, dim_ok, queries_at, outputs_at, query_mask = _queries(
        window_head, query_block, num_heads, row_stride, WINDOW_AREA, HEAD_DIM, BLOCK_A, BLOCK_D
    )
    keys = key_block * BLOCK_K + tl.arange(0, BLOCK_K)
    key_ok = keys < NUM_KEYS
    keys_at, key_mask = _key_block(
        key_index_ptr, window, index_window_stride, index_key_stride, keys, key_ok, row_stride, columns, dim_ok
    )
    bias_at, bias_mask = _tile(rows, NUM_KEYS, keys, row_ok, key_ok)
    first_bias = window_head * WINDOW_AREA * NUM_KEYS
    bias = tl.load(bias_ptr + first_bias + bias_at, mask=bias_mask, other=0.0).to(tl.float32)
    grad_bias = tl.zeros((BLOCK_A, BLOCK_K), dtype=tl.float32)

    first_image = tl.program_id(1).to(tl.int64) * IMAGES_PER_PROGRAM
    for image in range(first_image, tl.minimum(first_image + IMAGES_PER_PROGRAM, batch_size)):
        first_output, first_query, first_key, first_row = _image_starts(
            image, window, head, num_windows, num_heads, image_stride, row_stride, WINDOW_AREA, HEAD_DIM
        )
        query = tl.load(query_ptr + first_query + queries_at, mask=query_mask, other=0.0)
        keys_tile = tl.load(key_ptr + first_key + keys_at, mask=key_mask, other=0.0)
        values = tl.load(value_ptr + first_key + keys_at, mask=key_mask, other=0.0)
        grad_output = tl.load(grad_output_ptr + first_output + outputs_at, mask=query_mask, other=0.0)
        output = tl.load(output_ptr + first_output + outputs_at, mask=query_mask, other=0.0)
        logsumexp = tl.load(logsumexp_ptr + first_row + rows, mask=row_ok, other=0.0)

        probs = tl.exp(_scores(query, keys_tile, bias, key_ok, scaling, PRECISION) - logsumexp[:, None])
        delta = tl.sum(grad_output.to(tl.float32) * output.to(tl.float32), 1)
        grad_probs = _dot(grad_output, tl.trans(values), PRECISION)
        grad_scores = probs * (grad_probs - delta[:, None])
        grad_bias += grad_scores

        grad_scores_low = grad_scores.to(query.dtype)
        grad_query = _dot(grad_scores_low, keys_tile, PRECISION) * scaling
        tl.atomic_add(grad_query_ptr + first_query + queries_at, grad_query, mask=query_mask, sem="relaxed")
        grad_keys = _dot(tl.trans(grad_scores_low), query, PRECISION) * scaling
        tl.atomic_add(grad_key_ptr + first_key + keys_at, grad_keys, mask=key_mask, sem="relaxed")
        grad_values = _dot(tl.trans(probs.to(grad_output.dtype)), grad_output, PRECISION)
        tl.atomic_add(grad_value_ptr + first_key + keys_at, grad_values, mask=key_mask, sem="relaxed")

    tl.atomic_add(grad_bias_ptr + first_bias + bias_at, grad_bias, mask=bias_mask, sem="relaxed")


def _time_configuration(kernel_call, quantiles):
    """How `triton.autotune` times a launch configuration by default (the GPU driver's benchmarker), the driver looked
    up when the tuning runs: Triton 3.3 (PyTorch 2.7's) looks it up when an autotuned kernel is defined, which made
    importing this module fail where no GPU driver is found (PyTorch's CUDA builds on a machine without a GPU)."""
    return triton.runtime.driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


SHAPE = ["num_heads", "image_stride", "WINDOW_AREA", "NUM_KEYS", "HEAD_DIM"]  # (what the tuning is kept for)
_tuned_forward = triton.autotune(FORWARD_CONFIGS, key=SHAPE, do_bench=_time_configuration)(_gathered_attention_forward)
_tuned_backward = triton.autotune(
    BACKWARD_CONFIGS,
    key=[*SHAPE, "batch_size"],
    reset_to_zero=["grad_query_ptr", "grad_key_ptr", "grad_value_ptr", "grad_bias_ptr"],
    do_bench=_time_configuration,
)(_gathered_attention_backward)


def tuned_configs() -> dict[str, dict[tuple, str]]:
    """The configurations `triton.autotune` chose so far (on a GPU), by kernel and tuning key."""
    tuned = {"forward": _tuned_forward, "backward": _tuned_backward}
    return {name: {key: describe(config) for key, config in kernel.cache.items()} for name, kernel in tuned.items()}


def describe(config: triton.Config) -> str:
    """A launch configuration in a few words."""
    return ", ".join([*(f"{name} {value}" for name, value in config.kwargs.items()), f"{config.num_warps} warps"])


def _launch_arguments(projections, bias, key_index, num_heads: int):
    """The size arguments and the compile-time constants that both kernels take."""
    num_windows, _, window_area, num_keys = bias.shape
    head_dim = projections.shape[-1] // (3 * num_heads)
    constants = {
        "WINDOW_AREA": window_area,
        "NUM_KEYS": num_keys,
        "HEAD_DIM": head_dim,
        "BLOCK_A": max(16, min(QUERY_BLOCK, triton.next_power_of_2(window_area))),
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "PRECISION": "ieee" if projections.dtype == torch.float32 else "tf32",  # (float32: no TF32 rounding)
    }
    num_query_blocks = -(-window_area // constants["BLOCK_A"])
    sizes = (*key_index.stride(), num_heads, *projections.stride()[:2])
    return num_windows * num_heads * num_query_blocks, sizes, constants


def fused_gathered_attention(
    projections: torch.Tensor,
    bias: torch.Tensor,
    key_index: torch.Tensor,
    num_heads: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """projections `(batch_size, num_tokens, 3 * dim)` (queries, keys and values side by side, as the `qkv`
    projection gives them: the queries of the first `num_windows * window_area` tokens, the keys' and values' sources
    of all), bias `(num_windows, num_heads, window_area, num_keys)`, key_index `(num_windows, num_keys)` -> the output
    `(batch_size, num_windows * window_area, dim)` and its log-sum-exp `(batch_size, num_windows, num_heads,
    window_area)` (float32), as `focal_hf.modeling_focal.cpu_gathered_attention`. The kernels read the projections
    where they are (rows of `3 * dim`): nothing is copied."""
    projections, bias = projections.contiguous(), bias.contiguous()
    programs, sizes, constants = _launch_arguments(projections, bias, key_index, num_heads)
    num_windows, _, window_area, _ = bias.shape
    batch_size, dim = len(projections), projections.shape[-1] // 3
    output = projections.new_empty(batch_size, num_windows * window_area, dim)
    logsumexp = projections.new_empty(batch_size, num_windows, num_heads, window_area, dtype=torch.float32)
    kernel, launch = (_gathered_attention_forward, INTERPRETED_FORWARD) if INTERPRETED else (_tuned_forward, {})
    kernel[(programs, batch_size)](
        *projections.chunk(3, dim=-1), bias, key_index, output, logsumexp, *sizes, scaling, **constants, **launch
    )
    return output, logsumexp


def fused_gathered_attention_backward(
    grad_output: torch.Tensor,
    projections: torch.Tensor,
    bias: torch.Tensor,
    key_index: torch.Tensor,
    output: torch.Tensor,
    logsumexp: torch.Tensor,
    num_heads: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `projections` (in their layout: one buffer for queries, keys and values) and of `bias`; the
    attention matrix recomputed from `logsumexp`."""
    grad_output, projections, bias = (t.contiguous() for t in (grad_output, projections, bias))
    programs, sizes, constants = _launch_arguments(projections, bias, key_index, num_heads)
    batch_size, num_keys = len(projections), bias.shape[3]

    def grid(meta):
        return programs * -(-num_keys // meta["BLOCK_K"]), -(-batch_size // meta["IMAGES_PER_PROGRAM"])

    grad_projections = torch.zeros_like(projections, dtype=torch.float32)
    grad_bias = torch.zeros_like(bias, dtype=torch.float32)
    kernel, launch = (_gathered_attention_backward, INTERPRETED_BACKWARD) if INTERPRETED else (_tuned_backward, {})
    kernel[grid](
        grad_output,
        *projections.chunk(3, dim=-1),
        bias,
        key_index,
        output,
        logsumexp,
        *grad_projections.chunk(3, dim=-1),
        grad_bias,
        *sizes,
        scaling,
        batch_size,
        **constants,
        **launch,
    )
    return grad_projections.to(projections.dtype), grad_bias.to(bias.dtype)
